"""Generation time on the CPU: the engine vs a plain diffusers call on the same pipeline.

Prints a table (median and spread of several runs, side by side in one process) and writes
JSON. `--quick` runs only the tiny demo model (CI proves the script runs; nothing asserts a
time). Usage:  .venv/bin/python -m bench.bench_engine [--quick] [--runs 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.engine import Engine  # noqa: E402
from pipelines.folders.hashing import HashCache  # noqa: E402
from pipelines.folders.registry import ModelFolders  # noqa: E402
from pipelines.loading import CONFIGS_DIR, random_pipeline  # noqa: E402
from pipelines.samplers import make_scheduler, resolve_sampler  # noqa: E402
from pipelines.schema import GenerationRequest  # noqa: E402
from pipelines.service import Service  # noqa: E402
from pipelines.settings import Settings  # noqa: E402


def timed(function: Callable[[], object], runs: int) -> list[float]:
    function()  # warm-up
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def case(name: str, yaml: Path, size: int, steps: int, runs: int, cache: Path) -> dict:
    built_at = time.perf_counter()
    loaded = random_pipeline(yaml, 0, cache)
    build_seconds = time.perf_counter() - built_at
    settings = Settings(data_dir=cache, ckpt_dirs=(cache / "none",))
    folders = ModelFolders({}, HashCache(None))
    engine = Engine(settings, folders)
    engine.use_pipeline(loaded, name)
    service = Service(settings, folders, engine)
    request = GenerationRequest(
        prompt="a photo of a cat",
        seed=1,
        steps=steps,
        width=size,
        height=size,
        sampler_name="Euler",
        cfg_scale=7.0,
    )
    pipe = loaded.pipe

    def plain() -> None:
        pipe.scheduler = make_scheduler(resolve_sampler("Euler"), pipe.scheduler.config)
        pipe(
            "a photo of a cat",
            num_inference_steps=steps,
            width=size,
            height=size,
            guidance_scale=7.0,
            generator=torch.Generator().manual_seed(1),
        )

    ours = timed(lambda: service.generate(request), runs)
    theirs = timed(plain, runs)
    return {
        "case": name,
        "size": size,
        "steps": steps,
        "runs": runs,
        "build_s": build_seconds,
        "engine_s": statistics.median(ours),
        "engine_spread_s": max(ours) - min(ours),
        "plain_s": statistics.median(theirs),
        "plain_spread_s": max(theirs) - min(theirs),
        "ratio": statistics.median(ours) / statistics.median(theirs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder)
        rows = [case("tiny demo", CONFIGS_DIR / "demo-tiny.yaml", 64, 4, args.runs, cache)]
        if not args.quick:
            rows.append(
                case("SD1.5-size", CONFIGS_DIR / "v1-inference.yaml", 256, 4, args.runs, cache)
            )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"{'case':<12} {'size':>5} {'steps':>5} {'engine s':>15} {'plain s':>15} {'ratio':>6}")
    for row in rows:
        print(
            f"{row['case']:<12} {row['size']:>5} {row['steps']:>5} "
            f"{row['engine_s']:>8.3f} ±{row['engine_spread_s']:<5.3f} "
            f"{row['plain_s']:>8.3f} ±{row['plain_spread_s']:<5.3f} {row['ratio']:>6.3f}"
        )
    if args.json:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        args.json.write_text(json.dumps({"rows": rows, "peak_rss_mb": peak}, indent=2))


if __name__ == "__main__":
    main()
