"""Files: finding input images, mapping them to output paths, and writing atomically.

- :func:`find_images` expands files, folders and glob patterns into a sorted list of images.
- :func:`output_paths` maps them to output paths under an output folder.
- :func:`check_output_not_input` refuses an output folder that is, holds or lies in an input.
- :func:`atomic_write` is the one way the package writes any file (images, json, csv, html).
- :func:`clean_stale_temps` removes the temporary files a killed run left behind.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from diffusers.utils import logging

logger = logging.get_logger(__name__)

__all__ = [
    "IMAGE_SUFFIXES",
    "atomic_write",
    "check_output_not_input",
    "clean_stale_temps",
    "find_images",
    "output_paths",
]

#: Suffixes (lower case) that :func:`find_images` picks up when scanning folders and globs.
IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp")
_GLOB_CHARS = frozenset("*?[")
# The names atomic_write gives its temporary files: ".{name}.{8 hex digits}.tmp".
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")

PathLike = str | os.PathLike


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike,
    mode: str = "wb",
    *,
    encoding: str | None = None,
    newline: str | None = None,
) -> Iterator[IO[Any]]:
    """Write a file so that it appears complete under its final name, or not at all.

    The data goes to a hidden temporary file ``.{name}.{8 hex digits}.tmp`` in the same folder,
    which is flushed, synced and then renamed over `path` with ``os.replace`` (atomic on POSIX
    and Windows). If the body of the ``with`` block raises, the temporary file is removed and
    `path` is left as it was. A run killed mid-write can leave the temporary file behind:
    :func:`clean_stale_temps` removes those. Missing parent folders are created. The file gets
    the usual permissions (umask applies).

    Args:
        path (`str` or `os.PathLike`): the final file name.
        mode (`str`, defaults to `"wb"`): `"wb"` for bytes, `"w"` (or `"wt"`) for text.
        encoding (`str`, *optional*): text encoding; UTF-8 by default in text mode.
        newline (`str`, *optional*): passed to `open` in text mode (e.g. `""` for csv).

    Yields:
        The open file object.

    Raises:
        IsADirectoryError: `path` is an existing folder (checked before anything is written).

    Example:
        ```py
        with atomic_write("out/report.json", "w") as f:
            json.dump(results, f)
        ```
    """
    if mode not in ("w", "wt", "wb"):
        raise ValueError(f"`mode` must be 'w', 'wt' or 'wb' (a whole new file), got {mode!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            errno.EISDIR, f"cannot write a file over the existing folder {path}", str(path)
        )
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


def clean_stale_temps(folder: str | os.PathLike, *, older_than: float = 3600.0) -> int:
    """Remove temporary files that :func:`atomic_write` left behind in a killed run.

    Only files named the way :func:`atomic_write` names them (``.{name}.{8 hex digits}.tmp``)
    and last modified more than `older_than` seconds ago are removed, so the live temporary
    file of a run writing into the same folder right now is left alone. Sub-folders are
    searched; symbolic links are neither followed nor removed.

    Args:
        folder (`str` or `os.PathLike`): the folder to clean, e.g. the output folder of a
            batch. A folder that does not exist holds nothing to clean.
        older_than (`float`, defaults to 3600): minimum age in seconds.

    Returns:
        `int`: how many files were removed.
    """
    if not older_than >= 0:
        raise ValueError(f"`older_than` must be a number of seconds >= 0, got {older_than!r}")
    cutoff = time.time() - older_than
    removed = 0
    for dirpath, _, filenames in os.walk(folder):  # followlinks=False: stay inside `folder`
        for name in filenames:
            if not _TEMP_NAME.match(name):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
                if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                    os.unlink(path)
                    removed += 1
            except FileNotFoundError:  # another run cleaned or finished it meanwhile
                continue
    return removed


# --------------------------------------------------------------------------------------------
# Finding inputs
# --------------------------------------------------------------------------------------------


def _real(path: PathLike) -> str:
    return os.path.normcase(os.path.realpath(path))


def _entry(path: PathLike) -> str:
    """The directory entry a path names: its real folder plus its own name (a link stays a link)."""
    path = os.path.abspath(path)
    return os.path.normcase(
        os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
    )


def _is_under(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies inside it (both already real and normcased)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _kind(path: PathLike) -> str:
    """What a file that is not a regular file is, in words."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "an unreadable entry"
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((text for test, text in kinds if test(mode)), "not a regular file")


