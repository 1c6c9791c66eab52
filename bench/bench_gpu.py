"""GPU benchmark through the real engine: eager vs `--compile`, a LoRA stack change under
`--compile` (time and recompiles), peak memory and the first image.

    .venv/bin/python -m bench.bench_gpu [--models sd15,sdxl] [--json out.json]  # CUDA machine
    .venv/bin/python -m bench.bench_gpu --cpu-smoke                   # tiny model, CPU (tests)

Everything goes through `Service.generate` on an `Engine` with the product's device plan
(fp16, SDPA, `place_pipeline`), its adapter stack (two rank-16 kohya LoRA files on every
attention projection, resolved from a LoRA folder like any request's) and
`pipelines.compiled`. Models: SD1.5 layout at 512x512 and/or SDXL layout at 1024x1024
(`--models`), seeded random weights, Euler, CFG 7. UNet it/s = (20 - 4) steps over the time
difference of a 20-step and a 4-step image, so prompt encoding and decoding cancel out.
One prepared command, in priority order, meant to fit in 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from bench.bench_lora import write_loras
from bench.common import Stat, machine
from pipelines.compiled import compile_pipeline, compiled_graphs
from pipelines.devices import plan_device
from pipelines.engine import Engine
from pipelines.loading import CONFIGS_DIR, random_pipeline
from pipelines.schema import GenerationRequest, LoraSpec
from pipelines.service import Service, build_service
from pipelines.settings import Settings

REPEATS = 3


def synced(function: Callable[[], object]) -> float:
    """Seconds of `function`, the device queue drained before and after."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def build(yaml: Path, folder: Path, device: str, mode: str, rank: int) -> tuple[Service, list[str]]:
    """A service on `device` whose engine holds a seeded random pipeline of `yaml`, in
    `mode` ("eager", "compile", "compile+cudagraphs", or "dynamo-eager": dynamo's capture
    and guards without code generation, for the smoke run), with two LoRA files written
    for that pipeline."""
    loaded = random_pipeline(yaml, 0, folder / "config")
    loras = folder / "loras"
    if not loras.is_dir():
        loras.mkdir()
        write_loras(loaded.pipe.unet, 2, rank, loras)
    settings = Settings(data_dir=folder, ckpt_dirs=(folder / "none",), lora_dirs=(loras,))
    backend = {"compile": "inductor", "dynamo-eager": "eager"}.get(mode)
    if mode == "compile+cudagraphs":
        backend = None  # compiled here with CUDA graphs; the plan leaves it be
        compile_pipeline(loaded.pipe, torch.device(device), cuda_graphs=True)
    plan = replace(plan_device(device), compile=backend)
    service = build_service(settings, lambda s, f: Engine(s, f, plan=plan))
    service.runner.use_pipeline(loaded, yaml.stem)  # type: ignore[attr-defined]
    return service, ["lora0", "lora1"]


def plain_diffusers(yaml: Path, folder: Path, device: str) -> Callable[[int, int], object]:
    """The same seeded random pipeline run by diffusers itself (fp16 on CUDA, no LoRA, no
    engine): the reference the engine's eager row is read against on the same machine."""
    loaded = random_pipeline(yaml, 0, folder / "config")
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = loaded.pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)

    def run(count: int, size: int) -> object:
        generator = torch.Generator(device).manual_seed(1)
        return pipe(
            "a photo of a cat",
            num_inference_steps=count,
            height=size,
            width=size,
            guidance_scale=7.0,
            generator=generator,
        )

    return run


