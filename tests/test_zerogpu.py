"""ZeroGPU: the duration estimate, the no-op wrapper off ZeroGPU, and the engine's stateless
mode that a forked ZeroGPU worker needs (each call applies exactly its own LoRA stack)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

from deployments.zerogpu import (
    MAX_SECONDS,
    MIN_SECONDS,
    ZeroGpuRunner,
    duration_of_call,
    estimate_duration,
    gpu_wrapper,
    prepare,
    zero_gpu_active,
)
from pipelines.engine import Engine
from pipelines.loading import LoadedModel
from pipelines.schema import GenerationRequest, GenerationResult, LoraSpec
from pipelines.service import build_folders
from pipelines.settings import Settings
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write


@pytest.mark.parametrize(
    ("fields", "seconds"),
    [
        ({"steps": 20, "width": 512, "height": 512}, 18),  # 1.5 * (10 + 0.25 * 6)
        ({"steps": 30, "width": 1024, "height": 1024}, 28),  # 1.5 * (10 + 8.5)
        ({"steps": 30, "width": 1024, "height": 1024, "batch_size": 4}, 66),  # 1.5 * (10 + 34)
        ({"steps": 1, "width": 64, "height": 64}, 16),  # the overhead, nearly all of it
        ({"steps": 150, "width": 2048, "height": 2048, "batch_size": 8}, MAX_SECONDS),
    ],
)
def test_estimate_duration(fields: dict[str, int], seconds: int) -> None:
    assert estimate_duration(GenerationRequest(**fields)) == seconds


def test_estimate_grows_with_the_work() -> None:
    base = GenerationRequest(steps=20, width=768, height=768)
    more = [
        GenerationRequest(steps=40, width=768, height=768),
        GenerationRequest(steps=20, width=1024, height=1024),
        GenerationRequest(steps=20, width=768, height=768, batch_size=2),
        GenerationRequest(steps=20, width=768, height=768, n_iter=2),
    ]
    assert all(estimate_duration(r) > estimate_duration(base) for r in more)
    assert estimate_duration(GenerationRequest(steps=1, width=64, height=64)) >= MIN_SECONDS


def test_duration_of_call_finds_the_request() -> None:
    request = GenerationRequest(steps=30, width=1024, height=1024)
    assert duration_of_call("user", request=request) == estimate_duration(request)
    assert duration_of_call(1, 2) == 60


def test_wrapper_is_a_no_op_off_zerogpu(caplog: pytest.LogCaptureFixture) -> None:
    def run(request: GenerationRequest) -> int:
        return request.steps

    assert not zero_gpu_active({}) and zero_gpu_active({"SPACES_ZERO_GPU": "true"})
    assert gpu_wrapper(run, env={}) is run
    assert gpu_wrapper(run, env={"SPACES_ZERO_GPU": "false"}) is run
    if "spaces" not in sys.modules:
        try:
            import spaces  # noqa: F401
        except ImportError:
            with caplog.at_level(logging.WARNING):
                assert gpu_wrapper(run, env={"SPACES_ZERO_GPU": "1"}) is run
                assert not prepare({"SPACES_ZERO_GPU": "1"})
            assert "spaces package is missing" in caplog.text


# ---------------------------------------------------------------------------- stateless


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Engine:
    data = tmp_path_factory.mktemp("stateless")
    keys = sd1_keys(SD1_MODULES)
    write(data / "loras" / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    write(data / "loras" / "glow.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=2))
    settings = Settings(
        data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(data / "loras",), threads=2
    )
    engine = Engine(settings, build_folders(settings))
    engine.load("tiny-sd1")
    return engine


class Unobserved:
    """A run control nobody watches."""

    interrupted = skipped = False

    def batch(self, job_no: int, job_count: int, steps: int) -> None:
        """Not watched."""

    def step(self, step: int, preview: object = None) -> None:
        """Not watched."""


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    assert engine.manager.current is not None
    pipe = engine.manager.current.pipe
    return {
        f"{part}.{key}": value.detach().clone()
        for part in ("unet", "text_encoder")
        for key, value in getattr(pipe, part).state_dict().items()
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pixels(result: GenerationResult) -> bytes:
    return result.images[0].tobytes()


def request(*loras: LoraSpec) -> GenerationRequest:
    return GenerationRequest(prompt="a tower", seed=3, steps=2, width=64, height=64,
                             checkpoint="tiny-sd1", loras=loras)  # fmt: skip


def test_stateless_call_leaves_the_base_weights(engine: Engine) -> None:
    """The ZeroGPU runner's calls (here off ZeroGPU, so in this process) leave the base
    weights; the plain engine keeps the stack applied for the next request."""
    zero = ZeroGpuRunner(engine, env={})
    base = weights(engine)
    kept = engine.generate(request(LoraSpec("ink", 0.8)), Unobserved())
    assert not same(weights(engine), base)  # the default keeps the stack applied
    glow = zero.generate(request(LoraSpec("glow", 0.7)), Unobserved())
    assert same(weights(engine), base)  # bit for bit
    again = zero.generate(request(LoraSpec("ink", 0.8)), Unobserved())
    assert same(weights(engine), base)
    # Each stateless call applied exactly its own stack, from the base.
    assert pixels(again) == pixels(kept)
    assert pixels(glow) != pixels(kept)
    fresh = engine.generate(request(LoraSpec("glow", 0.7)), Unobserved())
    assert pixels(fresh) == pixels(glow)
    zero.generate(request(), Unobserved())
    assert same(weights(engine), base)
