"""The walkthrough notebooks execute top to bottom, and are committed with their outputs.

They run the real built-in Real-ESRGAN prior on the example photos and tiny random diffusion
components, on the CPU, offline. The tests execute a fresh copy (outputs cleared); the committed
files keep the outputs of such a run so that GitHub shows the pictures. To refresh them after
changing a notebook::

    python tests/test_notebooks.py            # every notebook, or name some: 02_four_stages
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
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
MAX_BYTES = 1_500_000  # per notebook, pictures included
CELL_TIMEOUT = 900  # seconds; the x4 prior takes ~10 s per photo on one busy core
METADATA = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def _images(nb) -> list[dict]:
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if "image/png" in out.get("data", {})]


@contextlib.contextmanager
def kernel_environment() -> Iterator[None]:
    """A ``python3`` kernel spec that runs *this* interpreter, found first on JUPYTER_PATH.

    Nothing is installed: the spec lives in a temporary folder, so the kernel can never be some
    other Python that happens to be registered as ``python3`` on the machine.
    """
    saved = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        spec_dir = Path(tmp) / "jupyter" / "kernels" / "python3"
        spec_dir.mkdir(parents=True)
        spec = {
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (raim tests)",
            "language": "python",
        }
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        os.environ["JUPYTER_PATH"] = str(Path(tmp) / "jupyter")
        # The kernel imports raim_diffusion from this checkout even when it is not installed.
        path = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = str(ROOT) + (os.pathsep + path if path else "")
        # Everything offline; one thread per kernel: with several threads on a busy shared CPU,
        # OpenMP spin-waits make each op many times slower.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        # The inline backend must be used, or plt.show() would produce no figure.
        os.environ.pop("MPLBACKEND", None)
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)


def execute(path: Path, extra_cells: tuple[str, ...] = ()):
    """Run a fresh copy of the notebook (outputs cleared) in notebooks/; return it executed."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.cells.extend(nbformat.v4.new_code_cell(source) for source in extra_cells)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        record_timing=False,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    with kernel_environment():
        client.execute()  # raises CellExecutionError on the first failing cell
    return nb


def test_notebooks_are_committed_with_their_outputs():
    assert {p.name for p in NOTEBOOKS} >= EXPECTED
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        first = nb.cells[0]
        assert first.cell_type == "code" and first.source.startswith("USE_TINY = True"), path
        assert any("USE_TINY = False" in c.source for c in nb.cells if c.cell_type == "markdown")
        source = "\n".join(c.source for c in nb.cells)
        assert 'PRIOR = "realesrgan-x4plus"' in source, f"{path.name}: the real built-in prior"
        # Executed top to bottom in one run, without errors, pictures included.
        counts = [c.execution_count for c in nb.cells if c.cell_type == "code"]
        assert counts == list(range(1, len(counts) + 1)), f"{path.name}: run it top to bottom"
        outputs = [out for c in nb.cells if c.cell_type == "code" for out in c.outputs]
        assert not [out for out in outputs if out.output_type == "error"], path.name
        assert len(_images(nb)) >= 3, f"{path.name}: commit it with its pictures"
        assert path.stat().st_size < MAX_BYTES, f"{path.name} is large: shrink its figures"
    planted = nbformat.read(NOTEBOOK_DIR / "02_four_stages.ipynb", as_version=4)
    assert any("plant_artifact(" in c.source for c in planted.cells)


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path):
    checks = ["import sys; print(sys.executable)"]
    if path.stem == "03_tuning":
        # The threshold sweep's pick lies strictly inside the sweep (the notebook asserts it too).
        checks.append("print(0 < best_index < len(thresholds) - 1)")
    nb = execute(path, tuple(checks))
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert len(_images(nb)) >= 3, "every notebook shows pictures"
    assert nb.cells[-len(checks)].outputs[0].text.strip() == sys.executable
    if path.stem == "03_tuning":
        assert nb.cells[-1].outputs[0].text.strip() == "True"


def main(names: list[str]) -> None:
    """Execute the notebooks and write them back with their outputs."""
    for path in NOTEBOOKS:
        if names and path.stem not in names and path.name not in names:
            continue
        nb = execute(path)
        nb.metadata = METADATA  # nothing about this machine's kernel in the committed file
        nbformat.validate(nb)
        nbformat.write(nb, path)
        size = path.stat().st_size
        print(f"{path.name}: {len(_images(nb))} pictures, {size / 1e6:.2f} MB")
        if size >= MAX_BYTES:
            raise SystemExit(f"{path.name} is over {MAX_BYTES / 1e6} MB: shrink its figures")


if __name__ == "__main__":
    main(sys.argv[1:])
