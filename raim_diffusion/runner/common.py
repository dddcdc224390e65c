"""Checks every ``raim`` command shares: devices, output paths, and how a user error is shown.

A user error on the command line is one line on stderr and exit status 2; these helpers raise
`UsageError` (a `ValueError`) with that line, before any model loads.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

__all__ = [
    "DEVICE_TYPES",
    "add_training_arguments",
    "UsageError",
    "check_output_dir",
    "check_output_file",
    "report_usage_error",
    "resolve_device",
]

#: Device types the commands accept (``cuda``, ``cuda:1``, ``cpu``, ``mps``, ``xpu``).
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu")


class UsageError(ValueError):
    """A mistake in what the user asked for; the message is the whole one-line explanation."""


def resolve_device(name: str | None) -> str:
    """The torch device a command runs on: ``name`` checked against this machine, or the best
    available one (CUDA, else CPU) when `None`.

    Raises:
        UsageError: an unknown device name, or one this machine does not have.
    """
    import torch

    if name is None or str(name).strip() == "":
        return "cuda" if torch.cuda.is_available() else "cpu"
    text = str(name).strip()
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise UsageError(f"--device {text!r} is not a device; use one of {', '.join(DEVICE_TYPES)}"
                         " (optionally with an index, e.g. cuda:1)")
    available = {
        "cpu": lambda: True,
        "cuda": torch.cuda.is_available,
        "mps": lambda: hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }[device.type]
    if not available():
        raise UsageError(f"--device {text} was asked for, but torch sees no {device.type} device "
                         "here; use --device cpu or leave --device out")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise UsageError(f"--device {text}: this machine has {count} CUDA device(s)")
    return text


def _check_writable_parent(path: Path, what: str) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{what} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: {parent} is not writable")


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """Check that ``path`` is (or can be created as) a writable folder; returns it as a Path."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{what} {path} is an existing file, not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{what} {path} is not writable")
        return path
    _check_writable_parent(path, what)
    return path


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Check that ``path`` can be written as a file (it is not a folder, its folder is writable)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise UsageError(f"{what} {path} exists and is not writable")
    _check_writable_parent(path, what)
    return path


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every ``raim train-*`` command shares: ``--max-steps``, ``--resume`` and
    ``--set KEY=VALUE`` (repeatable, collected in ``args.overrides``)."""
    parser.add_argument("--max-steps", type=int, metavar="N", help="override max_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set data.batch_size=4 (repeatable)",
    )


def report_usage_error(command: str, error: BaseException) -> int:
    """Print ``raim COMMAND: message`` (one line) to stderr and return exit status 2."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"raim {command}: {message}", file=sys.stderr)
    return 2
