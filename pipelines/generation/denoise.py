"""The denoising loop, with the hooks later modes plug into.

It does what a diffusers Stable Diffusion `__call__` does between "prepare latents" and
"decode" (same operations in the same order, so images match plain diffusers bit for bit),
and exposes the places other modes change: the UNet's input (inpainting models' extra
channels), its conditioning per step (prompt editing), the guided prediction before the
scheduler steps with it (inpainting's blend of the denoised image with the original) and
the latents after each step, and residuals added to the UNet's skip connections (ControlNet
units). Composable prompts (A1111's `AND`) are more conditioned
passes in the same UNet batch, combined as A1111 does:
uncond + cfg * sum(w_i * (cond_i - uncond)).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

UNetInput = Callable[[torch.Tensor, int], torch.Tensor]
"""(scaled model input [2B or B, 4, h, w], step index) -> the UNet's input."""
Conditioning = Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor] | None]]
"""step index -> (encoder hidden states, added cond kwargs) for that step."""
AfterStep = Callable[[torch.Tensor, int], torch.Tensor]
"""(latents after the scheduler step, step index) -> latents to carry on with."""
Prediction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
"""(guided prediction [B, ...], latents [B, ...], timestep, step index) -> the prediction
the scheduler steps with (inpainting's blend of the denoised image with the original)."""
OnStep = Callable[[int, torch.Tensor], bool]
"""(steps done, latents) -> True to stop the loop (interrupt or skip)."""
BeforeStep = Callable[[int], None]
"""step index -> None, before the UNet runs (per-step LoRA schedules re-merge here)."""
Residuals = Callable[
    [torch.Tensor, torch.Tensor, int, torch.Tensor, dict[str, torch.Tensor] | None],
    tuple[list[torch.Tensor], torch.Tensor] | None,
]
"""(scaled model input before the UNet input hooks, timestep, step index, hidden states,
added cond kwargs) -> residuals added to the UNet's skip connections and middle block
(ControlNet units), or None for none at that step."""


@dataclass
class DenoiseLoop:
    """One batch's denoising, built by a generation run and called once.

    `conditioning(i)` returns the hidden states of the uncond pass (when guidance applies)
    followed by one block per conditioned part, each block one row per batch item.
    `cond_weights` are the parts' weights (one part of weight 1 is plain txt2img; without
    guidance the parts are mixed by weight). `extra_step_kwargs` follow diffusers: `eta`
    (the sampler's: 0, TCD's gamma 0.3) and the per-item generators, for the schedulers
    whose `step` accepts them.
    """

    unet: Any
    scheduler: Any
    conditioning: Conditioning
    guidance_scale: float
    generators: list[torch.Generator]
    timestep_cond: torch.Tensor | None = None
    eta: float = 0.0
    cond_weights: tuple[float, ...] = (1.0,)
    unet_input: list[UNetInput] = field(default_factory=list)
    on_prediction: list[Prediction] = field(default_factory=list)
    after_step: list[AfterStep] = field(default_factory=list)
    before_step: list[BeforeStep] = field(default_factory=list)
    residuals: Residuals | None = None

    @property
    def guided(self) -> bool:
        """Whether the uncond pass runs: always, as in A1111, unless it cancels out or the
        UNet has a distilled guidance embedding (LCM checkpoints' `timestep_cond`).

        A1111 1.10 (`CFGDenoiser.forward`) skips the uncond pass only for its "skip early
        CFG" and NGMS options, never for CFG 1; but its result, uncond + cfg * sum(w_i *
        (cond_i - uncond)), does not depend on uncond when cfg * sum(w_i) == 1 (plain CFG
        1), so that pass is skipped here: the same image within float rounding, half the
        UNet work. CFG below 1 keeps the negative prompt's pull, as in A1111 (diffusers
        would drop guidance there)."""
        if self.timestep_cond is not None:
            return False
        return abs(self.guidance_scale * sum(self.cond_weights) - 1) > 1e-9

    @property
    def copies(self) -> int:
        """UNet batch rows per batch item: the uncond pass (when guided) and each part."""
        return len(self.cond_weights) + (1 if self.guided else 0)

    def combine(self, noise: torch.Tensor) -> torch.Tensor:
        """The UNet's [copies*B, ...] predictions -> one guided prediction [B, ...]."""
        if self.copies == 1:
            return noise
        if not self.guided:  # cfg * sum(w) == 1: sum(cfg * w_i * cond_i) (distilled: w_i)
            scale = 1.0 if self.timestep_cond is not None else self.guidance_scale
            parts = noise.chunk(self.copies)
            return sum(scale * w * p for w, p in zip(self.cond_weights, parts, strict=True))
        uncond, *conds = noise.chunk(self.copies)
        if self.cond_weights == (1.0,):
            return uncond + self.guidance_scale * (conds[0] - uncond)  # diffusers' exact ops
        delta = sum(w * (c - uncond) for w, c in zip(self.cond_weights, conds, strict=True))
        return uncond + self.guidance_scale * delta

    def extra_step_kwargs(self) -> dict[str, Any]:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        extra: dict[str, Any] = {}
        if "eta" in accepted:
            extra["eta"] = self.eta
        if "generator" in accepted:
            extra["generator"] = self.generators
        return extra

    @torch.no_grad()
    def __call__(
        self, latents: torch.Tensor, timesteps: torch.Tensor, on_step: OnStep, start: int = 0
    ) -> torch.Tensor:
        """Denoise `latents` [B, 4, h, w] over `timesteps`, the first of which is step
        `start` of the run (a refiner continues there); stops early when `on_step` says so
        (the latents reached so far are returned).

        Under `no_grad`, as diffusers' `__call__`: the job's worker thread has grad mode
        on, and autograd's per-op bookkeeping then cost a quarter of the eager rate on a
        GPU (SD1.5 512x512 on an H200: 26.5 vs 35.0 it/s, docs/benchmarks.md), the same
        operations and pixels either way."""
        step_kwargs = self.extra_step_kwargs()
        for index, timestep in enumerate(timesteps, start):
            for before in self.before_step:
                before(index)
            # [B, 4, h, w] -> [copies*B, 4, h, w]: uncond first, then each cond part
            model_input = torch.cat([latents] * self.copies) if self.copies > 1 else latents
            model_input = self.scheduler.scale_model_input(model_input, timestep)
            hidden_states, added = self.conditioning(index)
            control = None
            if self.residuals is not None:
                control = self.residuals(model_input, timestep, index, hidden_states, added)
            for hook in self.unet_input:
                model_input = hook(model_input, index)
            extra: dict[str, Any] = {}
            if control is not None:
                extra["down_block_additional_residuals"] = control[0]
                extra["mid_block_additional_residual"] = control[1]
            noise = self.unet(
                model_input,
                timestep,
                encoder_hidden_states=hidden_states,
                timestep_cond=self.timestep_cond,
                cross_attention_kwargs=None,
                added_cond_kwargs=added,
                return_dict=False,
                **extra,
            )[0]
            noise = self.combine(noise)
            for change in self.on_prediction:
                noise = change(noise, latents, timestep, index)
            latents = self.scheduler.step(
                noise, timestep, latents, **step_kwargs, return_dict=False
            )[0]
            for after in self.after_step:
                latents = after(latents, index)
            if on_step(index + 1, latents):
                break
        return latents
