"""Soak: many generations with random LoRA stacks, checkpoint switches and interrupts.

CI runs a short soak; `LORASTACK_SOAK=300 pytest tests/test_soak.py` runs the full one.
Resident memory after warm-up must grow less than a generous bound (a leak check, not a
speed figure), caches stay within their budgets and no file handles leak.
"""

from __future__ import annotations

import gc
import os
import random
from pathlib import Path

import pytest

from pipelines.interface import ProgressSnapshot
from pipelines.loading import LoadedModel
from pipelines.model_manager import PROMPT_CACHE_SIZE
from pipelines.schema import GenerationRequest, LoraSpec
from pipelines.service import build_service
from pipelines.settings import Settings
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

ITERATIONS = int(os.environ.get("LORASTACK_SOAK", "40"))
WARM_UP = 10
RSS_BOUND_MB = 250
CACHE_MB = 1  # small on purpose: eviction must keep the cache under it


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.timeout(3600)
def test_soak(tmp_path: Path, models_dir: Path, tiny_sd1: LoadedModel) -> None:
    keys = sd1_keys(SD1_MODULES)
    names = [f"style{i}" for i in range(4)]
    for seed, name in enumerate(names):
        write(
            tmp_path / "loras" / f"{name}.safetensors",
            make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=seed),
        )
    settings = Settings(
        data_dir=tmp_path,
        ckpt_dirs=(models_dir,),
        lora_dirs=(tmp_path / "loras",),
        threads=2,
        lora_cache_mb=CACHE_MB,
    )
    engine = build_service(settings)
    chooser = random.Random(0)
    baseline_rss = baseline_files = 0.0
    for iteration in range(ITERATIONS):
        checkpoint = chooser.choice(["tiny-sd1", "tiny-sd1", "tiny-sd1", "tiny-sdxl"])
        stack = ()
        if checkpoint == "tiny-sd1":
            stack = tuple(
                LoraSpec(n, round(chooser.uniform(-1.5, 1.5), 2))
                for n in chooser.sample(names, chooser.randint(0, 3))
            )
        interrupt_at = chooser.choice([None, None, None, 1])

        def maybe_interrupt(progress: ProgressSnapshot, at: int | None = interrupt_at) -> None:
            if at is not None and progress.sampling_step == at:
                engine.interrupt(progress.job_id)

        result = engine.generate(
            GenerationRequest(
                prompt=f"soak {chooser.randint(0, 5)}",
                seed=iteration,
                width=64,
                height=64,
                steps=2,
                checkpoint=checkpoint,
                loras=stack,
                sampler_name="Euler",
            ),
            on_progress=maybe_interrupt,
        )
        assert result.images
        if iteration == WARM_UP - 1:
            gc.collect()
            baseline_rss, baseline_files = rss_mb(), open_files()
    gc.collect()
    growth = rss_mb() - baseline_rss
    print(f"\nsoak: {ITERATIONS} generations, RSS growth after warm-up {growth:.1f} MB")
    assert growth < RSS_BOUND_MB, f"RSS grew by {growth:.0f} MB"
    assert open_files() <= baseline_files + 2
    local = engine.runner
    assert local.lora_cache.nbytes <= CACHE_MB << 20
    assert len(local.manager.current.prompt_cache) <= PROMPT_CACHE_SIZE
