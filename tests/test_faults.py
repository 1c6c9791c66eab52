"""Faults inside a generation: the lock is freed, memory errors are translated, interrupts
return what is done, and the next request is normal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.engine import Engine, Progress
from pipelines.errors import DeviceOutOfMemoryError, UnusableFileError
from pipelines.lora_registry import LoraLibrary
from pipelines.registry import CheckpointRegistry, HashCache
from pipelines.schema import GenerationRequest
from pipelines.settings import Settings
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

REQUEST = GenerationRequest(
    prompt="a tower", seed=3, width=64, height=64, steps=4, sampler_name="Euler"
)


@pytest.fixture()
def engine(tmp_path: Path) -> Engine:
    settings = Settings(
        data_dir=tmp_path,
        ckpt_dirs=(tmp_path / "none",),
        lora_dirs=(tmp_path / "loras",),
        threads=2,
    )
    engine = Engine(
        settings,
        CheckpointRegistry(settings.models_dirs, HashCache(None)),
        LoraLibrary(settings.loras_dirs),
    )
    engine.load_checkpoint(None)  # the demo model
    return engine


def reference(engine: Engine) -> np.ndarray:
    return np.asarray(engine.generate(REQUEST).images[0])


def test_exception_inside_the_sampler_frees_the_lock(engine: Engine) -> None:
    expected = reference(engine)

    def explode(progress: Progress) -> None:
        if progress.sampling_step == 2:
            raise RuntimeError("injected sampler fault")

    with pytest.raises(RuntimeError, match="injected"):
        engine.generate(REQUEST, on_step=explode)
    assert not engine.busy
    assert np.array_equal(np.asarray(engine.generate(REQUEST).images[0]), expected)


def test_out_of_memory_is_translated_and_suggests_remedies(engine: Engine) -> None:
    expected = reference(engine)

    def out_of_memory(progress: Progress) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(DeviceOutOfMemoryError) as caught:
        engine.generate(REQUEST, on_step=out_of_memory)
    assert caught.value.status == 507
    assert "smaller" in caught.value.message and "--medvram" in caught.value.message
    assert np.array_equal(np.asarray(engine.generate(REQUEST).images[0]), expected)


def test_interrupt_returns_what_is_done_then_next_is_normal(engine: Engine) -> None:
    expected = reference(engine)
    request = GenerationRequest(
        prompt="a tower", seed=3, width=64, height=64, steps=4, sampler_name="Euler", n_iter=3
    )

    def interrupt_at_two(progress: Progress) -> None:
        if progress.job_no == 1 and progress.sampling_step == 2:
            engine.interrupt()

    result = engine.generate(request, on_step=interrupt_at_two)
    assert result.interrupted
    assert len(result.images) == 2  # the finished first image and the interrupted second
    assert np.array_equal(np.asarray(result.images[0]), expected)
    assert np.array_equal(np.asarray(engine.generate(REQUEST).images[0]), expected)


def test_skip_ends_only_the_current_batch(engine: Engine) -> None:
    request = GenerationRequest(
        prompt="a tower", seed=3, width=64, height=64, steps=4, sampler_name="Euler", n_iter=2
    )

    def skip_first(progress: Progress) -> None:
        if progress.job_no == 0 and progress.sampling_step == 1:
            engine.skip()

    result = engine.generate(request, on_step=skip_first)
    assert len(result.images) == 2 and not result.interrupted


def test_lora_deleted_between_scan_and_use(engine: Engine, tmp_path: Path) -> None:
    path = write(
        tmp_path / "loras" / "gone.safetensors",
        make_kohya(engine.model.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=1),
    )
    engine.rescan()
    path.unlink()
    with pytest.raises(UnusableFileError, match="gone"):
        engine.generate(
            GenerationRequest(prompt="a <lora:gone:1>", seed=1, width=64, height=64, steps=2)
        )
    assert engine.generate(REQUEST).images
