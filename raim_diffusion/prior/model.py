"""Stage 1 of the pipeline: a restoration prior built from any spandrel architecture.

[`PriorModel`] wraps one spandrel model (Real-ESRGAN, SwinIR, SRFormer, HAT, NAFNet, ...) or a
weighted ensemble of several, and turns them into a diffusers component: it runs on NCHW float
images in ``[0, 1]``, tiles large inputs, pads to each architecture's size requirements, picks a
compute dtype the architecture supports, resamples to any output scale, and saves/loads itself
with ``save_pretrained`` / ``from_pretrained``.

spandrel infers every hyper-parameter of a network from its weights, so the saved config only
records what cannot be read from the weights (ensemble weights, tiling) plus the detected
architecture ids and scales, which are checked again on loading.
"""

from __future__ import annotations

import importlib
import math
import os
import warnings
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import safetensors.torch
import spandrel
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import logging
from spandrel import ImageModelDescriptor, ModelTiling, SizeRequirements

from raim_diffusion.errors import MissingWeightsError
from raim_diffusion.images import check_unit_range
from raim_diffusion.ops import pad, resize, scaled_size
from raim_diffusion.prior.head import RefinementHead
from raim_diffusion.tiling import tiled_apply

logger = logging.get_logger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
_TILE_WEIGHTS = ("gaussian", "cosine", "uniform")
# Original network names users know, to spandrel architecture ids.
_ARCH_ALIASES = {"SRVGGNetCompact": "Compact", "RRDBNet": "ESRGAN", "RealESRGAN": "ESRGAN"}
# Auto tiling on the CPU: big enough to keep per-tile overhead low, small enough that an x4
# RRDBNet tile stays within a couple of GB.
_CPU_AUTO_TILE = 512
_MIN_AUTO_TILE = 64
_MAX_AUTO_TILE = 2048


@lru_cache(maxsize=1)
def spandrel_registry() -> spandrel.ArchRegistry:
    """spandrel's main registry plus the ``spandrel_extra_arches`` architectures (SRFormer, ...).

    A copy is extended instead of calling ``spandrel_extra_arches.install()``, so importing
    raim-diffusion never changes spandrel's global registry for other code in the process.

    Returns:
        `spandrel.ArchRegistry`: The registry used for every detection in this package.
    """
    registry = spandrel.MAIN_REGISTRY.copy()
    try:
        import spandrel_extra_arches
    except ImportError:  # optional: without it, only spandrel's own architectures load
        logger.info("spandrel_extra_arches is not installed; SRFormer, Restormer etc. cannot load")
        return registry
    registry.add(*spandrel_extra_arches.EXTRA_REGISTRY, ignore_duplicates=True)
    return registry


def descriptor_from_state_dict(state_dict: dict[str, Any], source: str) -> ImageModelDescriptor:
    """Detect the architecture of ``state_dict`` and build the model with its weights.

    Args:
        state_dict (`dict`): A state dict, possibly wrapped (``params_ema``, ``state_dict``, ...).
        source (`str`): Where it came from, used in error messages.

    Returns:
        `spandrel.ImageModelDescriptor`: The loaded model and its metadata, in eval mode on CPU.

    Raises:
        `ValueError`: If no supported architecture matches, or the model is not an image to
            image restorer (e.g. an inpainting model that needs a mask).
    """
    state_dict = spandrel.canonicalize_state_dict(state_dict)
    try:
        with warnings.catch_warnings():
            # Some architectures script helpers with torch.jit at build time; torch deprecates
            # that, which is spandrel's business, not the user's.
            warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
            descriptor = spandrel_registry().load(state_dict)
    except spandrel.UnsupportedModelError as err:
        raise ValueError(
            f"{source}: unsupported architecture; the weights match none of the "
            f"{len(spandrel_registry())} architectures known to spandrel and "
            "spandrel_extra_arches (Real-ESRGAN, SwinIR, HAT, SRFormer, NAFNet, ...)"
        ) from err
    except Exception as err:
        # spandrel's detection code runs on untrusted files: a truncated or edited state dict
        # can fail in it in many ways, all of which mean "not a model we can build".
        raise ValueError(
            f"{source}: the weights could not be built into a network "
            f"({type(err).__name__}: {err}); the file is damaged or not a restoration model"
        ) from err
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ValueError(
            f"{source}: {descriptor.architecture.name} is a {descriptor.purpose} model that needs "
            "a mask; a prior must map an image to an image"
        )
    if descriptor.purpose == "FaceSR":
        logger.warning(
            f"{source}: {descriptor.architecture.name} restores aligned face crops; on whole "
            "images it will give poor results"
        )
    return descriptor.eval()


