"""Every memory mode and precision on the CPU: accelerate's offload hooks with the CPU as
execution device, bf16 weights, an fp32 VAE beside half latents (`--no-half-vae`), and the
SDE sampler's own noise source. The same LoRA stack must apply, change and come off
bit-exactly in each.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import cpu_offload

from pipelines.devices import DevicePlan
from pipelines.engine import Engine
from pipelines.loading import LoadedModel, random_pipeline
from pipelines.lora.stack import AdapterStack, stored_weight
from pipelines.schema import GenerationRequest, LoraSpec
from pipelines.service import Service, build_folders
from pipelines.settings import Settings
from tests.conftest import DEMO_YAML
from tests.determinism_matrix import matrix_hashes, whole
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

PROJECT = Path(__file__).resolve().parents[1]

SMALL = {"width": 64, "height": 64, "steps": 2, "checkpoint": "tiny-sd1", "seed": 11}
MODES = ("full", "medvram", "lowvram")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TOLERANCE = {torch.float32: 1, torch.bfloat16: 3, torch.float16: 2}
"""Largest difference (of 255) from the full-memory image at the same precision: offload
hooks move the same weights, so fp32 agrees to a level; half precisions round more."""


@pytest.fixture(scope="module")
def settings(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Settings:
    data = tmp_path_factory.mktemp("devices")
    loras = data / "loras"
    keys = sd1_keys(SD1_MODULES)
    write(loras / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    return Settings(data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(loras,), threads=2)


def make_service(settings: Settings, memory: str, dtype: torch.dtype, upcast_vae=False):
    plan = DevicePlan(torch.device("cpu"), dtype, "sdpa", "test", memory, upcast_vae)
    folders = build_folders(settings)
    folders.hash_missing()
    return Service(settings, folders, Engine(settings, folders, plan=plan))


@pytest.fixture(scope="module", params=[(m, d) for d in DTYPES for m in MODES], ids=str)
def service(request: pytest.FixtureRequest, settings: Settings) -> Iterator[Service]:
    memory, dtype = request.param
    yield make_service(settings, memory, dtype)


@pytest.fixture(scope="module")
def full_images(settings: Settings) -> dict[tuple[torch.dtype, float], np.ndarray]:
    """The full-memory images per precision and LoRA weight: the oracle of the others."""
    made = {}
    for dtype in DTYPES:
        reference = make_service(settings, "full", dtype)
        for weight in (0.0, 0.8, 0.4):
            made[(dtype, weight)] = pixels(reference, weight)
    return made


def pixels(service: Service, weight: float) -> np.ndarray:
    loras = (LoraSpec("ink", weight),) if weight else ()
    result = service.generate(GenerationRequest(prompt="a tower", loras=loras, **SMALL))
    return np.asarray(result.images[0]).astype(int)


def unet_weights(service: Service) -> dict[str, torch.Tensor]:
    unet = service.runner.manager.current.pipe.unet  # type: ignore[attr-defined]
    return {
        name: stored_weight(module).clone()
        for name, module in unet.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
    }


def test_stack_applies_changes_and_comes_off_in_every_mode(
    service: Service, full_images: dict[tuple[torch.dtype, float], np.ndarray]
) -> None:
    plan = service.runner.plan  # type: ignore[attr-defined]
    base = pixels(service, 0.0)
    before = unet_weights(service)
    for weight in (0.8, 0.4):
        made = pixels(service, weight)
        oracle = full_images[(plan.dtype, weight)]
        assert np.abs(made - oracle).max() <= TOLERANCE[plan.dtype], (plan.memory_mode, weight)
        assert np.abs(made - base).max() > TOLERANCE[plan.dtype]  # the LoRA really applied
    assert np.array_equal(pixels(service, 0.0), base)
    after = unet_weights(service)
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_fp32_vae_decodes_half_latents(settings: Settings) -> None:
    """`--no-half-vae`: the UNet in bf16, the VAE kept in fp32."""
    service = make_service(settings, "full", torch.bfloat16, upcast_vae=True)
    assert pixels(service, 0.8).shape == (64, 64, 3)
    assert service.runner.manager.current.pipe.vae.dtype == torch.float32  # type: ignore[attr-defined]


def test_sde_sampler_noise_follows_the_seed(settings: Settings) -> None:
    """DPM++ SDE draws its Brownian noise from the request's seeds (per batch item, as
    A1111), not from the global RNG: twice the same image, and item k equals seed+k."""
    service = make_service(settings, "full", torch.float32)
    request = GenerationRequest(prompt="a tower", sampler_name="DPM++ SDE", **SMALL)
    first, second = service.generate(request), service.generate(request)
    torch.manual_seed(12345)  # the global RNG must not matter
    third = service.generate(request)
    images = [np.asarray(r.images[0]) for r in (first, second, third)]
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    batch = service.generate(GenerationRequest(**{**request.__dict__, "batch_size": 2}))
    alone = service.generate(GenerationRequest(**{**request.__dict__, "seed": 12}))
    difference = np.asarray(batch.images[1]).astype(int) - np.asarray(alone.images[0])
    assert np.abs(difference).max() <= 1


def test_a_sampler_leaves_nothing_to_the_next(settings: Settings) -> None:
    """Each request's scheduler comes from the model's original config: keys one sampler
    sets (Karras sigmas, SDE solver) never reach the next request's."""
    fresh = make_service(settings, "full", torch.float32)
    euler = GenerationRequest(prompt="a tower", sampler_name="Euler", **SMALL)
    alone = np.asarray(fresh.generate(euler).images[0])
    used = make_service(settings, "full", torch.float32)
    for sampler, schedule in (("DPM++ 2M SDE", "karras"), ("UniPC", "exponential")):
        used.generate(
            GenerationRequest(prompt="a tower", sampler_name=sampler, scheduler=schedule, **SMALL)
        )
    assert np.array_equal(np.asarray(used.generate(euler).images[0]), alone)


