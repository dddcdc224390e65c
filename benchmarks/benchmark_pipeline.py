"""Speed and peak memory of each RAIM stage, side by side with diffusers' own img2img.

For every output size the script restores one photo (scikit-image's astronaut, resized to
``size / prior scale``) with `RaimPipeline` and times each stage inside that one call
(prior, generate, detect, fuse) plus the whole call. It then runs diffusers'
`StableDiffusionXLImg2ImgPipeline` (or `StableDiffusionImg2ImgPipeline`) built from the *same*
VAE, UNet, text encoders and scheduler config, on the prior's output, with the same steps,
strength and guidance scale, and prints one table row per size.

Models (pick one):

* ``--model DIR_OR_REPO``: a diffusers SD 1.x/2.x/SDXL folder or hub id (loaded as
  `RaimPipeline.from_pretrained` loads it; offline if the files are cached).
* ``--random sdxl|sd15``: full-size architectures built from the configs of
  ``stabilityai/stable-diffusion-xl-base-1.0`` / ``runwayml/stable-diffusion-v1-5`` with random
  weights (`raim_diffusion.testing.random_components`, no download): the speed and memory of the
  real models, meaningless pictures.
* ``--tiny sd15|sdxl``: the tiny random components of `raim_diffusion.testing` (CPU smoke runs).

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (weights included). On the CPU it is
the process's peak resident set size during the call (``VmHWM`` after resetting it through
``/proc/self/clear_refs``; on systems without it, a 2 ms RSS sampling thread).

Usage::

    python benchmarks/benchmark_pipeline.py --random sdxl --sizes 1024 2048 4096 --steps 30 \\
        --strength 0.5 --device cuda --json sdxl.json
    python benchmarks/benchmark_pipeline.py --tiny sd15 --sizes 64 128 --steps 2 --device cpu
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
)

from raim_diffusion.artifacts import ArtifactDetector
from raim_diffusion.files import atomic_write
from raim_diffusion.fusion import PRESETS as FUSION_PRESETS
from raim_diffusion.fusion import FusionNet
from raim_diffusion.images import to_tensor
from raim_diffusion.pipeline import RaimPipeline
from raim_diffusion.prior import load_prior
from raim_diffusion.testing import RANDOM_REPOS, random_components, tiny_components, tiny_prior

STAGE_NAMES = ("prior", "generate", "detect", "fuse")
# The `RaimPipeline` method that runs each stage (timed from inside the pipeline call).
STAGE_METHODS = {
    "prior": "run_prior",
    "generate": "generate",
    "detect": "detect_artifacts",
    "fuse": "fuse_artifacts",
}
COLUMNS = (
    "size",
    "input",
    "prior s",
    "generate s",
    "detect s",
    "fuse s",
    "total s",
    "diffusers s",
    "total/diffusers",
    "peak MiB",
    "diffusers peak MiB",
)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # Modules are created in float32; casting to float32 again only makes diffusers warn.
    if dtype != torch.float32:
        module = module.to(dtype)
    return module.eval()


# ---------------------------------------------------------------------------------------------
# Measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _read_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory of a block, in MiB: CUDA allocator peak, or the process's peak RSS on CPU.

    Example::

        with PeakMemory(device) as peak:
            run()
        print(peak.mib, peak.method)
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float = float("nan")
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while not self._stop.is_set():
            self._sampled = max(self._sampled, process.memory_info().rss)
            self._stop.wait(0.002)

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
            return self
        # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0): an exact peak at no cost.
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if _read_hwm_kib() is not None:
                self.method = "peak RSS (VmHWM)"
                return self
        except OSError:
            pass
        self.method = "peak RSS (sampled every 2 ms)"
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            _sync(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.mib = self._sampled / 2**20
        else:
            self.mib = (_read_hwm_kib() or 0) / 1024


def is_oom(error: BaseException) -> bool:
    """Whether ``error`` is an out-of-memory error of any torch backend."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class StageTimer:
    """Times `RaimPipeline`'s stage methods from inside one ``pipe(...)`` call.

    The stage methods are wrapped on the *instance*, so the call runs exactly the code a user
    runs; each wrapper synchronises CUDA before reading the clock.
    """

    def __init__(self, pipe: RaimPipeline, device: torch.device, stage_methods: dict[str, str]):
        self.seconds: dict[str, float] = {}
        self._device = device
        self._pipe = pipe
        self._methods = tuple(stage_methods.values())
        for stage, method in stage_methods.items():
            setattr(pipe, method, self._wrap(stage, getattr(pipe, method)))

    def _wrap(self, stage: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            _sync(self._device)
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(self._device)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            return out

        return timed

    def reset(self) -> None:
        self.seconds = {}

    def remove(self) -> None:
        """Restore the pipeline's own methods."""
        for method in self._methods:
            self._pipe.__dict__.pop(method, None)


# ---------------------------------------------------------------------------------------------
# Building


def _dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"--dtype {name!r} is not supported; use one of {sorted(table)}")
    return table[name]


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f}M" if count >= 10_000 else f"{count / 1e3:.2f}K"