def _lcm(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out = out * v // math.gcd(out, v)
    return out


def pad_to_requirements(x: torch.Tensor, requirements: SizeRequirements) -> torch.Tensor:
    """Pad ``x`` at the bottom and right so that its size satisfies ``requirements``.

    Border rule of `raim_diffusion.ops.pad` (reflection, replication beyond its reach).

    Args:
        x (`torch.Tensor`): ``(N, C, H, W)``.
        requirements (`spandrel.SizeRequirements`): Minimum size, multiple and squareness.

    Returns:
        `torch.Tensor`: ``x`` itself when nothing is needed, else the padded tensor; the
        original content is the top-left ``H x W`` block.
    """
    h, w = x.shape[-2:]
    pad_w, pad_h = requirements.get_padding(w, h)
    return pad(x, right=pad_w, bottom=pad_h)


def _adapt_input_channels(x: torch.Tensor, model_channels: int) -> tuple[torch.Tensor, bool]:
    """Map ``x`` to the channels a member expects; returns the tensor and whether the colour
    channels were folded into the batch (grayscale model on a colour image)."""
    c = x.shape[1]
    if c == model_channels:
        return x, False
    if model_channels == 1:
        # A grayscale restorer applied to each colour channel keeps the colours.
        return x.reshape(-1, 1, *x.shape[-2:]), True
    if c == 1 and model_channels == 3:
        return x.expand(-1, 3, -1, -1), False
    if c == 3 and model_channels == 4:
        # RGBA-trained models get an opaque alpha channel.
        return torch.cat([x, torch.ones_like(x[:, :1])], dim=1), False
    raise ValueError(
        f"x has {c} channels but the prior's architecture expects {model_channels}; "
        "allowed inputs are 1 (gray) or 3 (RGB) channels"
    )


def _adapt_output_channels(
    y: torch.Tensor, channels: int, batch: int, folded: bool
) -> torch.Tensor:
    """Map a member's output back to the channel count of the input."""
    if folded:
        if y.shape[1] != 1:
            raise ValueError(
                f"a 1-channel-input architecture returned {y.shape[1]} channels; cannot apply it "
                "per colour channel"
            )
        return y.reshape(batch, channels, *y.shape[-2:])
    c = y.shape[1]
    if c == channels:
        return y
    if c == 3 and channels == 1:
        return y.mean(dim=1, keepdim=True)
    if c == 4 and channels == 3:
        return y[:, :3]
    if c == 1 and channels == 3:
        return y.expand(-1, 3, -1, -1)
    raise ValueError(f"cannot map the prior's {c}-channel output to {channels} channels")


def _unsupported(dtype: torch.dtype, descriptor: ImageModelDescriptor) -> bool:
    return (dtype == torch.float16 and not descriptor.supports_half) or (
        dtype == torch.bfloat16 and not descriptor.supports_bfloat16
    )


def check_image(x: Any, name: str = "x", check_range: bool = True) -> torch.Tensor:
    """Validate an NCHW float image in ``[0, 1]`` and return it clamped to the exact range.

    The range check (one scan, one host sync) is `raim_diffusion.images.check_unit_range`;
    ``check_range=False`` checks the shape only, for callers that validated once already.

    Raises:
        `TypeError`: If ``x`` is not a floating point tensor.
        `ValueError`: If ``x`` is not 4-D, has an unsupported channel count, is empty, has
            non-finite values or values outside ``[0, 1]``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, H, W), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating point tensor in [0, 1], got dtype {x.dtype}; convert "
            "integer images with raim_diffusion.images.to_tensor"
        )
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3, 4):
        raise ValueError(
            f"{name} must have 1, 3 or 4 channels in dim 1 (NCHW), got shape {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if not check_range:
        return x
    return check_unit_range(x, name)


class PriorModel(ModelMixin, ConfigMixin):
    r"""A restoration prior: one spandrel model or a weighted ensemble of several.

    The prior maps a low-quality image ``(N, C, H, W)`` in ``[0, 1]`` to a faithful restoration
    at ``scale * size`` (or any ``outscale``). Members of an ensemble may have different scales:
    every member's output is resampled to the largest scale before the weighted average.

    Build it with [`load_prior`] (files, built-in names, folders, lists), [`from_spandrel`] (a
    spandrel descriptor already in memory) or [`from_pretrained`] (a folder written by
    ``save_pretrained``, also as a pipeline component).

    Args:
        members (`Sequence[spandrel.ImageModelDescriptor]`):
            The spandrel models, keyword only. Not stored in the config: the weights are.
        weights (`Sequence[float]`, *optional*):
            Positive ensemble weights, one per member, normalised to sum to 1. Equal by default.
        tile (`int`, *optional*):
            Tile size in input pixels. `None` picks one from free memory (no tiling when the
            image fits), ``0`` never tiles.
        tile_overlap (`int`, *optional*, defaults to 32):
            Overlap between tiles in input pixels; seams are blended away with smooth weights.
        tile_weight (`str`, *optional*, defaults to `"gaussian"`):
            Blend weights for tiles: `"gaussian"`, `"cosine"` or `"uniform"`.
        max_tile_batch (`int`, *optional*, defaults to 4):
            Most tiles processed at once.
        outscale (`float`, *optional*):
            Default output scale of ``forward``; `None` means the native scale. Set e.g. for
            the built-in ``realesr-animevideov3-x2``, an x4 network meant to give x2 output.
        head ([`RefinementHead`], *optional*):
            MiAlgo's learned blend, keyword only: when present, ``forward`` returns
            ``(1 - alpha) * resize(x) + alpha * restoration`` with a per-pixel alpha predicted
            from both. Saved and loaded with the prior (``config.head_config``).
    """

    ignore_for_config = ["members", "head"]
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        *,
        members: Sequence[ImageModelDescriptor] | None = None,
        weights: Sequence[float] | None = None,
        tile: int | None = None,
        tile_overlap: int = 32,
        tile_weight: str = "gaussian",
        max_tile_batch: int = 4,
        outscale: float | None = None,
        head: RefinementHead | None = None,
    ) -> None:
        super().__init__()
        if members is None:
            raise TypeError(
                "PriorModel needs its spandrel members: use load_prior(...), "
                "PriorModel.from_spandrel(...) or PriorModel.from_pretrained(folder)"
            )
        if isinstance(members, ImageModelDescriptor):
            members = [members]
        members = list(members)
        if not members:
            raise ValueError("members must contain at least one spandrel ImageModelDescriptor")
        for i, member in enumerate(members):
            if not isinstance(member, ImageModelDescriptor):
                raise TypeError(
                    f"members[{i}] must be a spandrel ImageModelDescriptor, got "
                    f"{type(member).__name__}"
                )
        norm_weights = _normalise_weights(weights, len(members))
        _check_tiling(tile, tile_overlap, tile_weight, max_tile_batch)
        _check_outscale(outscale)

        # The spandrel modules are registered as submodules so .to(), state_dict() and
        # save_pretrained see them; the descriptors keep the metadata and call functions.
        self.members = torch.nn.ModuleList([m.model for m in members])
        self._descriptors = members
        self._weights = norm_weights
        for m in self.members:
            m.eval().requires_grad_(False)
        self.register_to_config(
            weights=norm_weights,
            architectures=[m.architecture.id for m in members],
            scales=[m.scale for m in members],
            input_channels=[m.input_channels for m in members],
            output_channels=[m.output_channels for m in members],
        )
        self.head: RefinementHead | None = None
        self.set_head(head)
        self._fix_member_dtypes()

    def set_head(self, head: RefinementHead | None) -> None:
        """Attach MiAlgo's refinement head (or remove it with ``None``); recorded in the config
        so ``save_pretrained`` / ``from_pretrained`` keep it."""
        if head is not None and not isinstance(head, RefinementHead):
            raise TypeError(f"head must be a RefinementHead or None, got {type(head).__name__}")
        self.head = head.eval().requires_grad_(False) if head is not None else None
        self.register_to_config(head_config=dict(head.config) if head is not None else None)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_spandrel(
        cls,
        descriptor: ImageModelDescriptor | Sequence[ImageModelDescriptor],
        weights: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> PriorModel:
        """Wrap spandrel model descriptor(s) already in memory.

        Args:
            descriptor (`spandrel.ImageModelDescriptor` or a sequence of them):
                E.g. ``spandrel.ModelLoader().load_from_file(path)``.
            weights (`Sequence[float]`, *optional*): Ensemble weights, one per descriptor.
            **kwargs: Tiling options, see [`PriorModel`].

        Returns:
            `PriorModel`: The prior, on the descriptors' device.
        """
        members = [descriptor] if isinstance(descriptor, ImageModelDescriptor) else descriptor
        return cls(members=members, weights=weights, **kwargs)

    @classmethod
    def from_architecture(
        cls, architecture: str, *, prior_kwargs: dict[str, Any] | None = None, **arch_kwargs: Any
    ) -> PriorModel:
        """Build a randomly initialised prior from a spandrel architecture (tests, training).

        The network is built with ``arch_kwargs`` and then detected from its own state dict,
        exactly as a weights file would be, so the result round-trips through
        ``save_pretrained`` / ``load_prior``.

        Args:
            architecture (`str`): A spandrel architecture id (``"Compact"``, ``"ESRGAN"``,
                ``"SwinIR"``, ``"SRFormer"``, ...) or the original network name
                (``"SRVGGNetCompact"``, ``"RRDBNet"``).
            prior_kwargs (`dict`, *optional*): Tiling options for [`PriorModel`].
            **arch_kwargs: Hyper-parameters of the network class.

        Returns:
            `PriorModel`: A single-member prior on the CPU (initialised from torch's global
            RNG; fork it to keep the caller's stream untouched).
        """
        arch_id = _ARCH_ALIASES.get(architecture, architecture)
        network_cls = None
        for package in ("spandrel.architectures", "spandrel_extra_arches.architectures"):
            try:
                module = importlib.import_module(f"{package}.{arch_id}")
            except ImportError:
                continue
            network_cls = getattr(module, arch_id, None)
            if network_cls is not None:
                break
        if network_cls is None:
            raise ValueError(
                f"architecture {architecture!r} is not a spandrel architecture id; use e.g. "
                f"'Compact', 'ESRGAN', 'SwinIR', 'SRFormer' or one of {sorted(_ARCH_ALIASES)}"
            )
        network = network_cls(**arch_kwargs)
        source = f"{architecture}({', '.join(f'{k}={v!r}' for k, v in arch_kwargs.items())})"
        descriptor = descriptor_from_state_dict(network.state_dict(), source)
        if descriptor.architecture.id != arch_id:
            raise ValueError(
                f"{source}: its weights are detected as {descriptor.architecture.id}, so the "
                "prior could not be reloaded from a file; choose other hyper-parameters"
            )
        return cls(members=[descriptor], **(prior_kwargs or {}))

    @classmethod
    def ensemble(
        cls,
        priors: Sequence[PriorModel],
        weights: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> PriorModel:
        """Combine priors (themselves single models or ensembles) into one weighted ensemble.

        Nested ensembles are flattened: a member of ``priors[i]`` with weight ``v`` gets weight
        ``weights[i] * v``.

        Args:
            priors (`Sequence[PriorModel]`): The priors to combine; their modules are shared.
            weights (`Sequence[float]`, *optional*): One positive weight per prior.
            **kwargs: Tiling options, see [`PriorModel`]; default to those of ``priors[0]``.

        Returns:
            `PriorModel`: The ensemble.
        """
        priors = list(priors)
        if not priors or not all(isinstance(p, PriorModel) for p in priors):
            raise TypeError("priors must be a non-empty sequence of PriorModel")
        outer = _normalise_weights(weights, len(priors))
        members: list[ImageModelDescriptor] = []
        flat: list[float] = []
        for prior, w in zip(priors, outer, strict=True):
            members.extend(prior._descriptors)
            flat.extend(w * v for v in prior._weights)
        for key in ("tile", "tile_overlap", "tile_weight", "max_tile_batch"):
            kwargs.setdefault(key, priors[0].config[key])
        # A default output scale survives only if every prior agrees on it.
        outscales = {p.config.outscale for p in priors}
        kwargs.setdefault("outscale", outscales.pop() if len(outscales) == 1 else None)
        heads = [p.head for p in priors if p.head is not None]
        if len(priors) == 1:
            kwargs.setdefault("head", priors[0].head)
        elif heads:
            # A head learned the blend of one restorer's output; it does not fit an ensemble's.
            logger.warning(
                f"{len(heads)} of the {len(priors)} ensembled priors have a refinement head; "
                "heads are not applied to an ensemble"
            )
        return cls(members=members, weights=flat, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        torch_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> PriorModel:
        """Load a prior saved with ``save_pretrained`` (a local folder or a Hub repository).

        Follows diffusers' signature so that ``DiffusionPipeline.from_pretrained`` can load the
        prior as a component. The networks are rebuilt with spandrel from the saved state dict
        and checked against the architectures and scales recorded in ``config.json``.

        Args:
            pretrained_model_name_or_path (`str` or `os.PathLike`): Folder or Hub repo id.
            subfolder (`str`, *optional*): Subfolder holding ``config.json`` and the weights.
            torch_dtype (`torch.dtype`, *optional*): Compute dtype; members that do not support
                it stay in float32.
            **kwargs: ``dtype`` (alias of ``torch_dtype``), ``device_map`` (one device only),
                ``variant``, ``cache_dir``, ``local_files_only``, ``token``, ``revision``,
                ``force_download``; other diffusers loading options are ignored.

        Returns:
            `PriorModel`: The prior in eval mode.
        """
        dtype = kwargs.pop("dtype", None) or torch_dtype
        device_map = kwargs.pop("device_map", None)
        variant = kwargs.pop("variant", None)
        hub_kwargs = {
            k: kwargs.pop(k)
            for k in ("cache_dir", "local_files_only", "token", "revision", "force_download")
            if k in kwargs
        }  # fmt: skip
        use_safetensors = kwargs.pop("use_safetensors", None)
        if use_safetensors is False:
            raise ValueError(
                "use_safetensors=False: PriorModel weights are only read from safetensors files"
            )
        ignored = sorted(k for k, v in kwargs.items() if v not in (None, False))
        if ignored:
            logger.debug(f"PriorModel.from_pretrained ignores {ignored}")

        config = cls.load_config(pretrained_model_name_or_path, subfolder=subfolder, **hub_kwargs)
        files = _weight_files(pretrained_model_name_or_path, subfolder, variant, hub_kwargs)
        state_dict: dict[str, torch.Tensor] = {}
        for file in files:
            state_dict.update(safetensors.torch.load_file(file, device="cpu"))
        source = str(Path(pretrained_model_name_or_path, subfolder or ""))

        architectures = list(config.get("architectures") or [])
        scales = list(config.get("scales") or [])
        per_member: dict[int, dict[str, torch.Tensor]] = {}
        head_state: dict[str, torch.Tensor] = {}
        for key, value in state_dict.items():
            prefix, _, rest = key.partition(".")
            if prefix == "head" and rest:
                head_state[rest] = value
                continue
            index, _, name = rest.partition(".")
            if prefix != "members" or not index.isdigit() or not name:
                raise ValueError(f"{source}: unexpected tensor {key!r} in the prior's weights")
            per_member.setdefault(int(index), {})[name] = value
        if sorted(per_member) != list(range(len(architectures))):
            raise ValueError(
                f"{source}: config.json lists {len(architectures)} member(s) but the weights "
                f"hold members {sorted(per_member)}"
            )
        members = []
        for i in range(len(architectures)):
            member = descriptor_from_state_dict(per_member[i], f"{source} (member {i})")
            if member.architecture.id != architectures[i] or (
                i < len(scales) and member.scale != scales[i]
            ):
                raise ValueError(
                    f"{source}: member {i} was saved as {architectures[i]} x{scales[i]} but its "
                    f"weights load as {member.architecture.id} x{member.scale}"
                )
            members.append(member)

        model = cls(
            members=members,
            weights=config.get("weights"),
            tile=config.get("tile"),
            tile_overlap=config.get("tile_overlap", 32),
            tile_weight=config.get("tile_weight", "gaussian"),
            max_tile_batch=config.get("max_tile_batch", 4),
            outscale=config.get("outscale"),
            head=_load_head(config.get("head_config"), head_state, source),
        )
        device = _single_device(device_map)
        if device is not None or dtype is not None:
            # nn.Module.to: ModelMixin.to warns about float32-pinned modules even when there
            # are none; _apply still keeps unsupported members in float32.
            torch.nn.Module.to(model, device=device, dtype=dtype)
        return model.eval()

    # ------------------------------------------------------------------ properties

    @property
    def native_scale(self) -> int:
        """Scale the networks produce: the largest member scale."""
        return max(m.scale for m in self._descriptors)

    @property
    def scale(self) -> float:
        """Output size / input size of ``forward`` without ``outscale``: the configured
        default ``outscale`` if set, else [`native_scale`]."""
        outscale = self.config.outscale
        return self.native_scale if outscale is None else outscale

    @property
    def descriptors(self) -> list[ImageModelDescriptor]:
        """The spandrel descriptors of the members (metadata: architecture, tags, ...)."""
        return list(self._descriptors)

    @property
    def weights(self) -> list[float]:
        """Normalised ensemble weights, one per member."""
        return list(self._weights)

    @property
    def size_requirements(self) -> SizeRequirements:
        """Combined input size requirements of all members."""
        reqs = [m.size_requirements for m in self._descriptors]
        return SizeRequirements(
            minimum=max(r.minimum for r in reqs),
            multiple_of=_lcm([r.multiple_of for r in reqs]),
            square=any(r.square for r in reqs),
        )

    def __repr__(self) -> str:
        parts = [
            f"{m.architecture.id} x{m.scale}" + (f" w={w:.3g}" if len(self._weights) > 1 else "")
            for m, w in zip(self._descriptors, self._weights, strict=True)
        ]
        if self.config.outscale is not None:
            parts.append(f"outscale={self.config.outscale}")
        return f"{type(self).__name__}({', '.join(parts)}, tile={self.config.tile})"

    # ------------------------------------------------------------------ dtype handling

    def _apply(self, fn: Callable, recurse: bool = True) -> PriorModel:
        # Every .to()/.half()/.bfloat16() goes through _apply; members that would then run in
        # a dtype their architecture does not support are put back to float32.
        super()._apply(fn, recurse)
        if "_descriptors" in self.__dict__:
            self._fix_member_dtypes()
        return self

    def _fix_member_dtypes(self) -> None:
        for module, desc in zip(self.members, self._descriptors, strict=True):
            param = next(module.parameters(), None)
            if param is not None and _unsupported(param.dtype, desc):
                logger.info(
                    f"{desc.architecture.name} does not support {param.dtype}; this member "
                    "runs in float32"
                )
                module.float()

    def member_dtypes(self) -> list[torch.dtype]:
        """Compute dtype of each member (its parameter dtype)."""
        return [next(m.parameters()).dtype for m in self.members]

    # ------------------------------------------------------------------ tiling

    def enable_tiling(self, tile: int | None = None, overlap: int | None = None) -> None:
        """Set the tile size (``None`` = automatic) and optionally the overlap."""
        overlap = self.config.tile_overlap if overlap is None else overlap
        _check_tiling(tile, overlap, self.config.tile_weight, self.config.max_tile_batch)
        self.register_to_config(tile=tile, tile_overlap=overlap)

    def disable_tiling(self) -> None:
        """Never tile (``tile=0``): the whole image goes through the network at once."""
        self.register_to_config(tile=0)

    def _auto_tile(self, x: torch.Tensor) -> int | None:
        """Pick a tile size for ``x`` from free device (or host) memory; `None` when it fits."""
        if any(m.tiling == ModelTiling.INTERNAL for m in self._descriptors):
            return None
        n, _, h, w = x.shape
        device = next(self.members.parameters()).device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
        else:
            try:  # host memory: the same budget, so large photos stay untiled where they fit
                import psutil

                free = psutil.virtual_memory().available
            except ImportError:
                return None if max(h, w) <= _CPU_AUTO_TILE else self._round_tile(_CPU_AUTO_TILE, 8)
        elem = max(torch.finfo(d).bits // 8 for d in self.member_dtypes())
        # Rough activation footprint per input pixel: ~1k feature maps at input resolution
        # plus ~128 at output resolution (RRDBNet, SwinIR and HAT sit below this), and half
        # the free memory as budget because the blend buffers and the allocator need room too.
        per_pixel = elem * (1024 + 128 * self.native_scale**2)
        budget = free * 0.5 / per_pixel
        if n * h * w <= budget:
            return None
        side = int(math.sqrt(budget / self.config.max_tile_batch))
        return self._round_tile(max(_MIN_AUTO_TILE, min(side, _MAX_AUTO_TILE)), align=8)

    def _round_tile(self, tile: int, align: int = 1) -> int:
        # Tiles that already satisfy multiple_of need no per-tile padding.
        req = self.size_requirements
        mult = _lcm([req.multiple_of, align])
        return max(req.minimum, mult, tile // mult * mult)

    # ------------------------------------------------------------------ inference

    def _run_member(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """One member on a float32 batch: returns float32 at the member's scale, on x.device."""
        desc = self._descriptors[index]
        param = next(self.members[index].parameters())
        n, c, h, w = x.shape
        x_in, folded = _adapt_input_channels(x, desc.input_channels)
        x_in = pad_to_requirements(x_in, desc.size_requirements)
        y = desc(x_in.to(device=param.device, dtype=param.dtype))
        y = y[..., : h * desc.scale, : w * desc.scale]
        y = _adapt_output_channels(y, c, n, folded)
        return y.to(device=x.device, dtype=torch.float32)

    def _ensemble(self, x: torch.Tensor) -> torch.Tensor:
        """Weighted average of all members at the common (largest) scale."""
        scale = self.native_scale
        size = (x.shape[-2] * scale, x.shape[-1] * scale)
        out: torch.Tensor | None = None
        for i, w in enumerate(self._weights):
            y = resize(self._run_member(i, x), size)
            if len(self._weights) == 1:
                return y
            # Out of place first: y may be a view (an expanded gray channel) of the output.
            out = y * w if out is None else out.add_(y, alpha=w)
        return out  # type: ignore[return-value]  # __init__ guarantees one member or more

    def _tiled(self, x: torch.Tensor, tile: int | None) -> torch.Tensor:
        return tiled_apply(
            self._ensemble,
            x,
            tile,
            self.config.tile_overlap,
            scale=self.native_scale,
            weight=self.config.tile_weight,
            max_batch=self.config.max_tile_batch,
        )

    def forward(
        self,
        x: torch.Tensor,
        upscale: float | None = None,
        *,
        check_range: bool = True,
        outscale: float | None = None,
    ) -> torch.Tensor:
        """Restore ``x``.

        Args:
            x (`torch.Tensor`): ``(N, C, H, W)`` float in ``[0, 1]``, C = 1 or 3 (or the
                members' channel count); any device: tiles travel to the model's device, and
                the result comes back to ``x.device``.
            upscale (`float`, *optional*): Output size relative to ``x`` (the package's one
                name for it); defaults to [`scale`]. A different value resamples the native
                output (`raim_diffusion.ops.resize`), e.g. ``1`` to use an x4 model as a
                same-size restorer.
            check_range (`bool`, defaults to `True`): refuse NaN, inf and values outside
                [0, 1]; off for callers that checked once already (the pipeline).
            outscale (`float`, *optional*): deprecated alias of ``upscale``.

        Returns:
            `torch.Tensor`: ``(N, C, round(H * s), round(W * s))`` float32 in ``[0, 1]`` on
            ``x.device``, ``s`` being ``upscale`` or [`scale`].
        """
        if outscale is not None:
            if upscale is not None and upscale != outscale:
                raise ValueError(f"upscale={upscale!r} and its deprecated alias outscale="
                                 f"{outscale!r} disagree; pass upscale only")
            warnings.warn("PriorModel(..., outscale=) is deprecated; use upscale=",
                          FutureWarning, stacklevel=2)
            upscale = outscale
        x = check_image(x, "x", check_range)
        _check_outscale(upscale)
        outscale = self.config.outscale if upscale is None else upscale
        x = x.float()
        h, w = x.shape[-2:]
        tile = self.config.tile
        with torch.inference_mode():
            if tile == 0:
                y = self._tiled(x, None)
            elif tile is not None:
                y = self._tiled(x, self._round_tile(tile) if tile < max(h, w) else None)
            else:
                y = self._auto_tiled(x)
            if outscale is not None:
                y = resize(y, scaled_size((h, w), outscale))
            if self.head is not None:
                y = self._apply_head(x, y)
        if not torch.is_inference_mode_enabled():
            # Inference tensors cannot be modified in place or saved for backward outside
            # inference mode; one copy makes the result an ordinary tensor for later stages.
            y = y.clone()
        return y

    def _apply_head(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """MiAlgo's blend of the resized input back into the restoration ``y``."""
        head = self.head
        param = next(head.parameters())
        up = resize(x, tuple(y.shape[-2:]))
        c, hc = y.shape[1], head.config.channels
        lr_in, y_in = up, y
        if c != hc:  # a gray image through an RGB head: the blend weights come from gray
            lr_in, y_in = up.expand(-1, hc, -1, -1), y.expand(-1, hc, -1, -1)
        alpha = head.alpha(
            lr_in.to(device=param.device, dtype=param.dtype),
            y_in.to(device=param.device, dtype=param.dtype),
        ).to(device=y.device, dtype=y.dtype)
        return torch.lerp(up, y, alpha).clamp_(0, 1)

    def _auto_tiled(self, x: torch.Tensor) -> torch.Tensor:
        tile = self._auto_tile(x)
        while True:
            try:
                return self._tiled(x, tile)
            except torch.cuda.OutOfMemoryError:
                # The footprint estimate is a heuristic; halve the tile until it fits.
                smaller = max(x.shape[-2:]) // 2 if tile is None else tile // 2
                if smaller < _MIN_AUTO_TILE:
                    raise
                torch.cuda.empty_cache()
                tile = self._round_tile(smaller, align=8)
                logger.warning(f"out of memory in the prior; retrying with {tile}px tiles")


def _load_head(
    head_config: dict[str, Any] | None, state: dict[str, torch.Tensor], source: str
) -> RefinementHead | None:
    """The refinement head recorded in a saved prior, or ``None``."""
    if not head_config:
        if state:
            raise ValueError(f"{source}: head tensors in the weights but no head_config")
        return None
    config = {k: v for k, v in dict(head_config).items() if not str(k).startswith("_")}
    try:
        head = RefinementHead(**config)
        head.load_state_dict(state)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{source}: its refinement head does not load ({err})") from err
    return head


def _normalise_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, (int, float)):
        weights = [weights]
    weights = list(weights)
    if len(weights) != count:
        raise ValueError(
            f"weights has {len(weights)} entries for {count} model(s); give one weight per model"
        )
    for w in weights:
        if (
            isinstance(w, bool)
            or not isinstance(w, (int, float))
            or not (math.isfinite(w) and w > 0)
        ):
            raise ValueError(f"weights must be positive finite numbers, got {weights!r}")
    total = float(sum(weights))
    return [float(w) / total for w in weights]


def _check_outscale(outscale: Any) -> None:
    if outscale is not None and (
        isinstance(outscale, bool)
        or not isinstance(outscale, (int, float))
        or not (math.isfinite(outscale) and outscale > 0)
    ):
        raise ValueError(
            f"upscale (formerly outscale) must be None or a positive number, got {outscale!r}"
        )


def _check_tiling(tile: Any, overlap: Any, weight: Any, max_batch: Any) -> None:
    if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int) or tile < 0):
        raise ValueError(f"tile must be None (auto), 0 (off) or a positive int, got {tile!r}")
    if tile and tile < 8:
        raise ValueError(f"tile must be at least 8 pixels, got {tile}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or overlap < 0:
        raise ValueError(f"tile_overlap must be a non-negative int, got {overlap!r}")
    if tile and overlap >= tile:
        raise ValueError(f"tile_overlap ({overlap}) must be smaller than tile ({tile})")
    if weight not in _TILE_WEIGHTS:
        raise ValueError(f"tile_weight must be one of {_TILE_WEIGHTS}, got {weight!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_tile_batch must be a positive int, got {max_batch!r}")


def _single_device(device_map: Any) -> torch.device | None:
    if device_map is None:
        return None
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise NotImplementedError(
                f"device_map={device_map!r}: a prior lives on one device; pass one device"
            )
        device_map = devices.pop()
    if isinstance(device_map, int):
        return torch.device("cuda", device_map)
    if isinstance(device_map, str) and device_map in (
        "auto",
        "balanced",
        "balanced_low_0",
        "sequential",
    ):
        return torch.device("cuda") if torch.cuda.is_available() else None
    return torch.device(device_map)


def _weight_files(
    path: str | os.PathLike, subfolder: str | None, variant: str | None, hub_kwargs: dict
) -> list[str]:
    """Local or Hub paths of the safetensors file(s), following diffusers' names and sharding."""
    import json

    def name(base: str) -> str:
        if variant is None:
            return base
        stem, _, ext = base.partition(".")
        return f"{stem}.{variant}.{ext}"

    folder = Path(path, subfolder or "")
    if Path(path).is_dir():
        single = folder / name(WEIGHTS_NAME)
        if single.is_file():
            return [str(single)]
        index = folder / name(WEIGHTS_INDEX_NAME)
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [str(folder / s) for s in shards]
        raise MissingWeightsError(
            f"{folder}: no {name(WEIGHTS_NAME)} (or sharded index) next to config.json; "
            "save the prior with PriorModel.save_pretrained"
        )

    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    def download(filename: str) -> str:
        return hf_hub_download(str(path), filename, subfolder=subfolder, **hub_kwargs)

    try:
        return [download(name(WEIGHTS_NAME))]
    except EntryNotFoundError:
        pass
    try:
        index_file = download(name(WEIGHTS_INDEX_NAME))
    except EntryNotFoundError as err:
        raise MissingWeightsError(
            f"{path}: no {name(WEIGHTS_NAME)} in the repository"
            + (f" subfolder {subfolder!r}" if subfolder else "")
        ) from err
    shards = sorted(set(json.loads(Path(index_file).read_text())["weight_map"].values()))
    return [download(s) for s in shards]
