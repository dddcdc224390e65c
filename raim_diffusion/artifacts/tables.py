"""DeSRA class-weight tables and detector parameter sets stored as YAML in ``masks/``.

Two kinds of file live in the masks folder (see :func:`masks_dir`):

* ``masks/classes/<name>.yaml`` -- a class table: for each of the 150 ADE20K classes its id, its
  name and DeSRA's bin index ``idx``; the semantic weight is ``num_bins / (num_bins - idx)``.
* ``masks/params/<name>.yaml`` -- a named parameter set for :class:`DetectorConfig`
  (``desra-default``, ``strict-text``, ``lenient-texture``, ``improved``).

Every loader validates what it reads and raises ``ValueError`` naming the file, the key and
the allowed values, so an edited copy fails loudly instead of silently changing the decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from ..resources import data_dir

__all__ = [
    "ADE20K_CLASSES",
    "ClassTable",
    "load_class_table",
    "load_param_set",
    "list_class_tables",
    "list_param_sets",
    "masks_dir",
]

#: The 150 ADE20K (SceneParsing) classes in the order of the HF ``nvidia/segformer-*-ade-*``
#: configs' ``id2label`` and mmsegmentation's ``ADE20KDataset`` (label value = position).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand",
    "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway",
    "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine",
    "hovel", "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight",
    "booth", "television receiver", "airplane", "dirt track", "apparel", "pole", "land",
    "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship",
    "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food",
    "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower",
    "radiator", "glass", "clock", "flag",
)  # fmt: skip


def masks_dir() -> Path:
    """Return the folder holding the class tables and parameter sets (see
    [`~raim_diffusion.resources.data_dir`]: the installed package data first, else the checkout).
    """
    return data_dir("masks")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _resolve(name_or_path: str | Path, kind: str) -> Path:
    """Map a built-in name (``desra-default``) or a file path to an existing YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"{kind} file not found: '{path}'")
        return path
    candidate = masks_dir() / kind / f"{name_or_path}.yaml"
    if not candidate.is_file():
        known = _list(kind)
        raise ValueError(
            f"unknown {kind[:-1]} name {str(name_or_path)!r}; built-in names are {known} "
            "(or pass the path of a .yaml file)"
        )
    return candidate


def _list(kind: str) -> list[str]:
    folder = masks_dir() / kind
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def list_class_tables() -> list[str]:
    """Names of the built-in class tables in ``masks/classes``."""
    return _list("classes")


def list_param_sets() -> list[str]:
    """Names of the built-in parameter sets in ``masks/params``."""
    return _list("params")