def _listable(path: Path) -> bool:
    """A regular file (possibly through a file link), or a broken or looping link.

    Broken links are listed so that reading them reports the problem for that one image;
    FIFOs, devices and sockets found by scanning are skipped: reading them could hang or
    never end.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return os.path.islink(path)
    if stat.S_ISREG(mode):
        return True
    logger.warning(f"skipping {path}: {_kind(path)}, not a regular file")
    return False


def _excluded_folder(folder: str, excluded: Sequence[str]) -> bool:
    return bool(excluded) and any(_is_under(_real(folder), e) for e in excluded)


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _scan_folder(folder: Path, recursive: bool, excluded: Sequence[str]) -> list[Path]:
    found = []
    # os.walk does not descend into linked folders (followlinks=False): a link loop cannot
    # make discovery endless, and every image lies under the folder it was found in.
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [
            d
            for d in dirnames
            if not d.startswith(".") and not _excluded_folder(os.path.join(dirpath, d), excluded)
        ]
        found.extend(
            Path(dirpath, f) for f in filenames if _is_image_name(f) and _listable(Path(dirpath, f))
        )
        if not recursive:
            break
    return found


def _glob_parts(text: str) -> tuple[Path, list[str]]:
    """Split a pattern into its literal folder and the components from the first wildcard on."""
    parts = Path(text).parts
    first = next(i for i, part in enumerate(parts) if _GLOB_CHARS & set(part))
    return Path(*parts[:first]) if first else Path(), list(parts[first:])


def _glob(base: Path, parts: list[str]) -> Iterator[Path]:
    """``glob.glob(recursive=True)`` without following linked folders below `base`.

    Like ``glob``, wildcards match hidden names only when the pattern component starts with
    "." and ``**`` skips hidden folders.
    """
    if not parts:
        yield base
        return
    head, rest = parts[0], parts[1:]
    if head == "**":
        yield from _glob(base, rest)
        for sub in _entries(base):
            if not sub.name.startswith(".") and sub.is_dir(follow_symlinks=False):
                yield from _glob(base / sub.name, parts)
        return
    if not _GLOB_CHARS & set(head):
        path = base / head
        if not rest:
            if os.path.lexists(path):
                yield path
        elif path.is_dir() and not path.is_symlink():
            yield from _glob(path, rest)
        return
    for entry in _entries(base):
        if entry.name.startswith(".") and not head.startswith("."):
            continue
        if not fnmatch.fnmatch(entry.name, head):
            continue
        if not rest:
            yield base / entry.name
        elif entry.is_dir(follow_symlinks=False):
            yield from _glob(base / entry.name, rest)


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError:
        return []


def _expand(text: str) -> Iterator[Path]:
    root, parts = _glob_parts(text)
    return _glob(root, parts)


def find_images(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    recursive: bool = True,
    exclude: Sequence[str | os.PathLike] = (),
) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted list of image files.

    Folders are searched (recursively by default) and glob patterns (``*``, ``?``, ``[...]``,
    ``**``; folders they match are searched too) expanded, keeping files whose suffix is in
    :data:`IMAGE_SUFFIXES` (any letter case) and skipping hidden files and folders (names starting
    with ".", e.g. macOS "._x.jpg" and unfinished atomic writes). A file named explicitly is kept
    whatever its suffix or kind: the user asked for it, and reading it reports any problem.
    ``~`` is expanded.

    Discovery never follows links to folders (a folder named explicitly, or the fixed start of
    a pattern, may itself be a link): link loops cannot make it endless and every image is
    found under the folder it was searched from. Links to files are listed under their own
    name, and so is a broken or looping link, so that reading it fails for that one image with
    a message naming the link. FIFOs, devices and sockets found while searching are skipped
    with a logged warning (reading one could hang or never end).

    Args:
        inputs (`str`, `os.PathLike` or a list of them): files, folders and glob patterns.
        recursive (`bool`, defaults to `True`): search sub-folders of folders.
        exclude (list of `str` or `os.PathLike`, defaults to `()`): folders whose files are
            never listed, e.g. the output folder, so results are not read back as inputs.
            This includes files named explicitly, and links whose target lies there.

    Returns:
        `list[pathlib.Path]`: the images, sorted, each once, as found (not resolved).

    Raises:
        FileNotFoundError: a path that does not exist, or a pattern that matches no image.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    excluded = [_real(os.path.expanduser(os.fspath(e))) for e in exclude]
    found: dict[str, Path] = {}
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        path = Path(text)
        pattern = False
        if path.is_dir():
            matches = _scan_folder(path, recursive, excluded)
        elif os.path.lexists(path):
            matches = [path]
        elif _GLOB_CHARS & set(text):
            pattern = True
            matches = []
            scanned: list[str] = []
            for m in _expand(text):
                if m.is_dir() and not m.is_symlink():  # "photos/*" also means images in sub-folders
                    real = _real(m)
                    if recursive and any(_is_under(real, s) for s in scanned):
                        continue  # already searched as part of a folder above it
                    scanned.append(real)
                    matches.extend(_scan_folder(m, recursive, excluded))
                elif not m.is_dir() and _is_image_name(m.name) and _listable(m):
                    matches.append(m)
        else:
            raise FileNotFoundError(f"{text}: no such file or folder")
        matches = _drop_excluded(matches, excluded)
        if pattern and not matches:
            raise FileNotFoundError(f"{text}: pattern matches no image files")
        for m in sorted(matches):
            found.setdefault(_real(m), m)
    return sorted(found.values())


def _drop_excluded(paths: list[Path], excluded: Sequence[str]) -> list[Path]:
    if not excluded:
        return paths
    return [
        p
        for p in paths
        if not any(_is_under(_entry(p), e) or _is_under(_real(p), e) for e in excluded)
    ]


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def check_output_not_input(
    inputs: str | os.PathLike | Sequence[str | os.PathLike], output_dir: str | os.PathLike
) -> None:
    """Refuse an output folder that is, lies inside, or holds one of the inputs.

    Writing results into an input folder would put them among the originals and let a later
    run read them back as inputs; an output folder that is an input file cannot be created.
    Paths are compared after resolving links and ``..``. For a glob pattern, the files and
    folders it matches are checked.

    Args:
        inputs (`str`, `os.PathLike` or a list of them): the files, folders and glob patterns
            given to :func:`find_images`.
        output_dir (`str` or `os.PathLike`): the output folder (it need not exist yet).

    Raises:
        ValueError: the output folder is an input folder or an input file, lies inside an
            input folder, or holds an input.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = _real(os.path.expanduser(os.fspath(output_dir)))
    for item in inputs:
        text = os.path.expanduser(os.fspath(item))
        if os.path.lexists(text) or not _GLOB_CHARS & set(text):
            candidates: Iterable[Path] = [Path(text)]
        else:
            candidates = _expand(text)
        for path in candidates:
            if not os.path.lexists(path):
                continue  # find_images reports it
            real = _real(path)
            where = f"the output folder {output_dir}"
            if os.path.isdir(path):
                if out == real:
                    raise ValueError(f"{where} is the input folder {path}; choose another folder")
                if _is_under(out, real):
                    raise ValueError(
                        f"{where} lies inside the input folder {path}; choose a folder outside it"
                    )
                if _is_under(real, out):
                    raise ValueError(
                        f"{where} holds the input folder {path}; choose another folder"
                    )
            else:
                if out in (real, _entry(path)):
                    raise ValueError(f"{where} is the input file {path}; give a folder")
                if _is_under(real, out) or _is_under(_entry(path), out):
                    raise ValueError(f"{where} holds the input file {path}; choose another folder")


