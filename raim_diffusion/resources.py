"""Locate raim-diffusion's folders: shipped data (``configs/``, ``masks/``) and the user cache.

In a checkout they are the top-level ``configs/`` and ``masks/`` folders; an installed wheel
carries them as ``raim_diffusion/_data/<name>`` (see ``pyproject.toml``). This is the one place
that knows both locations.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_DIR = Path(__file__).resolve().parent
_KINDS = ("configs", "masks")


def data_dir(kind: str) -> Path:
    """Folder holding the shipped ``configs`` or ``masks`` files.

    Args:
        kind (`str`): `"configs"` or `"masks"`.

    Returns:
        `pathlib.Path`: The installed copy when present, else the checkout's folder.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    for candidate in (_PACKAGE_DIR / "_data" / kind, _PACKAGE_DIR.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(
        f"raim-diffusion's {kind!r} folder was found neither in the installed package "
        f"({_PACKAGE_DIR / '_data' / kind}) nor in a checkout ({_PACKAGE_DIR.parent / kind}); "
        "reinstall the package"
    )


def cache_dir(sub: str = "") -> Path:
    """raim-diffusion's user cache folder (converted priors, tokenizer files, tiny models).

    ``$RAIM_CACHE`` if set, else ``$XDG_CACHE_HOME/raim-diffusion``, else
    ``~/.cache/raim-diffusion``; read at call time so tests and users can redirect it.

    Args:
        sub (`str`, *optional*): A sub-folder name.
    """
    root = os.environ.get("RAIM_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "raim-diffusion"
    return base / sub if sub else base
