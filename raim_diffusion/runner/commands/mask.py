"""``raim mask``: detect artifacts of generated images against references (stage 3 alone).

Each generated image is paired with the reference at the same path under the reference input
(suffix ignored: gen/a/x.png pairs with ref/a/x.jpg), the way ``raim restore`` keys its jobs:
relative to the folder given, or to the folder part of a glob before its first wildcard
(gen/*/x.png -> a/x). Two single files are paired whatever their names. For each generated
image <key> the output folder gets:

* ``<key>_mask.png``    -- binary mask (255 = artifact),
* ``<key>_score.png``   -- weighted similarity map (white = similar, dark = suspicious),
* ``<key>_overlay.png`` -- the mask tinted over the generated image with region labels,

and one ``regions.json`` with every image's regions. Folders are searched recursively; hidden
files and folders are skipped, and symlinks to folders are not followed. The output folder
must not be an input folder, lie inside one or contain an input file. A failure on one image
is reported and the others go on; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import traceback
from pathlib import Path

from raim_diffusion.runner.cli import add_verbose


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``mask`` subcommand."""
    p = subparsers.add_parser(
        "mask",
        help="detect diffusion/GAN artifacts (DeSRA-style) and write masks and overlays",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--generated", required=True, help="generated image, folder or glob")
    p.add_argument("--reference", required=True,
                   help="reference image, folder or glob (same relative paths)")
    p.add_argument("-o", "--output", required=True, type=Path,
                   help="output folder (not an input folder, nor inside one)")
    p.add_argument(
        "--params",
        default="desra-default",
        help="parameter set name (desra-default, strict-text, lenient-texture, improved) or a "
        "YAML path (default: desra-default)",
    )
    p.add_argument(
        "--segmenter",
        default=None,
        help="SegFormer hub id or folder, 'segformer', 'mask2former', 'mmseg:<config>[:<ckpt>]' "
        "or 'none' (uniform weights); default: the parameter set's",
    )
    p.add_argument(
        "--mode",
        choices=("reference", "improved"),
        default=None,
        help="override the parameter set's mode",
    )
    p.add_argument(
        "--sam-checkpoint",
        type=Path,
        default=None,
        help="refine regions with SAM using this checkpoint (extra 'sam')",
    )
    p.add_argument("--sam-type", default="vit_h", choices=("vit_h", "vit_l", "vit_b"))
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N, mps, xpu (default: cuda if available)")
    p.add_argument("--no-progress", "--quiet", dest="no_progress", action="store_true",
                   help="hide the progress bar")
    add_verbose(p)
    p.set_defaults(func=run)


def _root(text: str) -> Path:
    """The folder an input's relative paths start from: the folder itself, a file's folder, or
    a glob's folder part before its first wildcard."""
    path = Path(os.path.expanduser(text))
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    literal = []
    for part in path.parts[:-1]:
        if glob.has_magic(part):
            break
        literal.append(part)
    return Path(*literal) if literal else Path(".")


def _key(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, without its suffix (``a/x`` for ``root/a/x.png``)."""
    rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(root)))
    if rel.parts and rel.parts[0] == "..":  # not under the root (cannot happen for found files)
        rel = Path(path.name)
    return rel.with_suffix("").as_posix()


def match_pairs(
    generated: str, reference: str, exclude: tuple[Path, ...] = ()
) -> tuple[list[tuple[Path, Path | None, str]], int]:
    """Pair each generated image with the reference at the same relative path (suffix ignored).

    Args:
        generated (`str`): Generated image, folder or glob.
        reference (`str`): Reference image, folder or glob.
        exclude (`tuple[Path, ...]`, *optional*): Folders never searched (the output folder).

    Returns:
        `(pairs, n_references)`: ``(generated, reference or None, key)`` triples; ``key`` is the
        output name stem.

    Raises:
        ValueError: two generated images that would write the same outputs, or two references
            that a generated image would match equally.
        FileNotFoundError: an input that does not exist or a pattern that matches nothing.
    """
    from raim_diffusion.files import find_images

    gens = find_images([generated], exclude=exclude)
    refs = find_images([reference], exclude=exclude)
    if Path(generated).is_file() and Path(reference).is_file():
        return [(gens[0], refs[0], gens[0].stem)], 1
    gen_root, ref_root = _root(generated), _root(reference)
    by_key: dict[str, list[Path]] = {}
    for ref in refs:
        by_key.setdefault(_key(ref, ref_root), []).append(ref)
    pairs: list[tuple[Path, Path | None, str]] = []
    owner: dict[str, Path] = {}
    for gen in gens:
        key = _key(gen, gen_root)
        if key in owner:
            raise ValueError(f"{owner[key]} and {gen} would both be written to {key}_mask.png; "
                             "rename one or give them separately")
        owner[key] = gen
        matches = by_key.get(key, [])
        if len(matches) > 1:
            raise ValueError(f"{gen} matches the references {matches[0]} and {matches[1]} "
                             "equally; keep one")
        pairs.append((gen, matches[0] if matches else None, key))
    return pairs, len(refs)


def run(args: argparse.Namespace) -> int:
    """Run ``raim mask``; returns the exit status (1 if any image failed, 2 on a usage error,
    130 when interrupted)."""
    done = [0]
    try:
        return _run(args, done)
    except KeyboardInterrupt:
        print(f"raim mask: interrupted ({done[0]} done)", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace, done: list[int]) -> int:
    import torch
    from PIL import Image
    from tqdm.auto import tqdm

    from raim_diffusion.artifacts import build_detector
    from raim_diffusion.artifacts.overlay import overlay, score_image
    from raim_diffusion.files import atomic_write, check_output_not_input
    from raim_diffusion.images import load_image
    from raim_diffusion.runner.common import (
        check_output_dir,
        report_usage_error,
        resolve_device,
    )

    try:
        device = resolve_device(args.device)
        out_dir = check_output_dir(args.output)
        check_output_not_input([args.generated, args.reference], out_dir)
        # Pairs first: a mistake in the inputs shows before any model loads.
        pairs, _ = match_pairs(args.generated, args.reference, exclude=(out_dir,))
        overrides = {} if args.mode is None else {"mode": args.mode}
        detector = build_detector(args.params, segmenter=args.segmenter, sam=args.sam_checkpoint,
                                  sam_type=args.sam_type, device=device, **overrides)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        return report_usage_error("mask", err)

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        return report_usage_error("mask", OSError(f"{out_dir}: {err}"))
    summary: dict[str, object] = {"params": detector.config.to_dict(), "images": {}}
    failed = 0
    for gen_path, ref_path, key in tqdm(
        pairs, desc="mask", unit="img", disable=args.no_progress, file=sys.stderr
    ):
        try:
            if ref_path is None:
                raise FileNotFoundError(
                    f"no reference image at '{key}' (any suffix) in {args.reference}"
                )
            gen = load_image(gen_path).tensor.to(device)
            ref = load_image(ref_path).tensor.to(device)
            result = detector(gen, ref)
            base = out_dir / key
            mask = (result.masks[0, 0] > 0.5).to(torch.uint8).mul(255).cpu().numpy()
            for suffix, img in (
                ("_mask.png", Image.fromarray(mask)),
                ("_score.png", score_image(result)),
                ("_overlay.png", overlay(gen, result)),
            ):
                with atomic_write(base.parent / f"{base.name}{suffix}") as f:
                    img.save(f, format="PNG")
            summary["images"][key] = {  # type: ignore[index]
                "generated": str(gen_path),
                "reference": str(ref_path),
                "segmentation": result.segmentation,
                "masked_fraction": float(result.masks.mean()),
                "regions": [
                    {
                        "box": list(r.box),
                        "area": r.area,
                        "mean_score": r.mean_score,
                        "label": r.label,
                        "class": r.class_name,
                    }
                    for r in result.regions[0]
                ],
            }
            done[0] += 1
        except Exception as err:  # noqa: BLE001 - one bad image must not stop the batch
            failed += 1
            print(f"raim mask: {gen_path}: {type(err).__name__}: {err}", file=sys.stderr)
            if not isinstance(err, (ValueError, FileNotFoundError, OSError)):
                traceback.print_exc(file=sys.stderr)
    with atomic_write(out_dir / "regions.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"raim mask: {len(pairs) - failed} done, {failed} failed -> {out_dir}", file=sys.stderr)
    return 1 if failed else 0
