"""Seconds per sampling step and peak memory of SUPIR's restoration sampler, full size.

The SDXL UNet with SUPIR's connectors and the control model are built at full size with random
weights (cost does not depend on the weights): `raim_diffusion.testing.random_components("sdxl")`
and `SupirControlModel.from_unet_config`. For each output side the latent is ``side / 8``; SUPIR's
tiled sampler (latent tiles of 128, stride 64) runs above 1024 px, as SUPIR does. Prints one line
per size and optionally writes JSON.

```bash
python benchmarks/benchmark_supir.py --sizes 1024 2048 --steps 4 --device cuda --dtype bfloat16
python benchmarks/benchmark_supir.py --tiny --sizes 64 --steps 2     # CPU smoke run (seconds)
```
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from raim_diffusion.diffusion.supir import SupirControlModel, SupirUNet2DConditionModel
from raim_diffusion.diffusion.supir_sampler import supir_sample
from raim_diffusion.files import atomic_write
from raim_diffusion.testing import random_components, tiny_components

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(tiny: bool, device: torch.device, dtype: torch.dtype):
    """SUPIR's UNet and control model (random weights), and the text conditioning's widths."""
    comps = tiny_components("sdxl") if tiny else random_components("sdxl", device, dtype)
    unet = SupirUNet2DConditionModel.from_unet(comps["unet"])
    with torch.device(device):
        control = SupirControlModel.from_unet_config(unet.config)
    unet, control = unet.to(device, dtype).eval(), control.to(device, dtype).eval()
    cross = unet.config.cross_attention_dim
    pooled = comps["text_encoder_2"].config.projection_dim
    return unet, control, cross, pooled


def run(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    unet, control, cross, pooled = build(args.tiny, device, dtype)
    factor = 4 if args.tiny else 8  # the tiny test VAE downsamples by 4
    rows = []
    for side in args.sizes:
        h = w = side // factor
        g = torch.Generator("cpu").manual_seed(0)
        lq = torch.randn(1, 4, h, w, generator=g).to(device, dtype)
        center = torch.randn(1, 4, h, w, generator=g).to(device, dtype)
        emb = torch.randn(1, 77, cross, generator=g).to(device, dtype)
        added = {"text_embeds": torch.randn(1, pooled, generator=g).to(device, dtype),
                 "time_ids": torch.tensor([[side, side, 0, 0, side, side]]).to(device, dtype)}
        tile = None if args.tiny or side <= 1024 else 128
        kwargs = dict(
            lq_latent=lq, x_center=center, prompt_embeds=emb, added_cond_kwargs=added,
            negative_prompt_embeds=emb, negative_added_cond_kwargs=added,
            num_inference_steps=args.steps, tile_size=tile, tile_stride=64,
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            with torch.inference_mode():
                supir_sample(control, unet, generator=g, **{**kwargs, "num_inference_steps": 1})
                _sync(device)
                start = time.perf_counter()
                supir_sample(control, unet, generator=g, **kwargs)
                _sync(device)
            seconds = (time.perf_counter() - start) / args.steps
            cuda = device.type == "cuda"
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
            row = {"size": side, "latent": h, "tile": tile, "seconds_per_step": seconds,
                   "peak_gib": peak, "dtype": args.dtype, "device": str(device)}
        except torch.cuda.OutOfMemoryError:
            row = {"size": side, "latent": h, "tile": tile, "oom": True}
            torch.cuda.empty_cache()
        rows.append(row)
        shown = "OOM" if row.get("oom") else (
            f"{row['seconds_per_step']:.3f} s/step"
            + (f", peak {row['peak_gib']:.1f} GiB" if row["peak_gib"] is not None else "")
        )
        print(f"SUPIR {side}px (latent {h}, tile {tile}): {shown}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--steps", type=int, default=4, help="timed sampling steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="bfloat16 on CUDA, float32 on the CPU by default")
    parser.add_argument("--tiny", action="store_true", help="tiny components (CPU smoke run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.dtype is None:
        args.dtype = "bfloat16" if torch.device(args.device).type == "cuda" else "float32"
    rows = run(args)
    if args.json is not None:
        with atomic_write(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
