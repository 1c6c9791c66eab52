"""Faults inside a generation: the queue moves on, memory errors are translated, interrupts
return what is done, and the next request is normal."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.errors import DeviceOutOfMemoryError, UnusableFileError
from pipelines.interface import ProgressSnapshot
from pipelines.schema import GenerationRequest
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

REQUEST = GenerationRequest(
    prompt="a tower", seed=3, width=64, height=64, steps=4, sampler_name="Euler"
)


@pytest.fixture()
def engine(tmp_path: Path) -> Service:
    settings = Settings(
        data_dir=tmp_path,
        ckpt_dirs=(tmp_path / "none",),
        lora_dirs=(tmp_path / "loras",),
        threads=2,
    )
    engine = build_service(settings)
    engine.select_checkpoint(None)  # the demo model
    return engine


def unet_fault(engine: Service, error: BaseException, at_call: int) -> Callable[[], None]:
    """Make the UNet raise `error` on its `at_call`-th forward (a fault inside the
    sampler); returns the remover."""
    calls = [0]

    def hook(*args: object) -> None:
        calls[0] += 1
        if calls[0] == at_call:
            raise error

    unet = engine.runner.manager.current.pipe.unet
    return unet.register_forward_pre_hook(hook).remove


def reference(engine: Service) -> np.ndarray:
    return np.asarray(engine.generate(REQUEST).images[0])


def test_exception_inside_the_sampler_frees_the_queue(engine: Service) -> None:
    expected = reference(engine)
    remove = unet_fault(engine, RuntimeError("injected sampler fault"), 2)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            engine.generate(REQUEST)
    finally:
        remove()
    assert engine.jobs() == [] and engine.progress().state == "failed"
    assert np.array_equal(np.asarray(engine.generate(REQUEST).images[0]), expected)


def test_out_of_memory_is_translated_and_suggests_remedies(engine: Service) -> None:
    expected = reference(engine)

    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    remove = unet_fault(engine, oom, 1)
    try:
        with pytest.raises(DeviceOutOfMemoryError) as caught:
            engine.generate(REQUEST)
    finally:
        remove()
    assert caught.value.status == 507
    assert "smaller" in caught.value.message and "--medvram" in caught.value.message
    assert np.array_equal(np.asarray(engine.generate(REQUEST).images[0]), expected)


def test_interrupt_returns_what_is_done_then_next_is_normal(engine: Service) -> None:
    expected = reference(engine)
    request = GenerationRequest(
        prompt="a tower", seed=3, width=64, height=64, steps=4, sampler_name="Euler", n_iter=3
    )

    def interrupt_at_two(progress: ProgressSnapshot) -> None:
        if progress.job_no == 1 and progress.sampling_step == 2:
            engine.interrupt(progress.job_id)

    result = engine.generate(request, on_progress=interrupt_at_two)
    assert result.interrupted
    assert len(result.images) == 2  # the finished first image and the interrupted second
    assert np.array_equal(np.asarray(result.images[0]), expected)
    assert np.array_equal(np.asarray(engine.generate(REQUEST).images[0]), expected)


def test_skip_ends_only_the_current_batch(engine: Service) -> None:
    request = GenerationRequest(
        prompt="a tower", seed=3, width=64, height=64, steps=4, sampler_name="Euler", n_iter=2
    )

    def skip_first(progress: ProgressSnapshot) -> None:
        if progress.job_no == 0 and progress.sampling_step == 1:
            engine.skip(progress.job_id)

    result = engine.generate(request, on_progress=skip_first)
    assert len(result.images) == 2 and not result.interrupted


def test_lora_deleted_between_scan_and_use(engine: Service, tmp_path: Path) -> None:
    path = write(
        tmp_path / "loras" / "gone.safetensors",
        make_kohya(engine.runner.manager.current.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=1),
    )
    engine.rescan()
    path.unlink()
    with pytest.raises(UnusableFileError, match="gone"):
        engine.generate(
            GenerationRequest(prompt="a <lora:gone:1>", seed=1, width=64, height=64, steps=2)
        )
    assert engine.generate(REQUEST).images
