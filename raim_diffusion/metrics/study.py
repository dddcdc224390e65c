"""Blind user study: build a self-contained judging page, then score the judges' picks.

The challenge's second score: judges see each sample's input and every method's result in a
random order under hidden letters, and pick their top 3. The 1st, 2nd and 3rd pick earn 3, 2
and 1 points (generally ``top_k, ..., 1``). For each method:

- ``S3`` = points summed over the samples, averaged over the judges;
- ``S3n`` = min-max normalised ``S3`` over the methods, in [0, 1];
- ``final = 0.4 * S2 + 0.6 * S3n`` where ``S2`` is the method's objective score, taken as
  given (the challenge SCORE, or anything on the scale you want to combine; pass
  ``normalize_s2=True`` to min-max normalise it the same way first).

Ties: methods with equal values share a rank and the next rank is skipped ("1, 2, 2, 4"); when
every method has the same ``S3`` (or ``S2`` with ``normalize_s2``), min-max normalisation is
undefined and every method gets 1.0, which leaves the ranking to the other term.

The page never contains method names: the mapping from hidden letters to methods is written to a
separate key file, and the judges' exports hold only letters.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import RaimError
from ._io import atomic_write, find_images, load_rgb
from ._study_page import PAGE_TEMPLATE

__all__ = [
    "StudyError",
    "StudyScores",
    "build_study",
    "load_judge_file",
    "score_study",
    "write_study",
]

KEY_FORMAT = "raim-study-key"
PICKS_FORMAT = "raim-study-picks"
_LABELS = string.ascii_uppercase
S2_WEIGHT = 0.4
S3_WEIGHT = 0.6


class StudyError(RaimError, ValueError):
    """A study cannot be built or a judge file is not acceptable (the message names the file)."""


# Characters that must not appear literally in JSON embedded in HTML: "<" could close the
# script element ("</script>") or open a comment ("<!--") that changes how the rest of the
# element is parsed; ">" and "&" too, so the text is inert in any HTML context; U+2028 and
# U+2029 end a line in older JavaScript parsers. Inside JSON strings "\u003c" means "<" again.
_SCRIPT_UNSAFE = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_SCRIPT_UNSAFE_RE = re.compile("[<>&\u2028\u2029]")
_PLACEHOLDER_RE = re.compile("__TITLE__|__DATA__")


def _script_json(obj) -> str:
    """``obj`` as JSON safe to embed in an HTML ``<script>`` element.

    Every ``<``, ``>``, ``&``, U+2028 and U+2029 is written as a ``\\uXXXX`` escape, so no
    string in ``obj`` (a file name such as ``<!--<script>.png``) can end the element, open a
    comment or be read as markup; ``JSON.parse`` of the element's text gives ``obj`` back.

    Args:
        obj: Anything `json.dumps` accepts.

    Returns:
        `str`: compact JSON without any of those characters.
    """
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    # Outside strings JSON holds none of these characters, so escaping is always valid.
    return _SCRIPT_UNSAFE_RE.sub(lambda m: _SCRIPT_UNSAFE[m.group(0)], text)


def _fill_template(template: str, title: str, payload: str) -> str:
    """Fill the page placeholders in one pass, so a title or file name that spells a
    placeholder is never substituted a second time."""
    values = {"__TITLE__": html.escape(title), "__DATA__": payload}
    return _PLACEHOLDER_RE.sub(lambda m: values[m.group(0)], template)


def _stems(folder: Path) -> dict[str, Path]:
    index: dict[str, Path] = {}
    for f in find_images(folder):
        key = f.relative_to(folder).with_suffix("").as_posix()
        if key in index:
            raise StudyError(
                f"{str(folder)!r} has two images with the stem {key!r}: "
                f"{index[key].name} and {f.name}."
            )
        index[key] = f
    return index


def _encode(path: Path, max_side: int | None, image_format: str, quality: int) -> str:
    """An image file as a ``data:`` URI (optionally shrunk so its longer side is ``max_side``)."""
    x = load_rgb(path)[0]
    arr = (x.permute(1, 2, 0).clamp(0, 1).numpy() * 255.0).round().astype(np.uint8)
    im = Image.fromarray(arr, "RGB")
    if max_side is not None and max(im.size) > max_side:
        ratio = max_side / max(im.size)
        size = (max(1, round(im.width * ratio)), max(1, round(im.height * ratio)))
        im = im.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if image_format == "jpeg":
        im.save(buf, "JPEG", quality=quality, subsampling=0)
        mime = "image/jpeg"
    else:
        im.save(buf, "PNG", optimize=False)
        mime = "image/png"
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _method_dirs(methods: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike]) -> dict:
    if isinstance(methods, Mapping):
        named = {str(k): Path(v) for k, v in methods.items()}
    else:
        named = {}
        for entry in methods:
            name, sep, folder = str(entry).partition("=")
            if sep and not (name and folder):
                raise StudyError(f"Method {str(entry)!r} must look like NAME=DIR or DIR.")
            path = Path(folder) if sep else Path(entry)
            name = name if sep else path.resolve().name
            if name in named:
                raise StudyError(
                    f"Two methods are named {name!r} ({named[name]} and {path}); name them "
                    "explicitly as NAME=DIR."
                )
            named[name] = path
    for name, path in named.items():
        if not path.is_dir():
            raise StudyError(f"Method {name!r}: {str(path)!r} is not a folder.")
    return named


def build_study(
    methods: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    input_dir: str | os.PathLike,
    *,
    generator: torch.Generator | None = None,
    top_k: int = 3,
    max_side: int | None = None,
    image_format: str = "jpeg",
    quality: int = 92,
    title: str = "Blind image restoration study",
) -> tuple[str, dict]:
    """Build the judging page and its key.

    Args:
        methods (`Mapping[str, PathLike]` or `Sequence`):
            Method name -> folder of results, or folders (named by their folder name, or given
            as ``"NAME=DIR"``). Results are matched to inputs by name stem.
        input_dir (`str` or `os.PathLike`): The low-quality inputs; one sample per image.
        generator (`torch.Generator`, *optional*):
            Drives the order of the results of each sample; a generator seeded with 0 if `None`.
        top_k (`int`, defaults to 3): How many results a judge ranks per sample.
        max_side (`int`, *optional*): Shrink embedded images so their longer side fits.
        image_format (`str`, defaults to `"jpeg"`): `"jpeg"` or `"png"` (lossless, bigger page).
        quality (`int`, defaults to 92): JPEG quality (4:4:4 chroma).
        title (`str`): Shown in the page.

    Returns:
        `tuple[str, dict]`: the HTML page, and the key (JSON-serialisable; keep it from judges).
    """
    if image_format not in ("jpeg", "png"):
        raise ValueError(f"image_format={image_format!r} must be 'jpeg' or 'png'.")
    if not isinstance(quality, int) or not 1 <= quality <= 100:
        raise ValueError(f"quality={quality!r} must be an integer in [1, 100].")
    if max_side is not None and (not isinstance(max_side, int) or max_side < 16):
        raise ValueError(f"max_side={max_side!r} must be None or an integer >= 16.")
    named = _method_dirs(methods)
    if len(named) > len(_LABELS):
        raise StudyError(f"At most {len(_LABELS)} methods are supported, got {len(named)}.")
    if not isinstance(top_k, int) or not 1 <= top_k <= len(named):
        raise ValueError(
            f"top_k={top_k!r} must be an integer between 1 and the number of methods "
            f"({len(named)})."
        )
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise StudyError(f"input_dir {str(input_dir)!r} is not a folder.")
    inputs = _stems(input_dir)
    if not inputs:
        raise StudyError(f"input_dir {str(input_dir)!r} holds no images.")
    results = {name: _stems(folder) for name, folder in named.items()}
    missing = [
        f"{name}: {stem}" for name, idx in results.items() for stem in inputs if stem not in idx
    ]
    if missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        raise StudyError(
            f"{len(missing)} result(s) missing for the inputs in {input_dir}: {shown}."
        )

    if generator is None:
        generator = torch.Generator().manual_seed(0)
    names = list(named)
    samples_page, samples_key = [], {}
    for stem in sorted(inputs):
        order = torch.randperm(len(names), generator=generator).tolist()
        candidates, mapping = [], {}
        for label, i in zip(_LABELS, order, strict=False):
            method = names[i]
            candidates.append(
                {
                    "label": label,
                    "src": _encode(results[method][stem], max_side, image_format, quality),
                }
            )
            mapping[label] = method
        samples_page.append(
            {
                "id": stem,
                "input": _encode(inputs[stem], max_side, image_format, quality),
                "candidates": candidates,
            }
        )
        samples_key[stem] = mapping
    # A random identifier, not a hash of the mapping: a hash of a few samples' permutations
    # could be brute-forced by a judge who knows the method names.
    study_id = secrets.token_hex(8)
    key = {
        "format": KEY_FORMAT,
        "version": 1,
        "study_id": study_id,
        "top_k": top_k,
        "methods": names,
        "samples": samples_key,
    }
    data = {"study_id": study_id, "title": title, "top_k": top_k, "samples": samples_page}
    page = _fill_template(PAGE_TEMPLATE, str(title), _script_json(data))
    return page, key


def write_study(
    page_path: str | os.PathLike,
    key_path: str | os.PathLike,
    methods: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
    input_dir: str | os.PathLike,
    **kwargs,
) -> tuple[Path, Path]:
    """`build_study` and write the page and the key file (atomically). Returns both paths."""
    page_path, key_path = Path(page_path), Path(key_path)
    if page_path.resolve() == key_path.resolve():
        raise ValueError(f"The key file must not be the page itself ({page_path}).")
    page, key = build_study(methods, input_dir, **kwargs)
    with atomic_write(page_path, mode="w") as fh:
        fh.write(page)
    with atomic_write(key_path, mode="w") as fh:
        json.dump(key, fh, indent=2)
        fh.write("\n")
    return page_path, key_path


def _read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise StudyError(f"{what} {str(path)!r} does not exist.") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StudyError(f"{what} {str(path)!r} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise StudyError(f"{what} {str(path)!r} must hold a JSON object.")
    return data


def load_key(path: str | os.PathLike) -> dict:
    """Read and check a key file written by `write_study`."""
    key = _read_json(Path(path), "Key file")
    if key.get("format") != KEY_FORMAT:
        raise StudyError(f"Key file {str(path)!r} is not a raim study key (format {KEY_FORMAT}).")
    _check_key(key, f"Key file {str(path)!r}")
    return key


def _check_key(key: Mapping, where: str) -> None:
    """Check the structure `score_study` relies on, so a damaged key is one clear error."""

    def bad(what: str) -> StudyError:
        return StudyError(f"{where} is damaged: {what}.")

    if not isinstance(key.get("study_id"), str):
        raise bad("'study_id' must be a string")
    methods = key.get("methods")
    if (
        not isinstance(methods, list)
        or not methods
        or not all(isinstance(m, str) for m in methods)
        or len(set(methods)) != len(methods)
    ):
        raise bad("'methods' must be a non-empty list of distinct names")
    top_k = key.get("top_k")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(methods):
        raise bad(f"'top_k' must be an integer between 1 and {len(methods)}, got {top_k!r}")
    samples = key.get("samples")
    if not isinstance(samples, Mapping) or not samples:
        raise bad("'samples' must be a non-empty object")
    for sample, mapping in samples.items():
        if not isinstance(mapping, Mapping) or not all(
            isinstance(label, str) and m in methods for label, m in mapping.items()
        ):
            raise bad(f"sample {sample!r} must map labels to the key's methods")
        if len(mapping) < top_k:
            raise bad(f"sample {sample!r} has fewer results than top_k={top_k}")


def load_judge_file(path: str | os.PathLike, key: Mapping) -> tuple[str, dict[str, list[str]]]:
    """Read one judge's export and check it against the key.

    Args:
        path (`str` or `os.PathLike`): The JSON exported by the study page.
        key (`Mapping`): The study key.

    Returns:
        `tuple[str, dict[str, list[str]]]`: the judge's name (the file stem if empty), and
        sample -> hidden labels in rank order.

    Raises:
        `StudyError`: naming the file and the sample for: another study, unknown samples,
        missing samples, wrong number of picks, unknown or duplicate labels.
    """
    path = Path(path)
    data = _read_json(path, "Judge file")
    where = f"Judge file {str(path)!r}"
    if data.get("format") != PICKS_FORMAT:
        raise StudyError(f"{where} is not a raim study export (format {PICKS_FORMAT}).")
    if data.get("study_id") != key["study_id"]:
        raise StudyError(
            f"{where} belongs to study {data.get('study_id')!r}, not to this key's "
            f"{key['study_id']!r}."
        )
    picks = data.get("picks")
    if not isinstance(picks, dict):
        raise StudyError(f"{where} has no 'picks' object.")
    top_k = int(key["top_k"])
    samples: Mapping[str, Mapping[str, str]] = key["samples"]
    unknown = sorted(set(picks) - set(samples))
    if unknown:
        raise StudyError(f"{where}: unknown sample(s) {unknown} (not in the key).")
    for sample, mapping in samples.items():
        chosen = picks.get(sample)
        if chosen is None:
            raise StudyError(f"{where}: sample {sample!r} has no picks.")
        if not isinstance(chosen, list) or not all(isinstance(c, str) for c in chosen):
            raise StudyError(f"{where}: sample {sample!r}: picks must be a list of labels.")
        if len(set(chosen)) != len(chosen):
            raise StudyError(f"{where}: sample {sample!r}: duplicate picks {chosen}.")
        bad = [c for c in chosen if c not in mapping]
        if bad:
            raise StudyError(
                f"{where}: sample {sample!r}: unknown label(s) {bad}; valid: {sorted(mapping)}."
            )
        if len(chosen) != top_k:
            raise StudyError(
                f"{where}: sample {sample!r} has {len(chosen)} pick(s), {top_k} are required "
                "(missing picks)."
            )
    judge = str(data.get("judge") or "").strip() or path.stem
    return judge, {s: list(picks[s]) for s in samples}


def _minmax(values: dict[str, float]) -> dict[str, float]:
    lo, hi = min(values.values()), max(values.values())
    if hi == lo:
        return {m: 1.0 for m in values}
    return {m: (v - lo) / (hi - lo) for m, v in values.items()}


def _ranks(values: dict[str, float]) -> dict[str, int]:
    """Competition ranking, highest first: equal values share a rank ("1, 2, 2, 4")."""
    return {m: 1 + sum(other > v for other in values.values()) for m, v in values.items()}


@dataclass
class StudyScores:
    """Scores of a user study.

    Args:
        methods (`list[str]`): Method names (key order).
        judges (`list[str]`): Judge names, in the order the files were given.
        s3 (`dict[str, float]`): Points summed over samples, averaged over judges.
        s3n (`dict[str, float]`): ``s3`` min-max normalised to [0, 1].
        s2 (`dict[str, float]`, *optional*): The objective score used for ``final``.
        final (`dict[str, float]`, *optional*): ``0.4 * s2 + 0.6 * s3n``.
        rank (`dict[str, int]`): By ``final`` when available, else by ``s3`` (ties share).
        first_picks (`dict[str, float]`): How often each method was picked 1st, per judge.
    """

    methods: list[str]
    judges: list[str]
    s3: dict[str, float]
    s3n: dict[str, float]
    s2: dict[str, float] | None
    final: dict[str, float] | None
    rank: dict[str, int]
    first_picks: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-serialisable form."""
        return {
            "judges": self.judges,
            "methods": {
                m: {
                    "S3": self.s3[m],
                    "S3n": self.s3n[m],
                    "S2": None if self.s2 is None else self.s2[m],
                    "final": None if self.final is None else self.final[m],
                    "rank": self.rank[m],
                    "first_picks": self.first_picks[m],
                }
                for m in self.methods
            },
        }

    def format_table(self) -> str:
        """Methods by rank, one line each."""
        cols = ["rank", "method", "S3", "S3n"] + (["S2", "final"] if self.final else [])
        width = max(6, *(len(m) for m in self.methods))
        lines = [f"{cols[0]:>4}  {cols[1]:<{width}}  " + "  ".join(f"{c:>9}" for c in cols[2:])]
        for m in sorted(self.methods, key=lambda m: (self.rank[m], m)):
            vals = [self.s3[m], self.s3n[m]]
            if self.final:
                vals += [self.s2[m], self.final[m]]
            lines.append(
                f"{self.rank[m]:>4}  {m:<{width}}  " + "  ".join(f"{v:>9.4f}" for v in vals)
            )
        return "\n".join(lines)


