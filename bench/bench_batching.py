"""Request batching (`--batch-requests`): throughput of concurrent compatible requests
denoised as one batch vs one by one, on this machine's CPU.

Each repeat submits `--requests` requests at once (different prompts and seeds, the same
checkpoint, size, sampler, steps and CFG) to a service with batching off, then to one
batching over `--window-ms`, on the same engine (the two interleaved), and times the first
submission to the last result (the batching window included). The load average before and
after is printed: on a shared machine other work slows both modes. Prints a table (median
and spread of the repeats, images per second, UNet calls) with the machine it ran on, and
writes JSON.
`--quick` runs only the tiny demo model (CI proves the script runs; nothing asserts a
time). Usage:  .venv/bin/python -m bench.bench_batching [--quick] [--repeats 3] [--json out]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine  # noqa: E402
from pipelines.engine import Engine  # noqa: E402
from pipelines.folders.hashing import HashCache  # noqa: E402
from pipelines.folders.registry import ModelFolders  # noqa: E402
from pipelines.loading import CONFIGS_DIR, random_pipeline  # noqa: E402
from pipelines.schema import GenerationRequest  # noqa: E402
from pipelines.service import Service  # noqa: E402
from pipelines.settings import Settings  # noqa: E402

PROMPTS = (
    "a lighthouse at dusk",
    "a red fox in snow",
    "a bowl of ramen",
    "a castle on a hill",
    "a sailing ship",
    "a city street at night",
    "a mountain lake",
    "a portrait of an old man",
)


def burst(service: Service, requests: list[GenerationRequest]) -> float:
    """Seconds from submitting every request at once to the last result."""
    started = time.perf_counter()
    jobs = [service.submit(request) for request in requests]
    for job in jobs:
        service.result(job)
    return time.perf_counter() - started


def case(
    name: str, yaml: Path, size: int, steps: int, count: int, window: int, repeats: int, cache: Path
) -> dict:
    loaded = random_pipeline(yaml, 0, cache)
    settings = Settings(data_dir=cache, ckpt_dirs=(cache / "none",))
    folders = ModelFolders({}, HashCache(None))
    engine = Engine(settings, folders)
    active = engine.use_pipeline(loaded, name)
    calls: list[int] = []
    active.pipe.unet.register_forward_pre_hook(lambda *_: calls.append(1))
    one_by_one = Service(settings, folders, engine)
    batched = Service(replace(settings, batch_requests=window), folders, engine)
    requests = [
        GenerationRequest(
            prompt=PROMPTS[index % len(PROMPTS)],
            seed=index,
            steps=steps,
            width=size,
            height=size,
            sampler_name="Euler",
            cfg_scale=7.0,
        )
        for index in range(count)
    ]
    row: dict = {"case": name, "size": size, "steps": steps, "requests": count}
    modes = {"alone": one_by_one, "batched": batched}
    times: dict[str, list[float]] = {label: [] for label in modes}
    counted: dict[str, list[int]] = {label: [] for label in modes}
    for service in modes.values():
        burst(service, requests)  # warm-up (prompt cache, allocator)
    for _ in range(repeats):  # interleaved, so a busy spell on the machine hits both
        for label, service in modes.items():
            calls.clear()
            times[label].append(burst(service, requests))
            counted[label].append(len(calls))
    for label in modes:
        median = statistics.median(times[label])
        row[f"{label}_s"] = median
        row[f"{label}_spread_s"] = max(times[label]) - min(times[label])
        row[f"{label}_images_per_s"] = count / median
        row[f"{label}_unet_calls"] = max(counted[label])
    row["speedup"] = row["alone_s"] / row["batched_s"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model only, 2 repeats")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--window-ms", type=int, default=100)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    repeats = 2 if args.quick else args.repeats
    common = (args.requests, args.window_ms, repeats)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder)
        rows = [case("tiny demo", CONFIGS_DIR / "demo-tiny.yaml", 64, 4, *common, cache)]
        if not args.quick:
            yaml = CONFIGS_DIR / "v1-inference.yaml"
            rows.append(case("SD1.5-size", yaml, 256, 4, *common, cache))
    load_after = os.getloadavg()[0]
    print(f"Machine: {machine()}")
    print(f"Load average (1 min): {load_before:.1f} before, {load_after:.1f} after")
    print(
        f"{args.requests} concurrent requests (Euler, CFG 7), batching window "
        f"{args.window_ms} ms, median of {repeats} repeats (± spread)"
    )
    print("| model | size | steps | one by one s | img/s | batched s | img/s | UNet calls | x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['case']} | {row['size']} | {row['steps']} "
            f"| {row['alone_s']:.2f} ± {row['alone_spread_s']:.2f} "
            f"| {row['alone_images_per_s']:.2f} "
            f"| {row['batched_s']:.2f} ± {row['batched_spread_s']:.2f} "
            f"| {row['batched_images_per_s']:.2f} "
            f"| {row['alone_unet_calls']} → {row['batched_unet_calls']} "
            f"| {row['speedup']:.2f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": machine(), "load": [load_before, load_after], "rows": rows}, indent=2
            )
        )


if __name__ == "__main__":
    main()
