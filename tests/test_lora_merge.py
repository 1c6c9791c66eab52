"""The merge's fast path for plain LoRAs (factors kept per stack, one scratch buffer, an
fp32 weight as its own sum): bit for bit the generic `module_delta` sum, mixed with other
kinds on one layer, on half-precision and channels-last weights; and the denoising loop
running without autograd.

The oracle is test_lora's: its own float64 formulas on a copy of the base weights.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from pipelines.loading import LoadedModel, random_pipeline
from pipelines.lora.files import read_lora_file
from pipelines.lora.maths import add_lora, lora_factors, module_delta
from pipelines.lora.stack import AdapterStack
from pipelines.schema import GenerationRequest
from pipelines.service import build_service
from pipelines.settings import Settings
from tests.conftest import DEMO_YAML
from tests.test_lora import (
    SD1_MODULES,
    Weights,
    assert_bit_exact,
    assert_matches,
    kohya_contributions,
    make_kohya,
    oracle,
    sd1_keys,
    snapshot,
    write,
)

CONV3 = ("unet", "up_blocks.0.resnets.0.conv2", "conv3")
"""A layer SD1_MODULES merges as a LoCon with a CP middle (the generic path)."""


@pytest.fixture(scope="module")
def sd1(cache_root: Path) -> LoadedModel:
    """A private tiny SD1 (these tests change weights and layouts)."""
    return random_pipeline(DEMO_YAML, 0, cache_root)


def assert_close_in(pipe: object, expected: Weights, rtol: float, atol: float) -> None:
    now = snapshot(pipe)
    for key, want in expected.items():
        torch.testing.assert_close(now[key], want, rtol=rtol, atol=atol, msg=str(key))


@pytest.mark.parametrize("scratch", [False, True])
def test_fast_path_is_bit_for_bit_the_generic_sum(
    sd1: LoadedModel, tmp_path: Path, scratch: bool
) -> None:
    """base + module_delta(...) for each plain group, the way every merge summed before,
    equals the fast path's in-place sum exactly (images depend on the last bit of a tiny
    random model's weights)."""
    keys = sd1_keys(SD1_MODULES)
    state = make_kohya(sd1.pipe, SD1_MODULES, keys, seed=61, dtype=torch.float16)
    parsed = read_lora_file(write(tmp_path / "a.safetensors", state))
    plain = [g for g in parsed.groups.values() if lora_factors(g, torch.device("cpu"))]
    assert len(plain) >= 5
    for group in plain:
        component, name = next(k for k, v in keys.items() if v == group.key)
        base = getattr(sd1.pipe, component).get_submodule(name).weight.detach()
        expected = base.clone()
        expected += module_delta(group, base, -0.7)[0]
        total = base.clone()
        factors = lora_factors(group, torch.device("cpu"))
        assert factors is not None
        buffer = torch.full((total.numel() + 5,), float("nan")) if scratch else None
        add_lora(total, group.key, factors, -0.7, buffer)
        assert torch.equal(total, expected), group.key


def test_plain_and_cp_lora_on_one_layer(sd1: LoadedModel, tmp_path: Path) -> None:
    """A layer holding a plain LoRA (fast path) and a CP LoCon (module_delta) of two
    files gets both, and weight changes re-merge from the kept factors."""
    pipe = sd1.pipe
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    cp = make_kohya(pipe, SD1_MODULES, keys, seed=21)  # CONV3's layer as a CP LoCon
    modules = [m if m[1] != CONV3[1] else CONV3 for m in SD1_MODULES]
    plain = make_kohya(pipe, modules, keys, seed=22, rank=3)  # the same layer as plain
    a, b = write(tmp_path / "cp.safetensors", cp), write(tmp_path / "plain.safetensors", plain)
    applier = AdapterStack(pipe, sd1.architecture)
    for weight in (0.8, -0.3, 0.8):
        applier.apply_paths([(a, "cp", 0.5, 0.5), (b, "plain", weight, 1.0)])
        expected = kohya_contributions(base, SD1_MODULES, keys, cp, 0.5, 0.5)
        expected += kohya_contributions(base, modules, keys, plain, weight, 1.0)
        assert_matches(pipe, oracle(base, expected))
    applier.apply_paths([])
    assert_bit_exact(pipe, base)


