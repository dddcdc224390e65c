"""Tests of finding inputs, mapping outputs and writing files (raim_diffusion.files)."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from pathlib import Path

import pytest

from raim_diffusion import files
from raim_diffusion.errors import InvalidImageError
from raim_diffusion.files import (
    atomic_write,
    check_output_not_input,
    clean_stale_temps,
    find_images,
    output_paths,
)
from raim_diffusion.images import load_image

needs_symlinks = pytest.mark.skipif(
    sys.platform == "win32", reason="symbolic links need privileges on Windows"
)
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")


def _touch(root: Path, *rels: str) -> None:
    for rel in rels:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")


def _rel(paths: list[Path], root: Path) -> list[str]:
    return [p.relative_to(root).as_posix() for p in paths]


def _finishes(fn, timeout: float = 20.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it does not return in time."""
    result: dict = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"did not finish within {timeout} s (hang)"
    if "error" in result:
        raise result["error"]
    return result["value"]


# --------------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------------


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="disk on fire"), atomic_write(target) as f:
        f.write(b"half of the data")
        f.flush()
        raise RuntimeError("disk on fire")
    assert list(tmp_path.iterdir()) == []
    # an existing file is left exactly as it was
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as f:
        f.write(b"new but partial")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    with atomic_write(target) as f:
        f.write(b"new")
        assert target.read_bytes() == b"old"  # nothing visible under the name until the end
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]


def test_atomic_write_text_mode_and_permissions(tmp_path: Path) -> None:
    with atomic_write(tmp_path / "deep" / "r.csv", "w", newline="") as f:
        f.write("a,é\r\n")
    assert (tmp_path / "deep" / "r.csv").read_bytes() == "a,é\r\n".encode()
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    assert os.stat(tmp_path / "deep" / "r.csv").st_mode == os.stat(plain).st_mode
    with pytest.raises(ValueError, match="`mode`"), atomic_write(tmp_path / "x", "a"):
        pass


def test_atomic_write_over_a_folder_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "result.png"
    target.mkdir()
    (target / "inside.txt").write_text("keep")
    body_ran = False
    with (
        pytest.raises(IsADirectoryError, match=r"result\.png") as info,
        atomic_write(target) as f,
    ):
        body_ran = True
        f.write(b"data")
    assert info.value.filename == str(target)
    assert not body_ran  # refused before anything was encoded or written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.png"]  # no temp left
    assert [p.name for p in target.iterdir()] == ["inside.txt"]


def test_clean_stale_temps(tmp_path: Path) -> None:
    old = time.time() - 7200
    stale = [".a.png.0123abcd.tmp", "sub/deeper/.b.report.json.deadbeef.tmp"]
    kept = [
        "a.png",
        ".a.png.0123ABCD.tmp",  # upper-case hex: not a name atomic_write gives
        ".a.png.0123abc.tmp",  # 7 hex digits
        "a.png.0123abcd.tmp",  # not hidden
        ".a.png.0123abcd.tmp.bak",
        "sub/.c.png.0123abcd.tmpx",
    ]
    _touch(tmp_path, *stale, *kept)
    for rel in stale + kept:
        os.utime(tmp_path / rel, (old, old))
    fresh = ".d.png.00ff00ff.tmp"  # a concurrent run's live temp file
    _touch(tmp_path, fresh)
    assert clean_stale_temps(tmp_path) == 2
    remaining = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert remaining == {*kept, fresh}
    assert clean_stale_temps(tmp_path, older_than=0) == 1  # now the fresh one is stale too
    assert clean_stale_temps(tmp_path / "missing") == 0
    with pytest.raises(ValueError, match="`older_than`"):
        clean_stale_temps(tmp_path, older_than=-1)


@needs_symlinks
def test_clean_stale_temps_does_not_follow_or_remove_links(tmp_path: Path) -> None:
    old = time.time() - 7200
    outside = tmp_path / "outside"
    _touch(outside, ".x.png.0123abcd.tmp")
    os.utime(outside / ".x.png.0123abcd.tmp", (old, old))
    out = tmp_path / "out"
    out.mkdir()
    (out / "linked").symlink_to(outside, target_is_directory=True)
    (out / ".y.png.0123abcd.tmp").symlink_to(outside / ".x.png.0123abcd.tmp")
    assert clean_stale_temps(out) == 0
    assert (outside / ".x.png.0123abcd.tmp").exists()
    assert (out / ".y.png.0123abcd.tmp").is_symlink()


