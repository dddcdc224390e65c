"""Tests of the blind user study: page building, scoring rules, and the page in a real browser."""

from __future__ import annotations

import json
import shutil
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raim_diffusion.metrics.study import (
    StudyError,
    build_study,
    load_judge_file,
    score_study,
    write_study,
)

METHODS = ("secret_alpha", "secret_beta", "secret_gamma", "secret_delta")
SAMPLES = ("s1", "s2", "s3")


@pytest.fixture
def study_dirs(tmp_path) -> tuple[dict[str, Path], Path]:
    """Three tiny samples; method k brightens the input by 10*k (content differs per method)."""
    rng = np.random.default_rng(0)
    inputs = tmp_path / "input"
    inputs.mkdir()
    methods = {m: tmp_path / m for m in METHODS}
    for sample in SAMPLES:
        base = rng.integers(0, 200, size=(24, 32, 3), dtype=np.uint8)
        Image.fromarray(base[::2, ::2]).save(inputs / f"{sample}.png")
        for k, folder in enumerate(methods.values()):
            folder.mkdir(exist_ok=True)
            Image.fromarray(base + np.uint8(10 * k)).save(folder / f"{sample}.png")
    return methods, inputs


def _write_judge(path: Path, key: dict, judge: str, picks: dict) -> Path:
    data = {
        "format": "raim-study-picks",
        "version": 1,
        "study_id": key["study_id"],
        "judge": judge,
        "top_k": key["top_k"],
        "picks": picks,
    }
    path.write_text(json.dumps(data))
    return path


def _labels_for(key: dict, sample: str, methods: list[str]) -> list[str]:
    inverse = {m: label for label, m in key["samples"][sample].items()}
    return [inverse[m] for m in methods]


# ---------------------------------------------------------------- building


def test_page_hides_method_names_and_is_self_contained(study_dirs):
    methods, inputs = study_dirs
    page, key = build_study(methods, inputs, generator=torch.Generator().manual_seed(1))
    for m in METHODS:
        assert m not in page
    assert "http://" not in page and "https://" not in page and 'src="http' not in page
    assert page.count("data:image/jpeg;base64,") == len(SAMPLES) * (len(METHODS) + 1)
    assert set(key["samples"]) == set(SAMPLES)
    for mapping in key["samples"].values():
        assert sorted(mapping) == ["A", "B", "C", "D"] and sorted(mapping.values()) == sorted(
            METHODS
        )
    assert key["study_id"] in page and key["top_k"] == 3


def test_order_is_seeded(study_dirs):
    methods, inputs = study_dirs
    orders = {}
    for seed in (0, 0, 1, 2, 3):
        _, key = build_study(methods, inputs, generator=torch.Generator().manual_seed(seed))
        orders.setdefault(seed, []).append(key["samples"])
    assert orders[0][0] == orders[0][1]
    assert len({json.dumps(v[0], sort_keys=True) for v in orders.values()}) > 1


def test_build_errors(study_dirs, tmp_path):
    methods, inputs = study_dirs
    (methods["secret_beta"] / "s2.png").unlink()
    with pytest.raises(StudyError, match="secret_beta: s2"):
        build_study(methods, inputs)
    with pytest.raises(ValueError, match="top_k"):
        build_study({"a": methods["secret_alpha"], "b": methods["secret_gamma"]}, inputs, top_k=3)
    with pytest.raises(StudyError, match="not a folder"):
        build_study([str(tmp_path / "nope"), *map(str, methods.values())], inputs)


def test_write_study_named_dirs_and_png(study_dirs, tmp_path):
    methods, inputs = study_dirs
    entries = [f"M{i}={path}" for i, path in enumerate(methods.values())]
    page, key = write_study(
        tmp_path / "out" / "study.html",
        tmp_path / "keys" / "k.json",
        entries,
        inputs,
        image_format="png",
        max_side=16,
    )
    text = page.read_text()
    assert "data:image/png;base64," in text and "M0" not in text.split("<script")[0]
    saved = json.loads(key.read_text())
    assert saved["methods"] == ["M0", "M1", "M2", "M3"] and saved["study_id"] in text


