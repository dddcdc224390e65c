"""Stage 3: DeSRA-style artifact detection (similarity, semantic weights, morphology, SAM).

```py
>>> from raim_diffusion.artifacts import ArtifactDetector
>>> detector = ArtifactDetector.from_config("desra-default")   # or "improved", a YAML path
>>> result = detector(generated, reference)                     # NCHW in [0, 1]
>>> result.masks, result.scores, result.regions
```

Heavy or optional parts (transformers segmenters, SAM, overlays) are imported from their
submodules: :mod:`.segmentation`, :mod:`.sam`, :mod:`.overlay`.
"""

from .detector import ArtifactDetector, ArtifactResult, DetectorConfig, Region, build_detector
from .tables import (
    ADE20K_CLASSES,
    ClassTable,
    list_class_tables,
    list_param_sets,
    load_class_table,
    load_param_set,
    masks_dir,
)

__all__ = [
    "ADE20K_CLASSES",
    "ArtifactDetector",
    "ArtifactResult",
    "ClassTable",
    "DetectorConfig",
    "Region",
    "build_detector",
    "list_class_tables",
    "list_param_sets",
    "load_class_table",
    "load_param_set",
    "masks_dir",
]
