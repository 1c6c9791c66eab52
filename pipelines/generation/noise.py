"""Initial noise with A1111's seed features: noise sources, variation seeds and "resize
seed from".

A1111 (`modules/processing.py`, `modules/rng.py`) makes each batch item's noise from its
own seed; a variation seed's noise is blended in by spherical interpolation, and noise
made at another size is pasted centred into (or cropped out of) the noise of this size so
a seed keeps its composition when the size changes.

Noise sources are A1111's `randn_source`: `CPU` (our default: a CPU generator per item,
so a seed means the same image on every device), `GPU` (a generator on the model's
device, what A1111 draws by default) and `NV` (NVIDIA's CUDA generator emulated on any
device: Philox 4x32-10 and Box-Muller as cuRAND's `curand_normal`, so an A1111 image made
on an NVIDIA GPU starts from the same noise here). With NV only the initial noise is
Philox; the noise ancestral samplers add later comes from CPU generators.

A1111's eta noise seed delta (ENSD, `ImageRNG.first`): when it is not 0, each item's
generator for the samplers' later noise is re-seeded with seed + ENSD after the initial
noise is drawn, so the initial noise stays the seed's and only the ancestral noise changes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_PHILOX_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_PHILOX_KEY_STEPS = (0x9E3779B9, 0xBB67AE85)
_UNIT = np.float32(2.3283064e-10)  # 2**-32 as cuRAND rounds it
_UNIT_2PI = np.float32(2.3283064e-10 * 6.2831855)


def _multiply_high_low(value: np.ndarray, multiplier: int) -> tuple[np.ndarray, np.ndarray]:
    product = value.astype(np.uint64) * np.uint64(multiplier)
    return (product >> np.uint64(32)).astype(np.uint32), product.astype(np.uint32)


def _philox4x32_10(counter: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Ten Philox 4x32 rounds over columns of `counter` [4, N] with `key` [2, N]."""
    c0, c1, c2, c3 = (row.copy() for row in counter)
    k0, k1 = key[0].copy(), key[1].copy()
    for round_no in range(10):
        if round_no:
            k0 = k0 + np.uint32(_PHILOX_KEY_STEPS[0])
            k1 = k1 + np.uint32(_PHILOX_KEY_STEPS[1])
        high0, low0 = _multiply_high_low(c0, _PHILOX_MULTIPLIERS[0])
        high2, low2 = _multiply_high_low(c2, _PHILOX_MULTIPLIERS[1])
        c0, c1, c2, c3 = high2 ^ c1 ^ k0, low2, high0 ^ c3 ^ k1, low0
    return np.stack([c0, c1, c2, c3])