# File names that would break a page that embeds them carelessly: each closes the data script,
# opens a comment or a script, or is an HTML entity, a quote or a JavaScript line break.
TRICKY_STEMS = (
    "<!--<script>",
    "x</script><script>alert(1)</script>",
    "</SCRIPT >",
    "a&amp;b & c",
    "quote\"s 'and' `ticks`",
    "line\u2028sep\u2029end",
    "__DATA__ __TITLE__",
)


def _save_tricky(folder: Path, stem: str, arr: np.ndarray) -> None:
    # a "/" in a stem is a sub-folder: stems are paths relative to the study's folders
    path = folder / f"{stem}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def tricky_dirs(tmp_path) -> tuple[dict[str, Path], Path]:
    rng = np.random.default_rng(5)
    inputs = tmp_path / "in"
    methods = {"</script><!--": tmp_path / "m1", 'a&b"c': tmp_path / "m2"}
    for stem in TRICKY_STEMS:
        base = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
        _save_tricky(inputs, stem, base)
        for k, folder in enumerate(methods.values()):
            _save_tricky(folder, stem, base // (k + 2))
    return methods, inputs


class _PageParser(HTMLParser):
    """The page as an HTML parser sees it: each script's text, and the title's."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.scripts: list[tuple[dict, str]] = []
        self.titles: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "title"):
            self._in = tag
            if tag == "script":
                self.scripts.append((dict(attrs), ""))
            else:
                self.titles.append("")

    def handle_endtag(self, tag):
        if tag == self._in:
            self._in = None

    def handle_data(self, data):
        if self._in == "script":
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)
        elif self._in == "title":
            self.titles[-1] += data


def test_file_names_cannot_break_out_of_the_embedded_json(tricky_dirs):
    methods, inputs = tricky_dirs
    title = "</title><script>alert('t')</script> & __DATA__"
    page, key = build_study(methods, inputs, top_k=2, title=title)

    parser = _PageParser()
    parser.feed(page)
    parser.close()
    # exactly the two scripts of the template: the data, then the code that reads it
    assert [attrs.get("id") for attrs, _ in parser.scripts] == ["study-data", None]
    text = parser.scripts[0][1]
    start = page.index('<script type="application/json" id="study-data">') + len(
        '<script type="application/json" id="study-data">'
    )
    assert page[start : start + len(text) + len("</script>")] == text + "</script>"
    for ch in "<>&\u2028\u2029":
        assert ch not in text
    data = json.loads(text)
    assert [s["id"] for s in data["samples"]] == sorted(TRICKY_STEMS)
    assert data["title"] == title and data["study_id"] == key["study_id"]
    assert "JSON.parse" in parser.scripts[1][1]  # the code after the data is still code
    assert parser.titles == [title]  # the title is text, and its placeholder stays literal
    assert set(key["samples"]) == set(TRICKY_STEMS)
    for m in methods:
        assert m not in page and json.dumps(m)[1:-1] not in page


# ---------------------------------------------------------------- scoring


@pytest.fixture
def key(study_dirs) -> dict:
    methods, inputs = study_dirs
    return build_study(methods, inputs, generator=torch.Generator().manual_seed(3))[1]


def test_scores_by_hand(key, tmp_path):
    a, b, g, d = METHODS
    # judge 1: alpha > beta > gamma on every sample; judge 2: beta > alpha > delta everywhere.
    j1 = {s: _labels_for(key, s, [a, b, g]) for s in SAMPLES}
    j2 = {s: _labels_for(key, s, [b, a, d]) for s in SAMPLES}
    files = [
        _write_judge(tmp_path / "j1.json", key, "ann", j1),
        _write_judge(tmp_path / "j2.json", key, "bob", j2),
    ]
    res = score_study(files, key)
    # per judge totals over 3 samples: j1 a=9 b=6 g=3; j2 b=9 a=6 d=3 -> averaged over 2 judges
    assert res.s3 == {a: 7.5, b: 7.5, g: 1.5, d: 1.5}
    assert res.s3n == {a: 1.0, b: 1.0, g: 0.0, d: 0.0}
    assert res.rank == {a: 1, b: 1, g: 3, d: 3}  # ties share a rank, the next one is skipped
    assert res.first_picks == {a: 1.5, b: 1.5, g: 0.0, d: 0.0}
    assert res.judges == ["ann", "bob"]

    s2 = {a: 0.2, b: 0.9, g: 0.5, d: 0.5}
    res = score_study(files, key, s2)
    assert res.final == pytest.approx({a: 0.68, b: 0.96, g: 0.2, d: 0.2})
    assert res.rank == {b: 1, a: 2, g: 3, d: 3}
    res = score_study(files, key, s2, normalize_s2=True)  # s2n: a=0, b=1, g=d=3/7
    assert res.final == pytest.approx({a: 0.6, b: 1.0, g: 0.4 * 3 / 7, d: 0.4 * 3 / 7})
    assert "secret_beta" in res.format_table() and set(res.to_dict()["methods"]) == set(METHODS)


def test_empty_judge_name_uses_file_stem(key, tmp_path):
    a, b, g, d = METHODS
    cycle = [[a, b, g], [d, a, b], [g, d, a]]
    picks = {s: _labels_for(key, s, c) for s, c in zip(SAMPLES, cycle, strict=True)}
    res = score_study([_write_judge(tmp_path / "j.json", key, "  ", picks)], key)
    assert res.judges == ["j"]
    assert res.s3 == {a: 6.0, b: 3.0, g: 4.0, d: 5.0}
    assert res.s3n == pytest.approx({a: 1.0, b: 0.0, g: 1 / 3, d: 2 / 3})
    assert res.rank == {a: 1, d: 2, g: 3, b: 4}


def test_constant_s3_gives_one_for_everyone(tmp_path):
    key = {
        "format": "raim-study-key",
        "study_id": "x",
        "top_k": 1,
        "methods": ["m1", "m2"],
        "samples": {"p": {"A": "m1", "B": "m2"}, "q": {"A": "m2", "B": "m1"}},
    }
    f = _write_judge(tmp_path / "j.json", key, "j", {"p": ["A"], "q": ["A"]})
    res = score_study([f], key, {"m1": 1.0, "m2": 0.0})
    assert res.s3 == {"m1": 1.0, "m2": 1.0} and res.s3n == {"m1": 1.0, "m2": 1.0}
    assert res.final == {"m1": 1.0, "m2": 0.6} and res.rank == {"m1": 1, "m2": 2}


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p.pop("s2"), r"sample 's2' has no picks"),
        (lambda p: p["s1"].pop(), r"sample 's1' has 2 pick\(s\), 3 are required"),
        (lambda p: p.__setitem__("s3", [p["s3"][0]] * 3), r"sample 's3': duplicate picks"),
        (lambda p: p.__setitem__("zzz", ["A", "B", "C"]), r"unknown sample\(s\) \['zzz'\]"),
        (
            lambda p: p.__setitem__("s1", ["A", "B", "Q"]),
            r"sample 's1': unknown label\(s\) \['Q'\]",
        ),
    ],
)
def test_bad_judge_files_are_rejected_naming_file_and_sample(key, tmp_path, mutate, message):
    picks = {s: ["A", "B", "C"] for s in SAMPLES}
    mutate(picks)
    path = _write_judge(tmp_path / "judge7.json", key, "judge7", picks)
    with pytest.raises(StudyError, match=message) as err:
        score_study([path], key)
    assert "judge7.json" in str(err.value)


def test_other_rejections(key, tmp_path):
    picks = {s: ["A", "B", "C"] for s in SAMPLES}
    good = _write_judge(tmp_path / "a.json", key, "same", picks)
    twin = _write_judge(tmp_path / "b.json", key, "same", picks)
    with pytest.raises(StudyError, match="already given"):
        score_study([good, twin], key)
    other = _write_judge(tmp_path / "c.json", dict(key, study_id="other"), "c", picks)
    with pytest.raises(StudyError, match="belongs to study 'other'"):
        load_judge_file(other, key)
    (tmp_path / "d.json").write_text("{not json")
    with pytest.raises(StudyError, match="d.json.*not readable JSON"):
        load_judge_file(tmp_path / "d.json", key)
    with pytest.raises(StudyError, match="missing \\['secret_delta'\\]"):
        score_study([good], key, {m: 1.0 for m in METHODS[:3]})


def test_cli_build_and_score(study_dirs, tmp_path, capsys):
    from raim_diffusion.cli import main

    methods, inputs = study_dirs
    page = tmp_path / "page.html"
    assert (
        main(
            [
                "study",
                "build",
                *map(str, methods.values()),
                "--input",
                str(inputs),
                "-o",
                str(page),
                "--seed",
                "5",
            ]
        )
        == 0
    )
    key_path = tmp_path / "page.key.json"
    key = json.loads(key_path.read_text())
    j = _write_judge(
        tmp_path / "j.json",
        key,
        "j",
        {s: _labels_for(key, s, ["secret_gamma", "secret_alpha", "secret_beta"]) for s in SAMPLES},
    )
    out_json = tmp_path / "scores.json"
    s2 = [f"{m}={i}" for i, m in enumerate(METHODS)]
    assert (
        main(
            ["study", "score", str(j), "--key", str(key_path), "--s2", *s2, "--json", str(out_json)]
        )
        == 0
    )
    scores = json.loads(out_json.read_text())["methods"]
    assert scores["secret_gamma"]["S3"] == 9.0 and scores["secret_delta"]["S3n"] == 0.0
    assert scores["secret_gamma"]["final"] == pytest.approx(0.4 * 2 + 0.6)
    capsys.readouterr()
    assert main(["study", "score", str(j), "--key", str(key_path), "--s2", "oops"]) == 2
    assert "METHOD=NUMBER" in capsys.readouterr().err


def _one_line_error(capsys, command: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith(f"raim {command}: ") and "\n" not in err, captured.err
    assert "Traceback" not in captured.err
    return err


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if `raim study build` gets as far as reading images."""
    import raim_diffusion.metrics.study as study

    def reached(*args, **kwargs):
        raise AssertionError("write_study was reached; the error must come before it")

    monkeypatch.setattr(study, "write_study", reached)


def _build_argv(study_dirs, *extra: str) -> list[str]:
    methods, inputs = study_dirs
    return ["study", "build", *map(str, methods.values()), "--input", str(inputs), *extra]


def test_cli_build_output_path_errors(study_dirs, tmp_path, no_build, capsys):
    from raim_diffusion.cli import main

    folder = tmp_path / "existing"
    folder.mkdir()
    assert main(_build_argv(study_dirs, "-o", str(folder))) == 2
    err = _one_line_error(capsys, "study build")
    assert str(folder) in err and "folder" in err

    blocker = tmp_path / "afile"
    blocker.write_text("x")
    inside = blocker / "page.html"
    assert main(_build_argv(study_dirs, "-o", str(inside))) == 2
    assert str(inside) in _one_line_error(capsys, "study build")

    page = tmp_path / "p.html"
    assert main(_build_argv(study_dirs, "-o", str(page), "--key", str(folder))) == 2
    assert f"--key {folder}" in _one_line_error(capsys, "study build")
    assert main(_build_argv(study_dirs, "-o", str(page), "--key", str(page))) == 2
    assert "page itself" in _one_line_error(capsys, "study build")

    _, inputs = study_dirs
    victim = inputs / "s1.png"
    before = victim.read_bytes()
    assert main(_build_argv(study_dirs, "-o", str(victim))) == 2
    assert str(victim) in _one_line_error(capsys, "study build")
    assert victim.read_bytes() == before

    assert main(_build_argv(study_dirs, "-o", str(page), "--seed", str(2**64))) == 2
    assert "--seed" in _one_line_error(capsys, "study build")
    assert not page.exists()


def test_cli_build_unwritable_output(study_dirs, tmp_path, no_build, capsys, monkeypatch):
    import os

    from raim_diffusion.cli import main

    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # Tests may run as root, where permission bits do not stop writing: deny it explicitly.
    monkeypatch.setattr(
        os,
        "access",
        lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw),
    )
    target = locked / "page.html"
    assert main(_build_argv(study_dirs, "-o", str(target))) == 2
    err = _one_line_error(capsys, "study build")
    assert str(target) in err and "not writable" in err


