"""``raim mask``: detect artifacts of generated images against references (stage 3 alone).

For each generated image ``<name>`` with a reference of the same name (files, or folders matched
by relative path without suffix), writes into the output folder:

* ``<name>_mask.png``    -- binary mask (255 = artifact),
* ``<name>_score.png``   -- weighted similarity map (white = similar, dark = suspicious),
* ``<name>_overlay.png`` -- the mask tinted over the generated image with region labels,

and one ``regions.json`` with every image's regions. A failure on one image is reported and the
others go on; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the ``mask`` subcommand."""
    p = subparsers.add_parser(
        "mask",
        help="detect diffusion/GAN artifacts (DeSRA-style) and write masks and overlays",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--generated", required=True, help="generated image, folder or glob")
    p.add_argument("--reference", required=True, help="reference image or folder (same names)")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
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
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def _key(path: Path, root: Path | None) -> str:
    rel = path.relative_to(root) if root is not None else Path(path.name)
    return rel.with_suffix("").as_posix()


def match_pairs(generated: str, reference: str) -> tuple[list[tuple[Path, Path | None, str]], int]:
    """Pair each generated image with the reference of the same relative name (suffix ignored).

    Returns:
        `(pairs, n_references)`: ``(generated, reference or None, key)`` triples.
    """
    from raim_diffusion.files import find_images

    gen_root = Path(generated) if Path(generated).is_dir() else None
    ref_root = Path(reference) if Path(reference).is_dir() else None
    gens = find_images([generated])
    refs = find_images([reference])
    if gen_root is None and ref_root is None and len(gens) == 1 and len(refs) == 1:
        return [(gens[0], refs[0], gens[0].stem)], 1
    by_key = {_key(r, ref_root): r for r in refs}
    return [(g, by_key.get(_key(g, gen_root)), _key(g, gen_root)) for g in gens], len(refs)


def run(args: argparse.Namespace) -> int:
    """Run ``raim mask``; returns the exit status."""
    import torch
    from tqdm.auto import tqdm

    from raim_diffusion.artifacts.detector import ArtifactDetector, DetectorConfig
    from raim_diffusion.artifacts.overlay import overlay, score_image
    from raim_diffusion.files import atomic_write
    from raim_diffusion.images import load_image

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        overrides = {}
        if args.segmenter is not None:
            overrides["segmenter"] = args.segmenter
        if args.mode is not None:
            overrides["mode"] = args.mode
        config = DetectorConfig.from_params(args.params, **overrides)
        refiner = None
        if args.sam_checkpoint is not None:
            from raim_diffusion.artifacts.sam import SamRefiner

            refiner = SamRefiner.from_checkpoint(args.sam_checkpoint, args.sam_type, device)
        detector = ArtifactDetector(config, refiner=refiner, device=device)
        detector.segmenter  # noqa: B018 - load the model now: a missing model fails once, early
        pairs, _ = match_pairs(args.generated, args.reference)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as err:
        print(f"raim mask: {err}", file=sys.stderr)
        return 2

    out_dir: Path = args.output
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {"params": config.to_dict(), "images": {}}
    failed = 0
    for gen_path, ref_path, key in tqdm(
        pairs, desc="mask", unit="img", disable=args.no_progress, file=sys.stderr
    ):
        try:
            if ref_path is None:
                raise FileNotFoundError(
                    f"no reference image named like '{key}' in {args.reference}"
                )
            gen = load_image(gen_path).tensor.to(device)
            ref = load_image(ref_path).tensor.to(device)
            result = detector(gen, ref)
            base = out_dir / key
            base.parent.mkdir(parents=True, exist_ok=True)
            mask = (result.masks[0, 0] > 0.5).to(torch.uint8).mul(255).cpu().numpy()
            from PIL import Image

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
        except Exception as err:  # noqa: BLE001 - one bad image must not stop the batch
            failed += 1
            print(f"raim mask: {gen_path}: {type(err).__name__}: {err}", file=sys.stderr)
            if not isinstance(err, (ValueError, FileNotFoundError, OSError)):
                traceback.print_exc(file=sys.stderr)
    with atomic_write(out_dir / "regions.json", "w") as f:
        json.dump(summary, f, indent=2)
    print(f"raim mask: {len(pairs) - failed} done, {failed} failed -> {out_dir}", file=sys.stderr)
    return 1 if failed else 0