def test_every_sampler_and_schedule_is_deterministic_across_processes(
    settings: Settings, models_dir: Path, tmp_path: Path
) -> None:
    """Twice in this process and once in a fresh one (started first, so the two share the
    machine's cores), every sampler x schedule gives the same pixels."""
    fresh = subprocess.Popen(
        [sys.executable, "-m", "tests.determinism_matrix", str(models_dir), str(tmp_path)],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    service = make_service(settings, "full", torch.float32)
    first, second = matrix_hashes(service), matrix_hashes(service)
    stdout, stderr = fresh.communicate(timeout=600)
    assert first == second, [k for k in first if first[k] != second[k]]
    assert fresh.returncode == 0, stderr[-2000:]
    assert stdout.split()[-1] == whole(first)


def test_lowvram_merges_reach_the_offload_hooks_weights(cache_root: Path) -> None:
    """Sequential offload leaves the parameters on `meta` and loads the hook's CPU copy
    before each call; the stack must merge into (and restore) that copy."""
    offloaded = random_pipeline(DEMO_YAML, 0, cache_root)
    merged = random_pipeline(DEMO_YAML, 0, cache_root)
    cpu_offload(offloaded.pipe.unet, execution_device=torch.device("cpu"))
    assert offloaded.pipe.unet.conv_in.weight.device.type == "meta"
    keys = sd1_keys(SD1_MODULES)
    lora = write(
        cache_root / "lowvram-ink.safetensors",
        make_kohya(merged.pipe, SD1_MODULES, keys, seed=1),
    )
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    width = merged.pipe.unet.config.cross_attention_dim
    context = torch.randn((1, 77, width), generator=generator)

    def noise(pipe: object) -> torch.Tensor:
        with torch.no_grad():
            return pipe.unet(latents, 10, encoder_hidden_states=context).sample  # type: ignore[attr-defined]

    base = noise(offloaded.pipe)
    stacks = [AdapterStack(m.pipe, m.architecture) for m in (offloaded, merged)]
    for stack in stacks:
        stack.apply_paths([(lora, "ink", 0.8, 0.0)])
    applied = noise(offloaded.pipe)
    assert torch.allclose(applied, noise(merged.pipe), rtol=0, atol=1e-6)
    assert (applied - base).abs().max() > 1e-3  # the LoRA really reached the hook's copy
    stacks[0].restore()
    assert torch.equal(noise(offloaded.pipe), base)