def test_cli_build_bad_inputs(study_dirs, tmp_path, capsys):
    from raim_diffusion.cli import main

    methods, inputs = study_dirs
    page = tmp_path / "p.html"
    (methods["secret_gamma"] / "s2.png").write_bytes(b"\x89PNG\r\n\x1a\n damaged")
    assert main(_build_argv(study_dirs, "-o", str(page))) == 2
    assert "s2.png" in _one_line_error(capsys, "study build")

    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["study", "build", *map(str, methods.values()), "--input", str(empty), "-o", str(page)]
    assert main(argv) == 2
    assert "holds no images" in _one_line_error(capsys, "study build")

    argv = ["study", "build", f"={methods['secret_alpha']}", str(methods["secret_beta"]),
            "--input", str(inputs), "-o", str(page), "--top-k", "2"]  # fmt: skip
    assert main(argv) == 2
    assert "NAME=DIR" in _one_line_error(capsys, "study build")
    assert not page.exists()


def test_cli_score_errors(key, tmp_path, capsys):
    from raim_diffusion.cli import main

    key_path = tmp_path / "k.json"
    key_path.write_text(json.dumps(key))
    picks = {s: ["A", "B", "C"] for s in SAMPLES}
    judge = _write_judge(tmp_path / "j.json", key, "j", picks)

    def score(*argv: str) -> str:
        assert main(["study", "score", *argv]) == 2
        return _one_line_error(capsys, "study score")

    folder = tmp_path / "folder"
    folder.mkdir()
    assert str(folder) in score(str(judge), "--key", str(key_path), "--json", str(folder))
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert str(blocker) in score(str(judge), "--key", str(key_path), "--json", f"{blocker}/s.json")
    before = key_path.read_text()
    assert "input file" in score(str(judge), "--key", str(key_path), "--json", str(key_path))
    assert "input file" in score(str(judge), "--key", str(key_path), "--json", str(judge))
    assert key_path.read_text() == before and json.loads(judge.read_text())["judge"] == "j"

    assert "not readable JSON" in score(str(judge), "--key", str(folder))
    (tmp_path / "junk.json").write_text('{"format": "raim-study-key", "samples": [')
    assert "not readable JSON" in score(str(judge), "--key", str(tmp_path / "junk.json"))
    assert "does not exist" in score(str(judge), "--key", str(tmp_path / "nope.json"))
    for damage in ("study_id", "methods", "top_k"):
        broken = tmp_path / f"no_{damage}.json"
        broken.write_text(json.dumps({k: v for k, v in key.items() if k != damage}))
        assert f"'{damage}'" in score(str(judge), "--key", str(broken))
    bad_sample = dict(key, samples=dict(key["samples"], s1={"A": "nobody"}))
    broken = tmp_path / "bad_sample.json"
    broken.write_text(json.dumps(bad_sample))
    assert "sample 's1'" in score(str(judge), "--key", str(broken))

    (tmp_path / "bad_judge.json").write_bytes(b"\xff\xfe not text")
    assert "bad_judge.json" in score(str(tmp_path / "bad_judge.json"), "--key", str(key_path))
    s2 = [f"{m}=1" for m in METHODS[:3]]
    assert "finite" in score(str(judge), "--key", str(key_path), "--s2", *s2, f"{METHODS[3]}=nan")
    assert "twice" in score(
        str(judge), "--key", str(key_path), "--s2", *s2, f"{METHODS[3]}=1", f"{METHODS[0]}=2"
    )


