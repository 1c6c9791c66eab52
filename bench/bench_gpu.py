"""GPU UNet throughput: attention backends, torch.compile, channels_last, merged LoRAs.

    .venv/bin/python -m bench.bench_gpu [--json out.json]     # on a CUDA machine

SD1.5-size (512x512) and SDXL-size (1024x1024) UNets with random weights in fp16, batch 1
with CFG (UNet batch 2), 20 steps: iterations per second and peak GPU memory for each
configuration. xformers rows appear only where xformers imports against this torch build.
The same code runs on the CPU with the tiny UNet (`--cpu-smoke`) so tests cover it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipelines.devices import xformers_status


@dataclass(frozen=True)
class Variant:
    """One way of running the UNet."""

    attention: str  # "sdpa" or "xformers"
    compile_mode: str | None  # None, "max-autotune-no-cudagraphs" or "max-autotune"
    channels_last: bool
    loras: int  # merged rank-16 LoRAs (0 or 5)

    @property
    def label(self) -> str:
        parts = [self.attention, self.compile_mode or "eager"]
        if self.channels_last:
            parts.append("channels_last")
        parts.append(f"{self.loras} LoRAs merged")
        return ", ".join(parts)


def variants(device: torch.device) -> list[Variant]:
    """Every configuration worth measuring on `device` (xformers only where it runs)."""
    attentions = ["sdpa"] + (["xformers"] if xformers_status(device)[0] else [])
    modes: list[str | None] = [None]
    if device.type == "cuda":
        modes += ["max-autotune-no-cudagraphs", "max-autotune"]
    found = [Variant(a, None, False, 0) for a in attentions]
    found += [Variant("sdpa", None, True, 0)]
    found += [Variant("sdpa", mode, True, 0) for mode in modes if mode]
    found += [Variant("sdpa", None, False, 5)]
    return found


def unet_config(kind: str) -> dict:
    """Diffusers configs of the real SD1.5 and SDXL UNets, and a tiny one for smoke tests."""
    if kind == "sd15":
        return {
            "cross_attention_dim": 768,
            "attention_head_dim": 8,
            "block_out_channels": (320, 640, 1280, 1280),
        }
    if kind == "sdxl":
        return {
            "cross_attention_dim": 2048,
            "attention_head_dim": [5, 10, 20],
            "block_out_channels": (320, 640, 1280),
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "transformer_layers_per_block": [1, 2, 10],
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        }
    return {
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    }


def merge_random_loras(unet: torch.nn.Module, count: int, rank: int = 16) -> None:
    """Add `count` random rank-16 deltas to every attention projection, as merging does."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, module in unet.named_modules():
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in (
                "to_q",
                "to_k",
                "to_v",
                "0",
            ):
                out_features, in_features = module.weight.shape
                for _ in range(count):
                    up = torch.randn(out_features, rank, generator=generator) * 0.01
                    down = torch.randn(rank, in_features, generator=generator) * 0.01
                    module.weight += (up @ down).to(module.weight)


def measure(
    kind: str, variant: Variant, device: torch.device, dtype: torch.dtype, size: int, steps: int
) -> dict:
    """Iterations per second of `steps` UNet calls and the peak device memory."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = unet_config(kind)
    unet = UNet2DConditionModel(sample_size=size // 8, **config).to(device, dtype).eval()
    if variant.loras:
        merge_random_loras(unet, variant.loras)
    if variant.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    if variant.channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    forward = unet
    if variant.compile_mode:
        forward = torch.compile(unet, mode=variant.compile_mode, fullgraph=False)
    latent = torch.randn(2, 4, size // 8, size // 8, device=device, dtype=dtype)
    context = torch.randn(2, 77, config["cross_attention_dim"], device=device, dtype=dtype)
    extra = {}
    if config.get("addition_embed_type") == "text_time":
        extra["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 1280, device=device, dtype=dtype),
            "time_ids": torch.randn(2, 6, device=device, dtype=dtype),
        }
    timestep = torch.tensor([500, 500], device=device)

    def run() -> None:
        with torch.inference_mode():
            for _ in range(steps):
                forward(latent, timestep, encoder_hidden_states=context, **extra)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    run()  # warm-up (and compilation)
    times = []
    for _ in range(3):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    return {
        "model": kind,
        "size": size,
        "variant": variant.label,
        **asdict(variant),
        "it_per_s": steps / statistics.median(times),
        "spread_it_per_s": steps / min(times) - steps / max(times),
        "peak_gpu_mb": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny UNet on the CPU")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.cpu_smoke:
        device, dtype, cases = torch.device("cpu"), torch.float32, [("tiny", 64, 2)]
    elif torch.cuda.is_available():
        device, dtype, cases = (
            torch.device("cuda"),
            torch.float16,
            [("sd15", 512, 20), ("sdxl", 1024, 20)],
        )
    else:
        raise SystemExit("no CUDA device: run with --cpu-smoke, or on a GPU machine")
    rows = [
        measure(kind, v, device, dtype, size, steps)
        for kind, size, steps in cases
        for v in variants(device)
    ]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"# {name}, torch {torch.__version__}, {dtype}")
    print("| model | size | configuration | it/s | peak GPU MB |\n|---|---:|---|---:|---:|")
    for row in rows:
        peak = f"{row['peak_gpu_mb']:.0f}" if row["peak_gpu_mb"] is not None else "-"
        print(
            f"| {row['model']} | {row['size']} | {row['variant']} | "
            f"{row['it_per_s']:.2f} ±{row['spread_it_per_s']:.2f} | {peak} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"device": name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
