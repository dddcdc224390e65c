"""Shared test setup: everything runs offline, on the CPU, in seconds."""

from __future__ import annotations

import os

# Nothing may reach a model hub from the tests; fail fast instead of waiting on timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tiny models on a shared 2-core machine: one thread per test process is ~100x faster than
# two threads fighting for the cores (pytest-xdist runs one process per core). Subprocesses
# (notebook kernels, torchrun workers) inherit the variable.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402 - after the environment above
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def private_raim_cache(tmp_path_factory):
    """Tiny pipelines and converted priors go to a private cache, shared by one test module
    (use it with ``pytestmark = pytest.mark.usefixtures("private_raim_cache")``)."""
    old = os.environ.get("RAIM_CACHE")
    os.environ["RAIM_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("RAIM_CACHE")
    else:
        os.environ["RAIM_CACHE"] = old
