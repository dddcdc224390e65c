"""Shared test setup: everything runs offline, on the CPU, in seconds."""

from __future__ import annotations

import os

# Nothing may reach a model hub from the tests; fail fast instead of waiting on timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