# ---------------------------------------------------------------- the page in a real browser

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


def _chrome(download_dir: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("chromium not installed (apt-get install -y chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--no-first-run",
        "--window-size=1200,900",
    ):
        opts.add_argument(flag)
    opts.add_experimental_option(
        "prefs",
        {"download.default_directory": str(download_dir), "download.prompt_for_download": False},
    )
    # An explicit driver path keeps Selenium Manager from trying to download anything.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def test_page_in_headless_chromium(study_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("SE_OFFLINE", "true")
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    methods, inputs = study_dirs
    page, key_path = write_study(
        tmp_path / "study.html",
        tmp_path / "study.key.json",
        methods,
        inputs,
        generator=torch.Generator().manual_seed(7),
    )
    key = json.loads(key_path.read_text())
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = _chrome(downloads)
    try:
        driver.get(page.resolve().as_uri())
        logs_ok = driver.execute_script("return typeof DATA === 'object' && DATA.samples.length")
        assert logs_ok == len(SAMPLES)

        def fig(label):
            return driver.find_element(By.CSS_SELECTOR, f'figure.cand[data-label="{label}"]')

        def keys(*k):
            ActionChains(driver).send_keys(*k).perform()

        # sample s1, mouse: A, B, unpick A, C, D -> [B, C, D]; a 4th pick is refused
        for label in ("A", "B", "A", "C", "D"):
            ActionChains(driver).move_to_element(fig(label)).click().perform()
        ActionChains(driver).move_to_element(fig("A")).click().perform()  # already 3 picks
        assert fig("B").find_element(By.CLASS_NAME, "badge").text == "1st"
        assert "picked" not in fig("A").get_attribute("class")
        # sample s2, keyboard: Right arrow, letters and a digit (2 = second shown = "B")
        keys(Keys.ARROW_RIGHT)
        assert driver.find_element(By.ID, "position").text == "2 / 3"
        keys("d", "a", "2")
        # sample s3: Next button, then keyboard, Backspace to clear, mouse + keys again
        driver.find_element(By.ID, "next").click()
        keys("c", Keys.BACKSPACE, "3", "1")
        ActionChains(driver).move_to_element(fig("D")).click().perform()
        assert "0 sample" not in driver.find_element(By.ID, "status").text
        assert driver.find_element(By.ID, "status").text == "all samples done"

        driver.find_element(By.ID, "judge").send_keys("Judge Dredd")
        driver.find_element(By.ID, "export").click()
        text = driver.find_element(By.ID, "export-text").get_attribute("value")
        downloaded = downloads / "picks-Judge_Dredd.json"
        for _ in range(100):  # the download completes asynchronously
            if downloaded.exists():
                break
            time.sleep(0.05)
    finally:
        driver.quit()

    exported = json.loads(text)
    assert exported["picks"] == {
        "s1": ["B", "C", "D"],
        "s2": ["D", "A", "B"],
        "s3": ["C", "A", "D"],
    }
    assert exported["judge"] == "Judge Dredd" and exported["complete"] is True
    assert exported["study_id"] == key["study_id"]
    judge_file = tmp_path / "judge.json"
    judge_file.write_text(text)
    res = score_study([judge_file], key_path)
    expected = dict.fromkeys(METHODS, 0.0)
    for sample, labels in exported["picks"].items():
        for points, label in zip((3, 2, 1), labels, strict=True):
            expected[key["samples"][sample][label]] += points
    assert res.s3 == expected
    assert json.loads(downloaded.read_text()) == exported  # the Blob download, same JSON


def test_tricky_file_names_in_headless_chromium(tricky_dirs, tmp_path, monkeypatch):
    """The browser reads the same sample names back, and runs only the page's own script."""
    monkeypatch.setenv("SE_OFFLINE", "true")
    methods, inputs = tricky_dirs
    page, _ = write_study(tmp_path / "t.html", tmp_path / "t.key.json", methods, inputs, top_k=2)
    driver = _chrome(tmp_path)
    try:
        driver.get(page.resolve().as_uri())
        ids = driver.execute_script("return DATA.samples.map(s => s.id)")
        scripts = driver.execute_script("return document.scripts.length")
        heading = driver.execute_script(
            "return document.getElementById('sample-title').textContent"
        )
    finally:
        driver.quit()
    assert ids == sorted(TRICKY_STEMS)
    assert scripts == 2
    assert heading == "Sample " + sorted(TRICKY_STEMS)[0]


def test_cli_build_with_two_methods_needs_no_top_k(study_dirs, tmp_path):
    """Judges pick 3 by default, or every method when there are fewer."""
    from raim_diffusion.cli import main

    methods, inputs = study_dirs
    two = list(methods.values())[:2]
    page, key = tmp_path / "two.html", tmp_path / "two_key.json"
    argv = ["study", "build", *map(str, two), "--input", str(inputs), "-o", str(page),
            "--key", str(key)]
    assert main(argv) == 0
    assert page.is_file() and key.is_file()