def _count(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def build_pipeline(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[RaimPipeline, str]:
    """The RAIM pipeline of the chosen mode, on ``device``; returns it and a one-line label."""
    if args.tiny:
        prior = load_prior(args.prior, device=device) if args.prior else tiny_prior(scale=2)
        components = tiny_components(args.tiny)
        components.pop("safety_checker", None)
        components.pop("feature_extractor", None)
        pipe = RaimPipeline(**components, prior=prior)
        label = f"tiny random {args.tiny} (raim_diffusion.testing)"
    elif args.random:
        # The prior keeps its own dtype policy (fp16 on CUDA where the architecture allows).
        prior = load_prior(args.prior or "realesrgan-x4plus", device=device)
        pipe = RaimPipeline(**random_components(args.random, device, dtype), prior=prior)
        label = f"random-weight {args.random} at full size ({RANDOM_REPOS[args.random]} configs)"
    else:
        pipe = RaimPipeline.from_pretrained(
            args.model, prior=args.prior or "realesrgan-x4plus", torch_dtype=dtype
        )
        label = f"{args.model}"
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, label


def build_baseline(pipe: RaimPipeline) -> StableDiffusionImg2ImgPipeline:
    """diffusers' own img2img pipeline sharing ``pipe``'s modules (no copy of the weights)."""
    # A fresh scheduler of the same config: the two pipelines must not share step state.
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    if pipe.is_sdxl:
        baseline = StableDiffusionXLImg2ImgPipeline(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            text_encoder_2=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer,
            tokenizer_2=pipe.tokenizer_2,
            unet=pipe.unet,
            scheduler=scheduler,
            requires_aesthetics_score=False,
            add_watermarker=False,
        )
    else:
        baseline = StableDiffusionImg2ImgPipeline(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=pipe.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    baseline.set_progress_bar_config(disable=True)
    return baseline


def build_fusion(
    name: str, device: torch.device, dtype: torch.dtype
) -> tuple[FusionNet | None, str]:
    """Stage-4 network: ``"blend"`` (none), a preset with random weights, or a saved folder."""
    if name == "blend":
        return None, "pyramid blend of the prior (no fusion network)"
    if name in FUSION_PRESETS:
        net = FusionNet.from_preset(name)
        label = f"FusionNet preset {name!r}, random weights ({_millions(_count(net))} params)"
    else:
        net = FusionNet.from_pretrained(name)
        label = f"FusionNet from {name} ({_millions(_count(net))} params)"
    return _cast(net.to(device), dtype), label


def sample_photo(height: int, width: int) -> torch.Tensor:
    """scikit-image's astronaut (a real photo, bundled) resized to ``height x width``, 1x3xHxW."""
    import skimage.data

    photo = to_tensor(skimage.data.astronaut())
    return F.interpolate(photo, size=(height, width), mode="bicubic", antialias=True).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Running


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def run_size(
    size: int,
    pipe: RaimPipeline,
    baseline: Any,
    detector: ArtifactDetector,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Time RAIM (per stage and in total) and the diffusers baseline at one output size."""
    scale = pipe.prior.scale if pipe.prior is not None else 1.0
    in_side = max(1, round(size / scale))
    x_lq = sample_photo(in_side, in_side).to(device)
    row: dict[str, Any] = {"size": size, "input": in_side}

    timer = StageTimer(pipe, device, STAGE_METHODS)
    fusion_tile = args.fusion_tile or None

    def call_raim() -> Any:
        generator = torch.Generator(device).manual_seed(0)
        return pipe(
            x_lq,
            num_inference_steps=args.steps,
            strength=args.strength,
            guidance_scale=args.guidance_scale,
            tile=args.tile,
            vae_tile=args.vae_tile,
            generator=generator,
            output_type="pt",
            detector=detector,
            fusion_tile=fusion_tile,
        )

    stage_runs: dict[str, list[float]] = {s: [] for s in STAGE_NAMES}
    totals: list[float] = []
    x_prior = None
    row["status"] = "ok"
    try:
        for _ in range(args.warmup):
            call_raim()
        with PeakMemory(device) as peak:
            for _ in range(args.repeats):
                timer.reset()
                _sync(device)
                start = time.perf_counter()
                out = call_raim()
                _sync(device)
                totals.append(time.perf_counter() - start)
                for s in STAGE_NAMES:
                    stage_runs[s].append(timer.seconds.get(s, 0.0))
        x_prior = out.prior_images
        row["masked_fraction"] = float(out.masks.mean()) if out.masks is not None else 0.0
        row["peak_mib"] = peak.mib
        row["memory_method"] = peak.method
    except Exception as err:  # noqa: BLE001 - only OOM is reported; anything else re-raises
        if not is_oom(err):
            raise
        row["status"] = "OOM"
    finally:
        timer.remove()
        _free(device)
    for s in STAGE_NAMES:
        row[f"{s}_s"] = _median(stage_runs[s])
    row["total_s"] = _median(totals)
    row["other_s"] = row["total_s"] - sum(row[f"{s}_s"] for s in STAGE_NAMES)

    row["diffusers_s"] = float("nan")
    row["diffusers_peak_mib"] = float("nan")
    row["diffusers_status"] = "skipped" if baseline is None else "ok"
    if baseline is not None:
        if x_prior is None:  # RAIM did not get through the prior: run it alone for the input
            try:
                with torch.no_grad():
                    x_prior = pipe.run_prior(x_lq, scale).float().cpu()
            except Exception as err:  # noqa: BLE001
                if not is_oom(err):
                    raise
                x_prior = sample_photo(size, size)
            _free(device)
        image = x_prior.to(device)

        def call_diffusers() -> Any:
            generator = torch.Generator(device).manual_seed(0)
            return baseline(
                prompt=pipe.config.default_prompt,
                negative_prompt=pipe.config.default_negative_prompt,
                image=image,
                num_inference_steps=args.steps,
                strength=args.strength,
                guidance_scale=args.guidance_scale,
                generator=generator,
                output_type="pt",
            )

        times: list[float] = []
        try:
            for _ in range(args.warmup):
                call_diffusers()
            with PeakMemory(device) as peak:
                for _ in range(args.repeats):
                    _sync(device)
                    start = time.perf_counter()
                    call_diffusers()
                    _sync(device)
                    times.append(time.perf_counter() - start)
            row["diffusers_s"] = _median(times)
            row["diffusers_peak_mib"] = peak.mib
        except Exception as err:  # noqa: BLE001
            if not is_oom(err):
                raise
            row["diffusers_status"] = "OOM"
        finally:
            _free(device)
    ok = row["status"] == "ok" and row["diffusers_status"] == "ok"
    row["ratio"] = row["total_s"] / row["diffusers_s"] if ok else float("nan")
    return row


def _cell(value: Any, status: str = "ok", digits: int = 4) -> str:
    if status != "ok":
        return status
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a fixed-width text table (one row per size)."""
    lines = []
    for r in rows:
        raim, base = r["status"], r["diffusers_status"]
        lines.append(
            [
                str(r["size"]),
                str(r["input"]),
                *(_cell(r[f"{s}_s"], raim) for s in STAGE_NAMES),
                _cell(r["total_s"], raim),
                _cell(r["diffusers_s"], base),
                _cell(r["ratio"], "ok", 2),
                _cell(r.get("peak_mib", float("nan")), raim, 0),
                _cell(r["diffusers_peak_mib"], base, 0),
            ]
        )
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(COLUMNS)]
    out = ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-stage speed and peak memory of RaimPipeline vs diffusers' img2img.",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="diffusers SD/SDXL folder or hub id")
    which.add_argument(
        "--random", choices=sorted(RANDOM_REPOS), help="full-size architecture, random weights"
    )
    which.add_argument(
        "--tiny", choices=["sd15", "sd2", "sdxl"], help="tiny random components (CPU smoke run)"
    )
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096], help="output sides (px)"
    )
    parser.add_argument("--steps", type=int, default=30, help="num_inference_steps")
    parser.add_argument("--strength", type=float, default=0.5, help="img2img strength")
    parser.add_argument("--guidance-scale", type=float, default=5.0, help="CFG scale (both)")
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default=None,
        help="weights dtype (default: float16 on CUDA, float32 on CPU)",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if any)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per size (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per size first")
    parser.add_argument(
        "--prior",
        default=None,
        help="prior name or file (default: realesrgan-x4plus; tiny: tiny x2)",
    )
    parser.add_argument(
        "--segmenter",
        default="none",
        help="detector segmentation model id, or 'none' (uniform class weights)",
    )
    parser.add_argument(
        "--fusion",
        default=None,
        help="'blend', a FusionNet preset (tiny/light/base, random weights) or "
        "a saved FusionNet folder (default: tiny for --tiny, light for "
        "--random, the folder's own fusion network or the blend for --model)",
    )
    parser.add_argument("--fusion-tile", type=int, default=512, help="FusionNet tile (0 = none)")
    parser.add_argument(
        "--tile", type=int, default=None, help="RAIM latent tile (default: automatic, 0 = never)"
    )
    parser.add_argument("--vae-tile", type=int, default=None, help="RAIM VAE tile (px)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: torch's choice); 1 avoids OpenMP "
        "spin-waiting on a busy shared CPU",
    )
    parser.add_argument("--no-diffusers", action="store_true", help="skip the baseline")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if any(s < 8 for s in args.sizes):
        parser.error(f"--sizes must all be >= 8 px, got {args.sizes}")
    if args.fusion is None and not args.model:
        args.fusion = "tiny" if args.tiny else "light"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints the table (and writes ``--json``). Returns the exit status."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = _dtype(args.dtype, device)

    t0 = time.perf_counter()
    pipe, label = build_pipeline(args, device, dtype)
    baseline = None if args.no_diffusers else build_baseline(pipe)
    if args.fusion is None:  # --model: whatever the folder holds (a RAIM folder may have one)
        fusion = pipe.fusion if isinstance(pipe.fusion, FusionNet) else None
        fusion_label = (
            f"the model folder's FusionNet ({_millions(_count(fusion))} params)"
            if fusion is not None
            else "pyramid blend of the prior (no fusion network)"
        )
    else:
        fusion, fusion_label = build_fusion(args.fusion, device, dtype)
    # Stage 4 uses the pipeline's `fusion` component (the pyramid blend when it is None).
    pipe.register_modules(fusion=fusion)
    detector = ArtifactDetector(segmenter=args.segmenter, device=device)
    build_s = time.perf_counter() - t0

    params = {
        name: _count(getattr(pipe, name))
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "prior")
        if getattr(pipe, name, None) is not None
    }
    seg = args.segmenter
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    notes = [
        f"model: {label}",
        "params: " + ", ".join(f"{k} {_millions(v)}" for k, v in params.items()),
        f"device: {device} ({hardware}, {torch.get_num_threads()} threads), "
        f"dtype: {str(dtype).replace('torch.', '')}",
        f"steps {args.steps}, strength {args.strength}, guidance scale {args.guidance_scale}, "
        f"warmup {args.warmup}, repeats {args.repeats} (median)",
        f"prior: x{pipe.prior.scale:g}, input = size / {pipe.prior.scale:g}"
        if pipe.prior is not None
        else "prior: none (bicubic)",
        "detector: DeSRA reference mode, "
        + (
            "segmenter=None (no segmentation weights: uniform class weights)"
            if seg == "none"
            else f"segmenter {seg}"
        ),
        f"fusion: {fusion_label}",
        "diffusers baseline: "
        + (
            "skipped"
            if baseline is None
            else f"{type(baseline).__name__}, same modules, on the prior's output"
        ),
        f"build time: {build_s:.1f} s",
    ]
    print("\n".join(notes), flush=True)

    rows = []
    for size in args.sizes:
        row = run_size(size, pipe, baseline, detector, args, device)
        rows.append(row)
        print(
            f"size {size}: done (RAIM {row['status']}, diffusers {row['diffusers_status']})",
            file=sys.stderr,
            flush=True,
        )
    memory = next((r["memory_method"] for r in rows if "memory_method" in r), "")
    print(f"peak memory: {memory}")
    print(format_table(rows))

    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        payload = {
            "config": config,
            "device": str(device),
            "dtype": str(dtype),
            "params": params,
            "notes": notes,
            "results": rows,
        }
        with atomic_write(args.json, "w") as f:
            # NaN is not JSON: missing numbers are written as null.
            json.dump(_json_safe(payload), f, indent=2)
    return 0


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    # Benchmarks should not fight over threads with a tokenizer pool.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
