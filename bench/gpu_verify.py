"""GPU correctness checks that need a CUDA device, as one prepared command (minutes):

1. the determinism matrix on the GPU: every sampler x schedule twice with the same seed
   (SD1.5 layout with seeded random weights, fp16, 256x256, 4 steps): identical pixels?
2. compiled paths against eager: the same request (and, after a LoRA stack change, the
   same changed request) through the eager engine, `--compile`, and compile + CUDA graphs:
   how far apart are the images (uint8 pixel differences)?

    python3 -m bench.gpu_verify [--json out.json]        # on a CUDA machine
    python3 -m bench.gpu_verify --cpu-smoke              # tiny model, CPU (tests)

Everything goes through `Service.generate` (the engine, the adapter stack, the device plan)
as `bench.bench_gpu` builds it. Nothing is asserted here: the command prints what it saw.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.bench_gpu import build
from bench.common import machine
from pipelines.loading import CONFIGS_DIR
from pipelines.samplers import SAMPLER_NAMES, schedulers_for
from pipelines.schema import GenerationRequest, LoraSpec
from pipelines.service import Service


def pixels(service: Service, **fields: Any) -> np.ndarray:
    request = GenerationRequest(prompt="a photo of a cat", seed=7, **fields)
    return np.asarray(service.generate(request).images[0], dtype=np.int16)


def determinism(
    yaml: Path, size: int, device: str, samplers: list[str], log: Path | None = None
) -> dict[str, Any]:
    """Each sampler x schedule twice in one process: the combinations whose two images
    differ, with the largest pixel difference. Each combination is appended to `log` as it
    is checked (a run stopped early still says how far it got)."""
    differing: dict[str, int] = {}
    count = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as name:
        service, _ = build(yaml, Path(name), device, "eager", 4)
        # every sampler's automatic schedule first: a run stopped early has covered them
        pairs = [(sampler, schedulers_for(sampler)) for sampler in samplers]
        ordered = [(sampler, names[0]) for sampler, names in pairs]
        ordered += [(sampler, name) for sampler, names in pairs for name in names[1:]]
        for sampler, schedule in ordered:
            fields = dict(sampler_name=sampler, scheduler=schedule, steps=4)
            first = pixels(service, width=size, height=size, **fields)
            second = pixels(service, width=size, height=size, **fields)
            count += 1
            largest = int(np.abs(first - second).max())
            if largest:
                differing[f"{sampler} / {schedule}"] = largest
            if log is not None:
                with log.open("a") as writer:
                    writer.write(f"{sampler} / {schedule}: largest difference {largest}\n")
    return {
        "combinations": count,
        "differing": differing,
        "seconds": time.perf_counter() - started,
    }


def compiled_agreement(yaml: Path, size: int, device: str, modes: list[str]) -> dict[str, Any]:
    """The same two requests (a stack, then the stack with one weight changed) in each
    mode; each image's largest and mean pixel difference from the eager one."""
    images: dict[str, list[np.ndarray]] = {}
    for mode in ["eager", *modes]:
        with tempfile.TemporaryDirectory() as name:
            service, loras = build(yaml, Path(name), device, mode, 4)
            stacks = [
                (LoraSpec(loras[0], 0.8), LoraSpec(loras[1], 0.5)),
                (LoraSpec(loras[0], -0.6), LoraSpec(loras[1], 0.5)),
            ]
            fields = dict(width=size, height=size, steps=6, sampler_name="Euler")
            images[mode] = [pixels(service, loras=stack, **fields) for stack in stacks]
    eager = images["eager"]
    rows = {
        mode: [
            {"max": int(np.abs(a - b).max()), "mean": float(np.abs(a - b).mean())}
            for a, b in zip(eager, shown, strict=True)
        ]
        for mode, shown in images.items()
        if mode != "eager"
    }
    stack_effect = float(np.abs(eager[0] - eager[1]).mean())
    return {"vs_eager": rows, "stack_change_mean_difference": stack_effect}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--log", type=Path, help="append each determinism check here")
    parser.add_argument(
        "--determinism-only", action="store_true", help="skip the compiled-path comparison"
    )
    args = parser.parse_args()
    if args.cpu_smoke:
        yaml, size, device = CONFIGS_DIR / "demo-tiny.yaml", 64, "cpu"
        samplers, modes = ["Euler a", "DPM++ 2S a"], ["dynamo-eager"]
    elif torch.cuda.is_available():
        yaml, size, device = CONFIGS_DIR / "v1-inference.yaml", 256, "cuda"
        samplers, modes = list(SAMPLER_NAMES), ["compile", "compile+cudagraphs"]
    else:
        raise SystemExit("no CUDA device: run with --cpu-smoke, or on a GPU machine")
    print(f"Machine: {machine()}; device {device}", flush=True)
    report: dict[str, Any] = {"machine": machine()}
    report["determinism"] = determinism(yaml, size, device, samplers, args.log)
    found = report["determinism"]
    print(
        f"determinism: {found['combinations']} sampler x schedule combinations twice at "
        f"{size}x{size}, 4 steps, in {found['seconds']:.0f} s; differing: "
        f"{found['differing'] or 'none'}",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.determinism_only:
        return
    report["compiled"] = compiled_agreement(yaml, size, device, modes)
    agreement = report["compiled"]
    for mode, rows in agreement["vs_eager"].items():
        shown = ", ".join(f"max {r['max']}, mean {r['mean']:.3f}" for r in rows)
        print(f"{mode} vs eager (uint8 pixel difference; stack, then changed stack): {shown}")
    print(
        "the stack change itself moves the eager image by a mean of "
        f"{agreement['stack_change_mean_difference']:.3f}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