def test_clean_stale_temps_removes_what_a_killed_write_left(tmp_path: Path) -> None:
    # A real atomic_write stopped mid-write with no cleanup (as when the process is killed):
    # the temp file it leaves must match what clean_stale_temps looks for.
    target = tmp_path / "out" / "photo.png"
    killed = atomic_write(target)
    f = killed.__enter__()
    f.write(b"half")
    f.close()
    leftovers = list(target.parent.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".photo.png.")
    assert clean_stale_temps(target.parent) == 0  # too young: might be a live write
    os.utime(leftovers[0], (time.time() - 3601, time.time() - 3601))
    assert clean_stale_temps(target.parent) == 1
    assert list(target.parent.iterdir()) == [] and not target.exists()
    del killed


# --------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------


def test_find_images(tmp_path: Path) -> None:
    for rel in [
        "b.png",
        "a.JPG",
        "notes.txt",
        "sub/c.webp",
        "sub/deeper/d.tiff",
        "sub/e.bmp",
        ".hidden.png",
        "._a.jpg",
        ".cache/x.png",
        "sub/f.jpeg",
        "sub/g.tif",
    ]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    names = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert names == [
        "a.JPG",
        "b.png",
        "sub/c.webp",
        "sub/deeper/d.tiff",
        "sub/e.bmp",
        "sub/f.jpeg",
        "sub/g.tif",
    ]
    assert [p.name for p in find_images(tmp_path, recursive=False)] == ["a.JPG", "b.png"]
    assert [p.name for p in find_images([str(tmp_path / "sub" / "*.*")])] == [
        "c.webp",
        "e.bmp",
        "f.jpeg",
        "g.tif",
    ]
    assert len(find_images(str(tmp_path / "**" / "*.tif*"))) == 2
    # a pattern matching folders searches them
    assert [p.name for p in find_images(str(tmp_path / "su*"), recursive=False)] == [
        "c.webp",
        "e.bmp",
        "f.jpeg",
        "g.tif",
    ]
    # explicit files are kept whatever their suffix; duplicates appear once
    got = find_images([tmp_path / "notes.txt", tmp_path / "b.png", tmp_path, tmp_path / "b.png"])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == [
        "a.JPG",
        "b.png",
        "notes.txt",
        "sub/c.webp",
        "sub/deeper/d.tiff",
        "sub/e.bmp",
        "sub/f.jpeg",
        "sub/g.tif",
    ]
    with pytest.raises(FileNotFoundError, match="nope.png: no such file or folder"):
        find_images([tmp_path / "b.png", tmp_path / "nope.png"])
    with pytest.raises(FileNotFoundError, match="matches no image"):
        find_images(str(tmp_path / "*.gif"))
    # a hidden folder named explicitly is searched (only hidden entries inside are skipped)
    assert find_images(tmp_path / ".cache") == [tmp_path / ".cache" / "x.png"]


def test_output_paths(tmp_path: Path) -> None:
    inputs = [tmp_path / "in" / "a.jpg", tmp_path / "in" / "sub" / "a.jpg"]
    outs = output_paths(inputs, tmp_path / "out", suffix="png")
    assert outs == [tmp_path / "out" / "a.png", tmp_path / "out" / "sub" / "a.png"]
    assert output_paths([tmp_path / "x.tif"], "o") == [Path("o") / "x.tif"]
    with pytest.raises(ValueError, match="both be written"):
        output_paths([tmp_path / "a.jpg", tmp_path / "a.png"], tmp_path, suffix=".png")
    with pytest.raises(ValueError, match="`suffix`"):
        output_paths(inputs, tmp_path, suffix=".gif")
    assert output_paths([], tmp_path) == []