def test_rewritten_file_is_merged_with_its_new_factors(sd1: LoadedModel, tmp_path: Path) -> None:
    """The kept factors belong to a file version: a file rewritten between two stacks is
    merged with what it holds now."""
    pipe = sd1.pipe
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    path = write(tmp_path / "a.safetensors", make_kohya(pipe, SD1_MODULES, keys, seed=31))
    applier = AdapterStack(pipe, sd1.architecture)
    applier.apply_paths([(path, "a", 1.0, 1.0)])
    newer = make_kohya(pipe, SD1_MODULES, keys, seed=32, rank=2)
    write(path, newer)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a visibly newer file
    applier.apply_paths([(path, "a", 0.5, 0.5)])
    assert_matches(
        pipe, oracle(base, kohya_contributions(base, SD1_MODULES, keys, newer, 0.5, 0.5))
    )
    applier.restore()
    assert_bit_exact(pipe, base)


def test_half_weights_merge_in_fp32_and_restore_exactly(sd1: LoadedModel, tmp_path: Path) -> None:
    """fp16 layers (the GPU's) get base + deltas summed in fp32 and rounded once."""
    pipe = copy.deepcopy(sd1.pipe).to(torch.float16)
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    first = make_kohya(pipe, SD1_MODULES, keys, seed=41)
    second = make_kohya(pipe, SD1_MODULES[::2], keys, seed=42, rank=2)
    a, b = write(tmp_path / "a.safetensors", first), write(tmp_path / "b.safetensors", second)
    applier = AdapterStack(pipe, sd1.architecture)
    applier.apply_paths([(a, "a", 0.7, 0.7), (b, "b", -0.5, 1.0)])
    expected = kohya_contributions(base, SD1_MODULES, keys, first, 0.7, 0.7)
    expected += kohya_contributions(base, SD1_MODULES[::2], keys, second, -0.5, 1.0)
    assert_close_in(pipe, oracle(base, expected), rtol=1e-3, atol=1e-5)  # one fp16 rounding
    applier.apply_paths([])
    assert_bit_exact(pipe, base)


def test_channels_last_weights(sd1: LoadedModel, tmp_path: Path) -> None:
    """Conv weights in channels-last layout (what --compile may leave on CUDA) merge to
    the same values and keep their layout."""
    pipe = copy.deepcopy(sd1.pipe)
    pipe.unet.to(memory_format=torch.channels_last)
    conv = pipe.unet.get_submodule(CONV3[1]).weight
    assert not conv.is_contiguous()
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    modules = [m if m[1] != CONV3[1] else CONV3 for m in SD1_MODULES]
    state = make_kohya(pipe, modules, keys, seed=51)
    path = write(tmp_path / "a.safetensors", state)
    applier = AdapterStack(pipe, sd1.architecture)
    applier.apply_paths([(path, "a", 0.9, 0.9)])
    assert_matches(pipe, oracle(base, kohya_contributions(base, modules, keys, state, 0.9, 0.9)))
    assert conv.is_contiguous(memory_format=torch.channels_last)
    applier.restore()
    assert_bit_exact(pipe, base)


def test_denoising_runs_without_autograd(tmp_path: Path, models_dir: Path) -> None:
    """Every UNet call of a generation runs with grad mode off, as in diffusers (the job
    worker's thread has it on)."""
    service = build_service(Settings(data_dir=tmp_path, ckpt_dirs=(models_dir,), threads=2))
    modes: list[bool] = []
    service.generate(GenerationRequest(prompt="x", width=64, height=64, steps=1))
    unet = service.runner.manager.current.pipe.unet  # type: ignore[attr-defined]
    handle = unet.register_forward_pre_hook(lambda *_: modes.append(torch.is_grad_enabled()))
    try:
        service.generate(GenerationRequest(prompt="x", width=64, height=64, steps=2))
    finally:
        handle.remove()
    assert modes == [False, False]
