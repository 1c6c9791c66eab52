"""Scale-out on this machine: throughput with 1 vs 2 Ray Serve replicas and the hit rate of
LoRA-aware routing on a mixed workload (tiny model, 64x64). Prints a table; asserts nothing.

    .venv/bin/python -m bench.bench_ray            # 48 requests per configuration
    .venv/bin/python -m bench.bench_ray --quick    # 8 requests (proves it runs)

Every configuration runs the same mixed workload in the same order, in a fresh process
with its own Ray cluster; each replica reserves cores / replicas CPUs and uses the torch
thread count the table shows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pipelines.loading import CONFIGS_DIR, random_pipeline
from pipelines.schema import GenerationRequest, LoraSpec
from pipelines.settings import Settings

STACKS: tuple[tuple[LoraSpec, ...], ...] = (
    (),
    (LoraSpec("ink", 0.8),),
    (LoraSpec("glow", 0.6),),
    (LoraSpec("ink", 0.5), LoraSpec("glow", 0.5)),
)


# (replicas, torch threads per replica, LoRA-aware routing, concurrent clients)
CONFIGS = (
    (1, 2, True, 2),
    (1, 1, True, 2),
    (2, 1, False, 2),
    (2, 1, True, 2),
    (2, 1, False, 1),
    (2, 1, True, 1),
)


def make_folders(root: Path) -> tuple[Path, Path]:
    """The tiny SD1 checkpoint and two LoRAs for it (the test suite's writers)."""
    from tests.conftest import DEMO_YAML, copy_yaml_with_clip
    from tests.ldm_export import save_single_file
    from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

    models, loras = root / "models", root / "loras"
    models.mkdir(parents=True)
    pipe = random_pipeline(CONFIGS_DIR / "demo-tiny.yaml", 0, root / "cache").pipe
    save_single_file(pipe, models / "tiny-sd1.safetensors", text_encoder_layout="hf")
    copy_yaml_with_clip(DEMO_YAML, models / "tiny-sd1.yaml")
    keys = sd1_keys(SD1_MODULES)
    write(loras / "ink.safetensors", make_kohya(pipe, SD1_MODULES, keys, seed=1))
    write(loras / "glow.safetensors", make_kohya(pipe, SD1_MODULES, keys, seed=2))
    return models, loras


def workload(count: int) -> list[GenerationRequest]:
    """A mixed workload: a random stack per request, bursts of the same stack (users
    iterate on one look), fixed order."""
    rng = random.Random(0)
    requests: list[GenerationRequest] = []
    while len(requests) < count:
        stack = rng.choice(STACKS)
        for _ in range(rng.randint(1, 4)):
            requests.append(
                GenerationRequest(
                    prompt="a tower",
                    steps=4,
                    width=64,
                    height=64,
                    seed=len(requests),
                    checkpoint="tiny-sd1",
                    loras=stack,
                )
            )
    return requests[:count]


def run_config(
    root: Path, replicas: int, threads: int, lora_aware: bool, clients: int, count: int
) -> dict[str, object]:
    from ray import serve

    from deployments.ray.scaleout import APP_NAME, ScaleOptions, connect
    from pipelines.service import build_service

    cores = os.cpu_count() or 1
    models, loras = root / "models", root / "loras"
    settings = Settings(data_dir=root, ckpt_dirs=(models,), lora_dirs=(loras,), threads=threads)
    options = ScaleOptions(replicas=replicas, num_cpus=cores / replicas, lora_aware=lora_aware)
    service = build_service(settings, lambda s, _: connect(s, "local", options))
    service.select_checkpoint("tiny-sd1")
    for _ in range(replicas):  # every replica loaded before the clock starts
        service.generate(workload(1)[0])
    stats = service.runner.stats
    stats.requests = stats.hits = 0
    requests = workload(count)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(service.generate, requests))
    seconds = time.perf_counter() - started
    serve.delete(APP_NAME)
    return {
        "replicas": replicas,
        "threads": threads,
        "routing": "LoRA-aware" if lora_aware else "least loaded",
        "clients": clients,
        "requests": count,
        "seconds": seconds,
        "images_per_s": len(results) / seconds,
        "hit_rate": stats.hit_rate,
        "merges": stats.requests - stats.hits,
    }


def one_config(index: int, count: int) -> dict[str, object]:
    """One configuration in a fresh Ray cluster of its own, so no router or replica state
    carries over from the previous configuration."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_folders(root)
        ray.init(
            address="local",
            num_cpus=os.cpu_count() or 1,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
        try:
            return run_config(root, *CONFIGS[index], count)
        finally:
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="8 requests per configuration")
    parser.add_argument("--config", type=int, help=argparse.SUPPRESS)  # one child process
    args = parser.parse_args()
    count = 8 if args.quick else 48
    if args.config is not None:
        print("ROW " + json.dumps(one_config(args.config, count)))
        return
    rows = []
    for index in range(len(CONFIGS)):
        command = [sys.executable, "-m", "bench.bench_ray", "--config", str(index)]
        if args.quick:
            command.append("--quick")
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        line = next(x for x in done.stdout.splitlines() if x.startswith("ROW "))
        rows.append(json.loads(line[4:]))
    print(f"\nRay Serve scale-out, tiny SD1 64x64, 4 steps, {count} mixed requests")
    print("| replicas | threads | routing | clients | seconds | images/s | hit rate | merges |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['replicas']} | {row['threads']} | {row['routing']} | {row['clients']} "
            f"| {row['seconds']:.2f} | {row['images_per_s']:.2f} | {row['hit_rate']:.0%} "
            f"| {row['merges']} |"
        )


if __name__ == "__main__":
    main()
