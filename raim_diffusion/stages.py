"""The four stages of a RAIM restoration, by name and in order.

``prior`` (a GAN/CNN restorer), ``generate`` (consistency-guided SD/SDXL img2img), ``detect``
(DeSRA-style artifact masks) and ``fuse`` (re-restore the masked regions). Every part of the
package that names stages (the pipeline's ``stages=`` argument, run configs, ``--stages``)
uses this tuple and `check_stages`.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["STAGES", "check_stages"]

STAGES: tuple[str, ...] = ("prior", "generate", "detect", "fuse")


def check_stages(stages: Sequence[str]) -> tuple[str, ...]:
    """Validate a stage selection and return it as a tuple in pipeline order.

    A selection must be a non-empty subset of `STAGES` that does something: ``detect`` compares
    the generated image with the prior, so it needs ``generate``; ``fuse`` re-restores what
    ``detect`` found, so it needs ``detect``.

    Raises:
        ValueError: naming the offending stages.
    """
    if isinstance(stages, str):
        stages = [s.strip() for s in stages.split(",") if s.strip()]
    chosen = list(stages)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown or not chosen:
        raise ValueError(f"stages={chosen} must be a non-empty subset of {list(STAGES)}"
                         + (f"; unknown: {unknown}" if unknown else ""))
    if "detect" in chosen and "generate" not in chosen:
        raise ValueError(f"stages={chosen}: 'detect' compares the generated image with the "
                         "prior, so it needs 'generate'")
    if "fuse" in chosen and "detect" not in chosen:
        raise ValueError(f"stages={chosen}: 'fuse' re-restores what 'detect' finds, so it "
                         "needs 'detect'")
    return tuple(s for s in STAGES if s in chosen)