def measure(yaml: Path, size: int, steps: int, device: str, mode: str, rank: int) -> dict:
    """First image, UNet it/s, a stack change's time and recompiles, peak memory (mode
    "diffusers": the plain diffusers reference, which has no stack to change)."""
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        started = time.perf_counter()
        if mode == "diffusers":
            reference, service, loras = plain_diffusers(yaml, folder, device), None, []
        else:
            service, loras = build(yaml, folder, device, mode, rank)
        built = time.perf_counter() - started
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

        def image(count: int, stack: tuple[LoraSpec, ...] = ()) -> float:
            if service is None:
                return synced(lambda: reference(count, size))
            job = GenerationRequest(
                prompt="a photo of a cat",
                seed=1,
                steps=count,
                width=size,
                height=size,
                sampler_name="Euler",
                cfg_scale=7.0,
                loras=stack,
            )
            return synced(lambda: service.generate(job))

        graphs = compiled_graphs()
        first = image(steps)
        first_graphs = compiled_graphs() - graphs
        image(min(4, steps))  # the short request's own first run
        long_runs, short_runs = [], []
        for _ in range(REPEATS):
            long_runs.append(image(steps))
            short_runs.append(image(min(4, steps)))
        short = min(4, steps)
        differences = [a - b for a, b in zip(long_runs, short_runs, strict=True)]
        rates = tuple((steps - short) / d for d in differences if d > 0)
        invalid = len(differences) - len(rates)
        change: tuple[float, ...] = ()
        recompiles = None
        if service is not None:
            stack_a = (LoraSpec(loras[0], 0.8), LoraSpec(loras[1], 0.5))
            stack_b = (LoraSpec(loras[0], 0.3), LoraSpec(loras[1], 0.5))
            image(short, stack_a)
            graphs = compiled_graphs()
            changed, same = [], []
            for index in range(REPEATS):
                changed.append(image(short, stack_b if index % 2 == 0 else stack_a))
                same.append(image(short, stack_b if index % 2 == 0 else stack_a))
            recompiles = compiled_graphs() - graphs
            change = tuple(a - b for a, b in zip(changed, same, strict=True))
        peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "model": yaml.stem,
        "size": size,
        "steps": steps,
        "mode": mode,
        "repeats": REPEATS,
        "build_s": built,
        "first_image_s": first,
        "first_image_graphs": first_graphs,
        # a pair whose short image took as long as the long one (a loaded machine) gives
        # no rate; the cell says so instead of dividing by nothing
        "it_per_s": Stat(rates).as_dict() if not invalid else None,
        "it_per_s_invalid_pairs": invalid,
        "stack_change_s": Stat(change).as_dict() if change else None,
        "stack_change_recompiles": recompiles,
        "peak_gpu_mb": peak,
    }


def print_table(device: str, rows: list[dict]) -> None:
    print(f"Machine: {machine()}; device {device}; median of {REPEATS} repeats ± spread")
    print(
        "| model | size | mode | first image s (graphs) | UNet it/s | stack change s | "
        "recompiles on stack changes | peak GPU MB |\n|---|---:|---|---:|---:|---:|---:|---:|"
    )
    for row in rows:
        change = row["stack_change_s"]
        rate = row["it_per_s"]
        rated = (
            f"{rate['median']:.2f} ±{rate['spread']:.2f}"
            if rate
            else f"no rate ({row['it_per_s_invalid_pairs']} of {REPEATS} pairs inverted by load)"
        )
        peak = f"{row['peak_gpu_mb']:.0f}" if row["peak_gpu_mb"] is not None else "-"
        changed = f"{change['median']:.3f} ±{change['spread']:.3f}" if change else "-"
        recompiles = row["stack_change_recompiles"]
        print(
            f"| {row['model']} | {row['size']} | {row['mode']} | {row['first_image_s']:.1f} "
            f"({row['first_image_graphs']}) | {rated} | "
            f"{changed} | {'-' if recompiles is None else recompiles} | {peak} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument(
        "--models",
        default="sd15",
        help="comma-separated, in order: sd15 (512x512), sdxl (1024x1024)",
    )
    parser.add_argument("--cuda-graphs", action="store_true", help="also compile + CUDA graphs")
    parser.add_argument(
        "--modes", help="comma-separated subset, in order (say: diffusers,eager); default all"
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.cpu_smoke:
        cases = [(CONFIGS_DIR / "demo-tiny.yaml", 64, 6, 4)]
        device, modes = "cpu", ["diffusers", "eager", "dynamo-eager"]
    elif torch.cuda.is_available():
        layouts = {
            "sd15": (CONFIGS_DIR / "v1-inference.yaml", 512, 20, 16),
            "sdxl": (CONFIGS_DIR / "sd_xl_base.yaml", 1024, 20, 16),
        }
        names = [name.strip() for name in args.models.split(",") if name.strip()]
        unknown = [name for name in names if name not in layouts]
        if unknown or not names:
            parser.error(f"--models: unknown {unknown or 'empty list'}; choose from sd15, sdxl")
        cases = [layouts[name] for name in names]
        device, modes = "cuda", ["diffusers", "eager", "compile"]
        if args.cuda_graphs:
            modes.append("compile+cudagraphs")
    else:
        raise SystemExit("no CUDA device: run with --cpu-smoke, or on a GPU machine")
    if args.modes:
        chosen = [name.strip() for name in args.modes.split(",") if name.strip()]
        if not chosen or any(name not in modes for name in chosen):
            parser.error(f"--modes: choose from {', '.join(modes)}")
        modes = chosen
    rows = []
    for yaml, size, steps, rank in cases:
        for mode in modes:
            row = measure(yaml, size, steps, device, mode, rank)
            rows.append(row)
            print_table(device, [row])  # each row as soon as it is measured
    print()
    print_table(device, rows)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
