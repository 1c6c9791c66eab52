"""Generation time on the CPU: the engine vs a plain diffusers call on the same pipeline,
and eager vs `--compile`.

Engine and diffusers run interleaved (the order alternates per repeat), in two pairs:
cold cache (the engine's prompt cache emptied before each run, diffusers encoding the
prompts) and warm cache (the engine's cache holding the prompts, diffusers given the
`prompt_embeds` it encoded once). `--compile` adds eager vs compiled engine runs on two
copies of the same weights, with the first compiled image (compilation included).
`--quick` runs only the tiny demo model; nothing asserts a time. Usage:

    .venv/bin/python -m bench.bench_engine [--quick] [--runs 5] [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Stat, machine  # noqa: E402
from pipelines.compiled import compiled_graphs  # noqa: E402
from pipelines.devices import plan_device  # noqa: E402
from pipelines.engine import Engine  # noqa: E402
from pipelines.folders.hashing import HashCache  # noqa: E402
from pipelines.folders.registry import ModelFolders  # noqa: E402
from pipelines.loading import CONFIGS_DIR, random_pipeline  # noqa: E402
from pipelines.samplers import make_scheduler, resolve_sampler  # noqa: E402
from pipelines.schema import GenerationRequest  # noqa: E402
from pipelines.service import Service  # noqa: E402
from pipelines.settings import Settings  # noqa: E402

PROMPT = "a photo of a cat"


def seconds(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def interleaved(runs: int, cases: dict[str, Callable[[], object]]) -> dict[str, Stat]:
    """One warm-up each, then `runs` rounds of every case, the order reversed every other
    round, so drift on a shared machine hits all cases alike."""
    for function in cases.values():
        function()
    times: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    for index in range(runs):
        for name in names if index % 2 == 0 else reversed(names):
            times[name].append(seconds(cases[name]))
    return {name: Stat(tuple(values)) for name, values in times.items()}


def make_service(yaml: Path, name: str, cache: Path, compile_backend: str | None) -> Service:
    """A service whose engine holds a seeded random pipeline (compiled when asked)."""
    loaded = random_pipeline(yaml, 0, cache)
    settings = Settings(data_dir=cache, ckpt_dirs=(cache / "none",))
    folders = ModelFolders({}, HashCache(None))
    plan = replace(plan_device("cpu"), compile=compile_backend)
    engine = Engine(settings, folders, plan=plan)
    engine.use_pipeline(loaded, name)
    return Service(settings, folders, engine)


def request(size: int, steps: int) -> GenerationRequest:
    return GenerationRequest(
        prompt=PROMPT,
        seed=1,
        steps=steps,
        width=size,
        height=size,
        sampler_name="Euler",
        cfg_scale=7.0,
    )


def case(name: str, yaml: Path, size: int, steps: int, runs: int, cache: Path) -> dict:
    service = make_service(yaml, name, cache, None)
    model = service.runner.manager.current  # type: ignore[attr-defined]
    pipe = model.pipe
    job = request(size, steps)

    def plain(**prompts: torch.Tensor) -> None:
        pipe.scheduler = make_scheduler(resolve_sampler("Euler"), pipe.scheduler.config)
        text = prompts or {"prompt": PROMPT}
        pipe(
            **text,
            num_inference_steps=steps,
            width=size,
            height=size,
            guidance_scale=7.0,
            generator=torch.Generator().manual_seed(1),
        )

    def engine_cold() -> None:
        model.prompt_cache.clear()
        service.generate(job)

    embeds, negative = pipe.encode_prompt(PROMPT, "cpu", 1, True, "")
    stats = interleaved(
        runs,
        {
            "engine_cold": engine_cold,
            "plain_cold": plain,
            "engine_warm": lambda: service.generate(job),
            "plain_warm": lambda: plain(prompt_embeds=embeds, negative_prompt_embeds=negative),
        },
    )
    return {
        "case": name,
        "size": size,
        "steps": steps,
        "runs": runs,
        **{key: stat.as_dict() for key, stat in stats.items()},
        "ratio_cold": stats["engine_cold"].median / stats["plain_cold"].median,
        "ratio_warm": stats["engine_warm"].median / stats["plain_warm"].median,
    }


def compile_case(name: str, yaml: Path, size: int, steps: int, runs: int, cache: Path) -> dict:
    """Eager vs `--compile` (inductor) engines on two copies of the same seeded weights:
    the first compiled image (compilation included), then interleaved runs; a LoRA-free
    request, so the figure is the UNet's and the decoder's."""
    eager = make_service(yaml, name, cache, None)
    compiled = make_service(yaml, name, cache, "inductor")
    job = request(size, steps)
    graphs = compiled_graphs()
    first = seconds(lambda: compiled.generate(job))
    variants = compiled_graphs() - graphs
    stats = interleaved(
        runs, {"eager": lambda: eager.generate(job), "compiled": lambda: compiled.generate(job)}
    )
    return {
        "case": name,
        "size": size,
        "steps": steps,
        "runs": runs,
        "first_compiled_image_s": first,
        "graphs_compiled": variants,
        **{key: stat.as_dict() for key, stat in stats.items()},
        "ratio": stats["compiled"].median / stats["eager"].median,
    }


def print_tables(result: dict) -> None:
    print(f"Machine: {result['machine']}")
    print(
        "\n| generation (Euler, CFG 7, batch 1) | size | steps | repeats | prompt cache | "
        "lorastack engine s | plain diffusers s | ratio |\n|---|---:|---:|---:|---|---:|---:|---:|"
    )
    for row in result["rows"]:
        for cache, label in (("cold", "cold (both encode)"), ("warm", "warm (both reuse)")):
            ours, theirs = row[f"engine_{cache}"], row[f"plain_{cache}"]
            print(
                f"| {row['case']} | {row['size']}x{row['size']} | {row['steps']} | "
                f"{row['runs']} | {label} | {ours['median']:.3f} ±{ours['spread']:.3f} | "
                f"{theirs['median']:.3f} ±{theirs['spread']:.3f} | "
                f"{row[f'ratio_{cache}']:.3f} |"
            )
    if result.get("compile"):
        print(
            "\n| --compile (inductor) | size | steps | repeats | first image incl. compile s | "
            "graphs | eager s/image | compiled s/image | compiled/eager |"
            "\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for row in result["compile"]:
            eager, compiled = row["eager"], row["compiled"]
            print(
                f"| {row['case']} | {row['size']}x{row['size']} | {row['steps']} | "
                f"{row['runs']} | {row['first_compiled_image_s']:.1f} | "
                f"{row['graphs_compiled']} | {eager['median']:.3f} ±{eager['spread']:.3f} | "
                f"{compiled['median']:.3f} ±{compiled['spread']:.3f} | {row['ratio']:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="eager vs --compile rows")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    tiny = ("tiny demo", CONFIGS_DIR / "demo-tiny.yaml", 64, 4)
    sd15 = ("SD1.5-size", CONFIGS_DIR / "v1-inference.yaml", 256, 4)
    cases = [tiny] if args.quick else [tiny, sd15]
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder)
        result: dict = {"machine": machine()}
        result["rows"] = [case(*spec, args.runs, cache) for spec in cases]
        if args.compile:
            result["compile"] = [compile_case(*cases[-1], args.runs, cache)]
    print_tables(result)
    if args.json:
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