class ClassTable:
    """Per-class semantic weights of the DeSRA detector.

    Args:
        weights (`Mapping[str, float]`):
            Weight per ADE20K class name; classes not named get ``default_weight``.
        name (`str`, *optional*): A label recorded in results.
        idx (`Mapping[str, int]`, *optional*): DeSRA bin indices the weights came from.
        default_weight (`float`, defaults to 1.0): Weight of classes not in ``weights``.

    The weight multiplies the contrast similarity before thresholding: ``c' = clip(c*w, 0, 1)``,
    so a class with weight ``w`` is flagged only where ``c < threshold / w``.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        name: str = "custom",
        idx: Mapping[str, int] | None = None,
        default_weight: float = 1.0,
    ) -> None:
        unknown = sorted(set(weights) - set(ADE20K_CLASSES))
        if unknown:
            raise ValueError(
                f"class_weights: unknown ADE20K class names {unknown}; names must be among "
                "raim_diffusion.artifacts.tables.ADE20K_CLASSES"
            )
        for k, v in weights.items():
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(
                    f"class_weights[{k!r}]={v!r}: a weight must be a finite number > 0"
                )
        if not math.isfinite(default_weight) or default_weight <= 0:
            raise ValueError(f"default_weight={default_weight!r}: must be a finite number > 0")
        self.name = name
        self.idx = dict(idx) if idx is not None else None
        self.weights = {c: float(weights.get(c, default_weight)) for c in ADE20K_CLASSES}

    def as_list(self) -> list[float]:
        """Weights in ADE20K label order (index = label value)."""
        return [self.weights[c] for c in ADE20K_CLASSES]

    @classmethod
    def uniform(cls) -> ClassTable:
        """All weights 1: used when no segmentation is run."""
        return cls({}, name="uniform")

    def __repr__(self) -> str:
        return f"ClassTable(name={self.name!r})"


def load_class_table(name_or_table: str | Path | Mapping[str, float] | ClassTable) -> ClassTable:
    """Load a class table by built-in name, YAML path or ``{class name: weight}`` mapping.

    Args:
        name_or_table: ``"ade20k-desra"`` (DeSRA's table), ``"uniform"``, a path to a YAML file
            in the ``masks/classes`` format, a mapping of class names to weights, or a table.

    Returns:
        `ClassTable`

    Raises:
        ValueError: on unknown names, missing or duplicate classes, or out-of-range values.
    """
    if isinstance(name_or_table, ClassTable):
        return name_or_table
    if isinstance(name_or_table, Mapping):
        return ClassTable(dict(name_or_table), name="custom")
    if not isinstance(name_or_table, (str, Path)):
        raise TypeError(
            f"class_weights: expected a table name, a YAML path or a mapping, got "
            f"{type(name_or_table).__name__}"
        )
    path = _resolve(name_or_table, "classes")
    data = _read_yaml(path)
    return _parse_class_table(data, path)


def _parse_class_table(data: dict[str, Any], path: Path) -> ClassTable:
    num_bins = data.get("num_bins", 20)
    if not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"{path}: num_bins={num_bins!r} must be a positive integer")
    entries = data.get("classes")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: 'classes' must be a list of {{id, name, idx}} entries")
    weights: dict[str, float] = {}
    idx_map: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry:
            raise ValueError(f"{path}: classes[{i}] must be a mapping with at least 'name'")
        name = entry["name"]
        if name not in ADE20K_CLASSES:
            raise ValueError(
                f"{path}: classes[{i}].name={name!r} is not an ADE20K class name "
                "(see raim_diffusion.artifacts.tables.ADE20K_CLASSES)"
            )
        if name in weights:
            raise ValueError(f"{path}: class {name!r} appears twice")
        if "id" in entry and entry["id"] != ADE20K_CLASSES.index(name):
            raise ValueError(
                f"{path}: classes[{i}] id={entry['id']!r} does not match the ADE20K id "
                f"{ADE20K_CLASSES.index(name)} of {name!r}"
            )
        if "weight" in entry:
            w = entry["weight"]
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0:
                raise ValueError(f"{path}: classes[{i}] ({name}) weight={w!r} must be > 0")
            weights[name] = float(w)
        else:
            idx = entry.get("idx")
            if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < num_bins:
                raise ValueError(
                    f"{path}: classes[{i}] ({name}) idx={idx!r} must be an integer in "
                    f"[0, {num_bins - 1}] (or give 'weight')"
                )
            idx_map[name] = idx
            weights[name] = num_bins / (num_bins - idx)
    if data.get("complete", True):
        missing = [c for c in ADE20K_CLASSES if c not in weights]
        if missing:
            raise ValueError(
                f"{path}: {len(missing)} ADE20K classes are missing, e.g. {missing[:5]} "
                "(list all 150 or set 'complete: false' to give the rest weight 1)"
            )
    return ClassTable(weights, name=str(data.get("name", path.stem)), idx=idx_map or None)


def load_param_set(name_or_path: str | Path) -> dict[str, Any]:
    """Read a named parameter set (``masks/params``) or a YAML file with detector parameters.

    Args:
        name_or_path: ``"desra-default"``, ``"strict-text"``, ``"lenient-texture"``,
            ``"improved"`` or a YAML path.

    Returns:
        `dict`: keyword arguments of :class:`DetectorConfig` (validated by it).
    """
    path = _resolve(name_or_path, "params")
    data = _read_yaml(path)
    data.pop("description", None)
    data.pop("name", None)
    return data
