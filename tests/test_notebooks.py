"""The walkthrough notebooks execute top to bottom on tiny components, and are committed clean."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = {"01_quickstart.ipynb", "02_four_stages.ipynb", "03_tuning.ipynb"}


def test_notebooks_are_committed_clean():
    assert {p.name for p in NOTEBOOKS} >= EXPECTED
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        first = nb.cells[0]
        assert first.cell_type == "code" and first.source.startswith("USE_TINY = True"), path
        assert any("USE_TINY = False" in c.source for c in nb.cells if c.cell_type == "markdown")
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, path
        assert path.stat().st_size < 50_000, f"{path.name} is large: are outputs embedded?"


@pytest.fixture()
def kernel_env(tmp_path, monkeypatch):
    """A ``python3`` kernel spec that runs *this* interpreter, found first on JUPYTER_PATH.

    Nothing is installed: the spec lives in a temporary folder, so the kernel can never be some
    other Python that happens to be registered as ``python3`` on the machine.
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (raim tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # The kernel imports raim_diffusion from this checkout even when it is not installed.
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + (os.pathsep + path if path else ""))
    # Tiny models: one thread per kernel. With several threads on a busy shared CPU (parallel
    # test workers), OpenMP spin-waits make each tiny op up to 100x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The inline backend must be used, or plt.show() would produce no figure.
    monkeypatch.delenv("MPLBACKEND", raising=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, kernel_env):
    nb = nbformat.read(path, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(figures) >= 2, "every notebook shows pictures"
    assert nb.cells[-1].outputs[0].text.strip() == sys.executable