def output_paths(
    paths: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    *,
    suffix: str | None = None,
) -> list[Path]:
    """Map input images to output paths under `output_dir`, mirroring their sub-folders.

    Paths are taken relative to the deepest folder that holds all inputs, so
    ``in/a.png, in/sub/b.png -> out/a.png, out/sub/b.png`` and two inputs never share an output.
    The layout follows the paths as given (``..`` is collapsed, links are not followed), so a
    link to a file elsewhere does not move the other outputs. An output that would replace an
    input (or the file an input links to) is refused, whatever links or ``..`` lead there.

    Args:
        paths (`list` of paths): the inputs, e.g. from :func:`find_images`.
        output_dir (`str` or `os.PathLike`): the output folder.
        suffix (`str`, *optional*): replace each suffix (e.g. ".png"); keep it by default.

    Returns:
        `list[pathlib.Path]`: one output path per input, in the same order.

    Raises:
        ValueError: an unsupported `suffix`, two inputs that would be written to one file
            (e.g. ``a.jpg`` and ``a.png`` with ``suffix=".png"``), or an output that would be
            written over an input.
    """
    if suffix is not None:
        suffix = suffix if suffix.startswith(".") else f".{suffix}"
        if suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"`suffix` must be one of {', '.join(IMAGE_SUFFIXES)}, got {suffix!r}")
    # abspath, not resolve: ".." is collapsed (no output can climb out of `output_dir`) but
    # links are not followed (a link's target does not re-root the layout).
    absolute = [Path(os.path.abspath(p)) for p in paths]
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
    sources: dict[str, Path] = {}
    for src in paths:
        sources.setdefault(_entry(src), Path(src))
        sources.setdefault(_real(src), Path(src))
    for dst in outputs:
        src = sources.get(_entry(dst))
        if src is not None:
            raise ValueError(
                f"output {dst} would be written over the input {src}; choose another output folder"
            )
    return outputs
