"""Files: finding input images, mapping them to output paths, and writing atomically.

- :func:`find_images` expands files, folders and glob patterns into a sorted list of images.
- :func:`output_paths` maps them to output paths under an output folder.
- :func:`atomic_write` is the one way the package writes any file (images, json, csv, html).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = ["IMAGE_SUFFIXES", "atomic_write", "find_images", "output_paths"]

#: Suffixes (lower case) that :func:`find_images` picks up when scanning folders and globs.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
_GLOB_CHARS = frozenset("*?[")


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    encoding: str | None = None,
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Write a file so that it appears complete under its final name, or not at all.

    The data goes to a hidden temporary file in the same folder, which is flushed, synced and
    then renamed over `path` with ``os.replace`` (atomic on POSIX and Windows). If the body of
    the ``with`` block raises, the temporary file is removed and `path` is left as it was.
    Missing parent folders are created. The file gets the usual permissions (umask applies).

    Args:
        path (`str` or `os.PathLike`): the final file name.
        mode (`str`, defaults to `"wb"`): `"wb"` for bytes, `"w"` (or `"wt"`) for text.
        encoding (`str`, *optional*): text encoding; UTF-8 by default in text mode.
        newline (`str`, *optional*): passed to `open` in text mode (e.g. `""` for csv).

    Yields:
        The open file object.

    Example:
        ```py
        with atomic_write("out/report.json", "w") as f:
            json.dump(results, f)
        ```
    """
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"`mode` must be 'w', 'wt' or 'wb' (a whole new file), got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    # os.open with 0o666 lets the umask decide the permissions, unlike tempfile's 0o600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        if "b" in mode:
            f = os.fdopen(fd, "wb")
        else:
            f = os.fdopen(fd, "w", encoding=encoding or "utf-8", newline=newline)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise




def _scan_folder(folder: Path, recursive: bool) -> list[Path]:
    found = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found.extend(Path(dirpath) / f for f in filenames)
    else:
        found = [p for p in folder.iterdir() if p.is_file()]
    return [p for p in found if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]


def find_images(
    inputs: str | os.PathLike | Sequence[str | os.PathLike], *, recursive: bool = True
) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of image files.

    Folders are searched (recursively by default) and glob patterns (``*``, ``?``, ``[...]``,
    ``**``; folders they match are searched too) expanded, keeping files whose suffix is in
    :data:`IMAGE_SUFFIXES` (any letter case) and skipping hidden files and folders (names starting
    with ".", e.g. macOS "._x.jpg" and unfinished atomic writes). A file named explicitly is kept
    whatever its suffix: the user asked for it, and reading it reports any problem. ``~`` is
    expanded.

    Args:
        inputs (`str`, `os.PathLike` or a list of them): files, folders and glob patterns.
        recursive (`bool`, defaults to `True`): search sub-folders of folders.

    Returns:
        `list[pathlib.Path]`: the images, sorted, each once.

    Raises:
        FileNotFoundError: a path that does not exist, or a pattern that matches no image.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    found: dict[Path, Path] = {}
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        path = Path(text)
        if path.is_dir():
            matches = _scan_folder(path, recursive)
        elif path.is_file():
            matches = [path]
        elif _GLOB_CHARS & set(text):
            matches = []
            for m in map(Path, sorted(glob.glob(text, recursive=True))):
                if m.is_dir():  # "photos/*" also means the images inside sub-folders
                    matches.extend(_scan_folder(m, recursive))
                elif m.suffix.lower() in IMAGE_SUFFIXES and not m.name.startswith("."):
                    matches.append(m)
            if not matches:
                raise FileNotFoundError(f"{text}: pattern matches no image files")
        else:
            raise FileNotFoundError(f"{text}: no such file or folder")
        for m in matches:
            found.setdefault(m.resolve(), m)
    return sorted(found.values())


def output_paths(
    paths: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    suffix: str | None = None,
) -> list[Path]:
    """Map input images to output paths under `output_dir`, mirroring their sub-folders.

    Paths are taken relative to the deepest folder that holds all inputs, so
    ``in/a.png, in/sub/b.png -> out/a.png, out/sub/b.png`` and two inputs never share an output.

    Args:
        paths (`list` of paths): the inputs, e.g. from :func:`find_images`.
        output_dir (`str` or `os.PathLike`): the output folder.
        suffix (`str`, *optional*): replace each suffix (e.g. ".png"); keep it by default.

    Returns:
        `list[pathlib.Path]`: one output path per input, in the same order.

    Raises:
        ValueError: an unsupported `suffix`, or two inputs that would be written to one file
            (e.g. ``a.jpg`` and ``a.png`` with ``suffix=".png"``).
    """
    if suffix is not None:
        suffix = suffix if suffix.startswith(".") else f".{suffix}"
        if suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"`suffix` must be one of {', '.join(IMAGE_SUFFIXES)}, got {suffix!r}")
    absolute = [Path(p).absolute() for p in paths]
    if not absolute:
        return []
    try:
        root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
        rels = [p.relative_to(root) for p in absolute]
    except ValueError:  # different drives on Windows: fall back to the names
        rels = [Path(p.name) for p in absolute]
    out_dir = Path(output_dir)
    outputs = [out_dir / (r.with_suffix(suffix) if suffix else r) for r in rels]
    seen: dict[Path, Path] = {}
    for src, dst in zip(paths, outputs, strict=True):
        if dst in seen:
            raise ValueError(f"{seen[dst]} and {src} would both be written to {dst}")
        seen[dst] = Path(src)
    return outputs