class PhiloxGenerator:
    """`torch.randn(..., device="cuda")` after `manual_seed(seed)`, on any device: element
    i of the k-th draw is Box-Muller of Philox(counter=(k, 0, i, 0), key=seed)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.offset = 0

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        count = int(np.prod(shape))
        counter = np.zeros((4, count), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(count, dtype=np.uint32)
        self.offset += 1
        key = np.array([self.seed & 0xFFFFFFFF, self.seed >> 32], dtype=np.uint32)
        words = _philox4x32_10(counter, np.repeat(key[:, None], count, axis=1))
        with np.errstate(over="ignore"):
            u = words[0] * _UNIT + _UNIT / 2
            v = words[1] * _UNIT_2PI + _UNIT_2PI / 2
        normal = (np.sqrt(-2.0 * np.log(u)) * np.sin(v)).astype(np.float32)
        return torch.from_numpy(normal.reshape(shape))


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """A1111's `rng.slerp` on one item's noise [C, H, W]: 0 gives `low`, 1 gives `high`.

    The norm and dot product run over dim 1 (the rows), exactly as A1111 does; for nearly
    parallel noises it falls back to A1111's linear mix, weights as A1111 writes them.
    """
    low_norm = low / torch.norm(low, dim=1, keepdim=True)
    high_norm = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_norm * high_norm).sum(1)
    if dot.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    return (torch.sin((1.0 - strength) * omega) / sin_omega).unsqueeze(1) * low + (
        torch.sin(strength * omega) / sin_omega
    ).unsqueeze(1) * high


@dataclass(frozen=True)
class SeedPlan:
    """What decides one batch's initial noise.

    `subseeds` are used only when `subseed_strength` is not 0; `resize_from` is the
    (height, width) in pixels the noise was first made at, or None.
    """

    seeds: list[int]
    subseeds: list[int]
    subseed_strength: float = 0.0
    resize_from: tuple[int, int] | None = None
    source: str = "CPU"
    device: torch.device = torch.device("cpu")  # the model's, for the GPU source
    eta_noise_seed_delta: int = 0  # A1111's ENSD: later noise from seed + this (0: off)


Generator = torch.Generator | PhiloxGenerator


def _generator(plan: SeedPlan, seed: int) -> Generator:
    if plan.source == "NV":
        return PhiloxGenerator(seed)
    device = plan.device if plan.source == "GPU" else torch.device("cpu")
    return torch.Generator(device).manual_seed(seed)


def _randn(
    plan: SeedPlan,
    seed: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    generator: Generator | None = None,
) -> torch.Tensor:
    generator = generator or _generator(plan, seed)
    if isinstance(generator, PhiloxGenerator):
        return generator.randn(shape).to(dtype)
    return torch.randn((1, *shape), generator=generator, dtype=dtype, device=generator.device)[0]


def initial_noise(
    plan: SeedPlan,
    shape: tuple[int, int, int],
    dtype: torch.dtype = torch.float32,
    factor: int = 8,
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The noise [B, C, h, w] (in `dtype`, on the source's device) and each item's torch
    generator, left where A1111 leaves it (after one draw of the full shape), for the
    samplers' later noise. `factor` is the VAE's downscale (pixels per latent).

    With the CPU source and no variation or resize this is exactly `randn_tensor` with one
    seeded CPU generator per item (what diffusers' pipelines draw). The spherical mix runs
    in float32.
    """
    channels, height, width = shape
    if plan.resize_from is None:
        noise_shape = shape
    else:
        from_height, from_width = plan.resize_from
        noise_shape = (channels, from_height // factor, from_width // factor)
    items: list[torch.Tensor] = []
    generators: list[torch.Generator] = []
    for index, seed in enumerate(plan.seeds):
        generator = _generator(plan, seed)
        subnoise = None
        if plan.subseed_strength != 0:
            subnoise = _randn(plan, plan.subseeds[index], noise_shape, dtype)
        if noise_shape == shape:
            noise = _randn(plan, seed, shape, dtype, generator)
        else:
            noise = _randn(plan, seed, noise_shape, dtype)
        if subnoise is not None:
            mixed = slerp(plan.subseed_strength, noise.float(), subnoise.float())
            noise = mixed.to(dtype)
        if noise_shape != shape:
            noise = _paste_centred(_randn(plan, seed, shape, dtype, generator), noise)
        items.append(noise)
        generators.append(_sampling_generator(plan, generator, seed))
    return torch.stack(items), generators


def _sampling_generator(plan: SeedPlan, generator: Generator, seed: int) -> torch.Generator:
    """The generator the samplers draw later noise from: the item's own, left after the
    initial draw, or one seeded with seed + ENSD when ENSD is set (A1111's re-seed); NV's
    later noise comes from a CPU generator."""
    if plan.eta_noise_seed_delta:
        generator = _generator(plan, seed + plan.eta_noise_seed_delta)
    if isinstance(generator, PhiloxGenerator):
        return torch.Generator("cpu").manual_seed(generator.seed)
    return generator


def _paste_centred(target: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A1111's placement of noise of another size: centred, cropped where larger."""
    dx = (target.shape[2] - noise.shape[2]) // 2
    dy = (target.shape[1] - noise.shape[1]) // 2
    width = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    height = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    tx, ty = max(dx, 0), max(dy, 0)
    sx, sy = max(-dx, 0), max(-dy, 0)
    target[:, ty : ty + height, tx : tx + width] = noise[:, sy : sy + height, sx : sx + width]
    return target
