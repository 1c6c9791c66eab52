"""Initial noise with A1111's seed features: variation seeds and "resize seed from".

A1111 (`modules/processing.py`, `modules/rng.py`) makes each batch item's noise from its
own seed; a variation seed's noise is blended in by spherical interpolation, and noise
made at another size is pasted centred into (or cropped out of) the noise of this size so
a seed keeps its composition when the size changes. Every draw here is from a CPU
generator, so a seed means the same image on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def _randn(
    seed: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    generator = generator or torch.Generator("cpu").manual_seed(seed)
    return torch.randn((1, *shape), generator=generator, dtype=dtype)[0]


def initial_noise(
    plan: SeedPlan,
    shape: tuple[int, int, int],
    dtype: torch.dtype = torch.float32,
    factor: int = 8,
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """The noise [B, C, h, w] (on the CPU, in `dtype`) and each item's generator, left
    where A1111 leaves it (after one draw of the full shape), for the samplers' later
    noise. `factor` is the VAE's downscale (pixels per latent).

    Without variation or resize this is exactly `randn_tensor` with one seeded CPU
    generator per item (what diffusers' pipelines draw). The spherical mix runs in float32.
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
        generator = torch.Generator("cpu").manual_seed(seed)
        generators.append(generator)
        subnoise = None
        if plan.subseed_strength != 0:
            subnoise = _randn(plan.subseeds[index], noise_shape, dtype)
        if noise_shape == shape:
            noise = _randn(seed, shape, dtype, generator)
        else:
            noise = _randn(seed, noise_shape, dtype)
        if subnoise is not None:
            mixed = slerp(plan.subseed_strength, noise.float(), subnoise.float())
            noise = mixed.to(dtype)
        if noise_shape != shape:
            noise = _paste_centred(_randn(seed, shape, dtype, generator), noise)
        items.append(noise)
    return torch.stack(items), generators


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
