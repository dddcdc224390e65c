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

import torch  # noqa: E402 - after the environment above

torch.set_num_threads(1)
