"""A txt2img request over HTTP (the A1111 API of `python app.py --api --nowebui`) vs a
plain diffusers call on the same weights in one process.

The checkpoint is an SD1.5-layout pipeline with seeded random weights written as an fp16
single file (what people download); the app loads it as it loads any checkpoint, the
plain side keeps the same values (cast to fp16 and back) in diffusers' own pipeline. Two
rank-16 kohya LoRAs sit in the app's LoRA folder. Rows: no LoRA; the same two merged LoRAs
as the previous request. 256x256, 4 steps, Euler, CFG 7; HTTP and plain calls interleaved
(the server idles while the plain call runs, and the other way round). The app's
background hashing is waited for before timing. `--quick`: the tiny demo model at 64x64.

    .venv/bin/python -m bench.bench_http [--quick] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.bench_lora import write_loras
from bench.common import Stat, machine
from bench.run import ROOT, _free_port
from pipelines.loading import CONFIGS_DIR, random_pipeline
from pipelines.samplers import make_scheduler, resolve_sampler

PROMPT = "a photo of a cat"
TAGS = "<lora:lora0:1> <lora:lora1:0.5>"


def post(url: str, payload: dict) -> float:
    """Seconds for one JSON POST, the whole answer read."""
    body = json.dumps(payload).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=3600) as answer:
        answer.read()
    return time.perf_counter() - started


def post_when_ready(url: str, payload: dict, limit: float = 1800) -> None:
    """POST until the app stops answering 503 (the checkpoint still loading at start-up:
    the app says so with `Retry-After`), for the untimed warm-up request."""
    deadline = time.monotonic() + limit
    while True:
        try:
            post(url, payload)
            return
        except urllib.error.HTTPError as error:
            if error.code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(float(error.headers.get("Retry-After", 1)))


def wait_for(
    url: str, process: subprocess.Popen, ready: Callable[[Any], bool], limit: float = 1800
) -> None:
    """Poll `url` until `ready(json)` holds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the app stopped")
        try:
            with urllib.request.urlopen(url, timeout=30) as answer:
                if ready(json.loads(answer.read())):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} was not ready in time")


def measure(quick: bool, runs: int) -> dict:
    yaml = CONFIGS_DIR / ("demo-tiny.yaml" if quick else "v1-inference.yaml")
    size, rank = (64, 4) if quick else (256, 16)
    from tests.conftest import copy_yaml_with_clip
    from tests.ldm_export import save_single_file

    with tempfile.TemporaryDirectory(dir=ROOT) as name:  # on disk, not tmpfs
        folder = Path(name)
        loaded = random_pipeline(yaml, 0, folder / "config")
        pipe = loaded.pipe
        models, loras = folder / "models", folder / "loras"
        models.mkdir()
        loras.mkdir()
        checkpoint = models / "random.safetensors"
        save_single_file(pipe, checkpoint, text_encoder_layout="hf", dtype=torch.float16)
        if quick:  # the demo's text encoder is not a stock one: its yaml names it
            copy_yaml_with_clip(yaml, models / "random.yaml")
        write_loras(pipe.unet, 2, rank, loras)
        pipe.to(torch.float16).to(torch.float32)  # the values the fp16 file holds
        pipe.set_progress_bar_config(disable=True)
        port = _free_port()
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1")
        server = subprocess.Popen(
            [
                sys.executable,
                "app.py",
                "--api",
                "--nowebui",
                "--data-dir",
                str(folder / "data"),
                "--ckpt-dir",
                str(models),
                "--lora-dir",
                str(loras),
                "--port",
                str(port),
                "--threads",
                str(torch.get_num_threads()),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{port}/sdapi/v1"
        try:
            wait_for(f"{base}/sd-models", server, lambda models: bool(models))
            wait_for(f"{base}/sd-models", server, lambda models: models[0]["sha256"] is not None)
            result = timed_rows(base, pipe, size, runs)
        finally:
            server.terminate()
            server.wait(timeout=60)
    return {
        "machine": machine(),
        "model": "tiny demo" if quick else "SD1.5-size (random weights, fp16 file)",
        "size": size,
        "steps": 4,
        "runs": runs,
        "rows": result,
    }


def timed_rows(base: str, pipe: Any, size: int, runs: int) -> list[dict]:
    """HTTP and plain calls interleaved (order alternating), no LoRA, then two LoRAs."""

    def plain() -> float:
        started = time.perf_counter()
        pipe.scheduler = make_scheduler(resolve_sampler("Euler"), pipe.scheduler.config)
        pipe(
            PROMPT,
            num_inference_steps=4,
            width=size,
            height=size,
            guidance_scale=7.0,
            generator=torch.Generator().manual_seed(1),
        )
        return time.perf_counter() - started

    rows = []
    for label, prompt in (
        ("no LoRA", PROMPT),
        ("2 merged LoRAs, same stack as the previous request", f"{PROMPT} {TAGS}"),
    ):
        payload = {
            "prompt": prompt,
            "steps": 4,
            "width": size,
            "height": size,
            "sampler_name": "Euler",
            "cfg_scale": 7,
            "seed": 1,
        }
        post_when_ready(f"{base}/txt2img", payload)  # warm-up: loads, merges, encodes
        plain()
        http_times, plain_times = [], []
        for index in range(runs):
            if index % 2 == 0:
                http_times.append(post(f"{base}/txt2img", payload))
                plain_times.append(plain())
            else:
                plain_times.append(plain())
                http_times.append(post(f"{base}/txt2img", payload))
        http, direct = Stat(tuple(http_times)), Stat(tuple(plain_times))
        rows.append(
            {
                "case": label,
                "http": http.as_dict(),
                "plain": direct.as_dict(),
                "ratio": http.median / direct.median,
            }
        )
    return rows


def print_table(result: dict) -> None:
    print(f"Machine: {result['machine']}")
    print(
        f"\n| txt2img over HTTP vs plain diffusers, {result['model']} | size | steps | "
        "repeats | HTTP s | plain diffusers s | ratio |\n|---|---:|---:|---:|---:|---:|---:|"
    )
    for row in result["rows"]:
        http, plain = row["http"], row["plain"]
        print(
            f"| {row['case']} | {result['size']}x{result['size']} | {result['steps']} | "
            f"{result['runs']} | {http['median']:.3f} ±{http['spread']:.3f} | "
            f"{plain['median']:.3f} ±{plain['spread']:.3f} | {row['ratio']:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny demo model, 64x64")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = measure(args.quick, args.runs)
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