def score_study(
    judge_files: Sequence[str | os.PathLike],
    key: Mapping | str | os.PathLike,
    s2: Mapping[str, float] | None = None,
    *,
    normalize_s2: bool = False,
) -> StudyScores:
    """Score the judges' exports.

    Args:
        judge_files (`Sequence[PathLike]`): One export per judge (at least one).
        key (`Mapping` or path): The study key, or the path of the key file.
        s2 (`Mapping[str, float]`, *optional*):
            Each method's objective score; when given it must cover every method, and
            ``final = 0.4 * S2 + 0.6 * S3n`` is computed.
        normalize_s2 (`bool`, defaults to `False`): Min-max normalise ``s2`` before combining.

    Returns:
        `StudyScores`
    """
    if not isinstance(key, Mapping):
        key = load_key(key)
    else:
        _check_key(key, "The key")
    if not judge_files:
        raise StudyError("No judge files given.")
    methods: list[str] = list(key["methods"])
    top_k = int(key["top_k"])
    points = [float(top_k - r) for r in range(top_k)]
    totals = {m: 0.0 for m in methods}
    firsts = {m: 0.0 for m in methods}
    judges: list[str] = []
    seen: dict[str, str] = {}
    for path in judge_files:
        judge, picks = load_judge_file(path, key)
        if judge in seen:
            raise StudyError(
                f"Judge file {str(path)!r}: judge {judge!r} already given by {seen[judge]!r} "
                "(the same judge must not count twice)."
            )
        seen[judge] = str(path)
        judges.append(judge)
        for sample, labels in picks.items():
            for rank, label in enumerate(labels):
                method = key["samples"][sample][label]
                totals[method] += points[rank]
                if rank == 0:
                    firsts[method] += 1.0
    n = float(len(judges))
    s3 = {m: totals[m] / n for m in methods}
    s3n = _minmax(s3)
    s2_used = final = None
    if s2 is not None:
        unknown = sorted(set(s2) - set(methods))
        missing = [m for m in methods if m not in s2]
        if unknown or missing:
            raise StudyError(
                f"s2 must give a value for exactly the study's methods {methods}; "
                f"missing {missing}, unknown {unknown}."
            )
        s2_used = {m: float(s2[m]) for m in methods}
        if normalize_s2:
            s2_used = _minmax(s2_used)
        final = {m: S2_WEIGHT * s2_used[m] + S3_WEIGHT * s3n[m] for m in methods}
    rank = _ranks(final if final is not None else s3)
    return StudyScores(
        methods=methods,
        judges=judges,
        s3=s3,
        s3n=s3n,
        s2=s2_used,
        final=final,
        rank=rank,
        first_picks={m: firsts[m] / n for m in methods},
    )