@needs_symlinks
def test_find_images_does_not_follow_folder_links(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _touch(root, "real/a.png", "b.png")
    _touch(tmp_path, "elsewhere/secret.png")
    (root / "alias").symlink_to(root / "real", target_is_directory=True)
    (root / "away").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    # self-referencing folder links: following them, "**" would never end
    (root / "loop1").symlink_to(root, target_is_directory=True)
    (root / "real" / "loop2").symlink_to(root, target_is_directory=True)
    expected = ["b.png", "real/a.png"]
    assert _rel(_finishes(lambda: find_images(root)), root) == expected
    for pattern in ("**/*.png", "**", "*", "*/*.png", "**/a.png"):
        found = _finishes(lambda pattern=pattern: find_images(str(root / pattern)))
        assert set(_rel(found, root)) <= set(expected), pattern
        assert "real/a.png" in _rel(found, root), pattern
    # a link named explicitly (or as the fixed start of a pattern) is what the user asked for
    assert _rel(find_images(root / "alias"), root) == ["alias/a.png"]
    assert _rel(find_images(str(root / "away" / "*.png")), root) == ["away/secret.png"]


@needs_symlinks
def test_find_images_lists_bad_file_links_so_each_fails_on_its_own(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _touch(root, "a.png", "../target.png")
    (root / "dangling.png").symlink_to(root / "gone.png")
    (root / "looping.png").symlink_to(root / "looping.png")
    (root / "ext.png").symlink_to(tmp_path / "target.png")
    found = _finishes(lambda: find_images(root))
    assert _rel(found, root) == ["a.png", "dangling.png", "ext.png", "looping.png"]
    assert _rel(find_images(str(root / "*.png")), root) == _rel(found, root)
    assert find_images(root / "dangling.png") == [root / "dangling.png"]
    with pytest.raises(InvalidImageError, match=r"dangling\.png: is a broken symbolic link"):
        load_image(root / "dangling.png")
    with pytest.raises(InvalidImageError, match=r"looping\.png: is a symbolic link loop"):
        load_image(root / "looping.png")


@needs_fifo
def test_find_images_skips_special_files_unless_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _touch(tmp_path, "a.png")
    os.mkfifo(tmp_path / "pipe.png")
    if os.path.exists("/dev/zero"):
        (tmp_path / "zero.png").symlink_to("/dev/zero")
    caplog.set_level(logging.WARNING, logger=files.logger.name)
    assert _finishes(lambda: find_images(tmp_path)) == [tmp_path / "a.png"]
    assert _finishes(lambda: find_images(str(tmp_path / "*.png"))) == [tmp_path / "a.png"]
    assert "pipe.png: a FIFO" in caplog.text
    # named explicitly: listed, and reading it fails for that image alone, without hanging
    assert find_images(tmp_path / "pipe.png") == [tmp_path / "pipe.png"]
    with pytest.raises(InvalidImageError, match=r"pipe\.png: is a FIFO"):
        _finishes(lambda: load_image(tmp_path / "pipe.png"))
    if os.path.exists("/dev/zero"):
        assert "zero.png: a character device" in caplog.text
        with pytest.raises(InvalidImageError, match=r"zero\.png: is a character device"):
            _finishes(lambda: load_image(tmp_path / "zero.png"))


def test_find_images_exclude(tmp_path: Path) -> None:
    _touch(tmp_path, "a.png", "sub/b.png", "out/a.png", "out/sub/b.png", "outer/c.png")
    expected = ["a.png", "outer/c.png", "sub/b.png"]
    out = tmp_path / "out"
    assert _rel(find_images(tmp_path, exclude=[out]), tmp_path) == expected
    assert _rel(find_images(str(tmp_path / "**" / "*.png"), exclude=[out]), tmp_path) == expected
    assert _rel(find_images(str(tmp_path / "*"), exclude=[out]), tmp_path) == expected
    assert find_images([tmp_path / "a.png", out / "a.png"], exclude=[out]) == [tmp_path / "a.png"]
    # the excluded folder given by another spelling of its path
    other = tmp_path / "sub" / ".." / "out"
    assert _rel(find_images(tmp_path, exclude=[other]), tmp_path) == expected
    with pytest.raises(FileNotFoundError, match="matches no image"):
        find_images(str(out / "*.png"), exclude=[out])


@needs_symlinks
def test_find_images_exclude_sees_through_links(tmp_path: Path) -> None:
    _touch(tmp_path, "in/a.png", "out/result.png")
    (tmp_path / "in" / "result.png").symlink_to(tmp_path / "out" / "result.png")
    (tmp_path / "out_alias").symlink_to(tmp_path / "out", target_is_directory=True)
    got = find_images(tmp_path / "in", exclude=[tmp_path / "out_alias"])
    assert got == [tmp_path / "in" / "a.png"]


# --------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------


def test_output_paths_collapse_dotdot_so_no_output_lands_on_an_input(tmp_path: Path) -> None:
    _touch(tmp_path, "in/a.png", "outside/secret.png")
    inputs = [tmp_path / "in" / "a.png", tmp_path / "in/../outside/secret.png"]
    assert set(find_images(inputs)) == set(inputs)  # found as spelled
    out = tmp_path / "x"
    outs = output_paths(inputs, out)
    assert outs == [out / "in" / "a.png", out / "outside" / "secret.png"]
    for o in outs:
        assert Path(os.path.realpath(o)).is_relative_to(os.path.realpath(out))
    # relative inputs work the same
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert output_paths(["in/a.png", "in/../outside/secret.png"], "x") == [
            Path("x/in/a.png"),
            Path("x/outside/secret.png"),
        ]
    finally:
        os.chdir(cwd)


def test_output_paths_refuses_writing_over_an_input(tmp_path: Path) -> None:
    _touch(tmp_path, "in/a.png", "in/sub/b.png")
    inputs = [tmp_path / "in" / "a.png", tmp_path / "in" / "sub" / "b.png"]
    with pytest.raises(ValueError, match=r"written over the input .*a\.png"):
        output_paths(inputs, tmp_path / "in")
    with pytest.raises(ValueError, match=r"written over the input .*b\.png"):
        output_paths([tmp_path / "in" / "sub" / "b.png"], tmp_path / "in" / "sub")
    # another suffix is another file
    assert output_paths(inputs, tmp_path / "in", suffix=".jpg")[0] == tmp_path / "in" / "a.jpg"


@needs_symlinks
def test_output_paths_sees_through_links_but_lays_out_by_the_found_path(tmp_path: Path) -> None:
    _touch(tmp_path, "in/a.png", "in/sub/b.png", "far/away/deep/x.png")
    (tmp_path / "in" / "ext.png").symlink_to(tmp_path / "far" / "away" / "deep" / "x.png")
    inputs = find_images(tmp_path / "in")
    assert _rel(inputs, tmp_path) == ["in/a.png", "in/ext.png", "in/sub/b.png"]
    out = tmp_path / "out"
    # the link's target does not re-root the layout
    assert output_paths(inputs, out) == [out / "a.png", out / "ext.png", out / "sub" / "b.png"]
    # an output folder that is the input folder under another name
    (tmp_path / "alias").symlink_to(tmp_path / "in", target_is_directory=True)
    with pytest.raises(ValueError, match="written over the input"):
        output_paths(inputs, tmp_path / "alias")
    # an input link whose target is where the output would go: writing would destroy it
    _touch(tmp_path, "out2/link.png")
    (tmp_path / "in2").mkdir()
    (tmp_path / "in2" / "link.png").symlink_to(tmp_path / "out2" / "link.png")
    with pytest.raises(ValueError, match=r"written over the input .*link\.png"):
        output_paths([tmp_path / "in2" / "link.png"], tmp_path / "out2")


def test_check_output_not_input(tmp_path: Path) -> None:
    _touch(tmp_path, "in/a.png", "in/sub/b.png", "photo.png")
    inp = tmp_path / "in"
    check_output_not_input([inp], tmp_path / "out")  # siblings are fine
    check_output_not_input(str(tmp_path / "photo.png"), tmp_path / "out")
    cases = [
        ([inp], inp, "is the input folder"),
        ([inp], tmp_path / "in" / "sub" / "..", "is the input folder"),
        ([inp], inp / "restored", "lies inside the input folder"),
        ([inp], inp / "sub", "lies inside the input folder"),
        ([tmp_path / "photo.png"], tmp_path / "photo.png", "is the input file"),
        ([inp / "sub" / "b.png"], inp, "holds the input file"),
        ([inp / "sub"], inp, "holds the input folder"),
        ([str(inp / "*.png")], inp, "holds the input file"),
        ([str(tmp_path / "*")], inp / "restored", "lies inside the input folder"),
        ([str(tmp_path / "**" / "*.png")], tmp_path / "in" / "sub", "holds the input file"),
    ]
    for inputs, output, problem in cases:
        with pytest.raises(ValueError, match=problem):
            check_output_not_input(inputs, output)
    # a pattern is checked against what it matches, not the folder it starts from
    check_output_not_input([str(tmp_path / "*.png")], tmp_path / "out")
    check_output_not_input([tmp_path / "missing"], tmp_path / "out")  # find_images reports it


@needs_symlinks
def test_check_output_not_input_sees_through_links(tmp_path: Path) -> None:
    _touch(tmp_path, "in/a.png")
    (tmp_path / "alias").symlink_to(tmp_path / "in", target_is_directory=True)
    with pytest.raises(ValueError, match="is the input folder"):
        check_output_not_input([tmp_path / "in"], tmp_path / "alias")
    with pytest.raises(ValueError, match="lies inside the input folder"):
        check_output_not_input([tmp_path / "alias"], tmp_path / "in" / "out")
