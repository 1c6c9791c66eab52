"""A1111 1.10's LCM sampler as a diffusers-style scheduler.

A1111 (`modules/sd_samplers_lcm.py`) samples LCM with k-diffusion, not with diffusers'
`LCMScheduler`, and the two differ: A1111's ladder comes from the request's schedule type
over LCM's own 50-entry sigma table (`schedules.LcmSigmaTable`), so 4 steps end at
timestep 19, where diffusers' `LCMScheduler` picks 999, 759, 499, 259 from
`original_inference_steps` whatever the schedule. Its loop (`sample_lcm`):

    x = noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])        # LCM's boundary-condition output
        x = denoised
        if sigmas[i + 1] > 0:
            x += sigmas[i + 1] * randn_like(x)  # the seed's generator, as every ancestral

and `model` (`LCMCompVisDenoiser.forward`) runs the UNet on `x / sqrt(sigma^2 + 1)` at the
table timestep nearest `sigma`, takes `x0 = x - sigma * eps`, and returns
`c_out * x0 + c_skip * x` with LCM's scalings at 10x that timestep.

This class is that loop cut into diffusers' `scale_model_input` / `step`, so the project's
denoising loop (guidance, prompt editing, img2img tails, LCM checkpoints'
`timestep_cond`) drives it like any other scheduler; latents are k-diffusion's (scaled by
sigma), as for Euler.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from pipelines.kdiffusion import A1111LadderScheduler
from pipelines.schedules import LADDERS, LcmSigmaTable, alphas_cumprod_from_config

SIGMA_DATA = 0.5
"""LCM's boundary-condition sigma_data (A1111 and diffusers alike)."""


class A1111LCMScheduler(A1111LadderScheduler):
    """A1111's `LCM` sampler (see the module docstring).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the
            model's noise schedule (kept from its scheduler config).
        prediction_type: "epsilon" (A1111's LCM assumes it) or "v_prediction" (converted
            to the same x0; A1111 has no v-prediction LCM).
        original_inference_steps: LCM's distillation grid (50, as A1111 hard-codes).
        timestep_scaling: LCM's boundary-condition scaling (10).
        schedule: an A1111 schedule name (`schedules.LADDERS`); "automatic" is the LCM
            table's own ladder (A1111's LCM has no default schedule).
    Example:
        >>> scheduler = A1111LCMScheduler(schedule="sgm_uniform")
        >>> scheduler.set_timesteps(4)
        >>> scheduler.timesteps.tolist()
        [999, 759, 499, 259]
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        original_inference_steps: int = 50,
        timestep_scaling: float = 10.0,
        schedule: str = "automatic",
    ) -> None:
        if schedule not in LADDERS:
            raise ValueError(f"unknown schedule {schedule!r}; one of {sorted(LADDERS)}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"LCM cannot sample a {prediction_type!r} model")
        self.alphas_cumprod = alphas_cumprod_from_config(self.config)
        self._start(LcmSigmaTable(self.alphas_cumprod, original_inference_steps))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> LCMSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One iteration of A1111's `sample_lcm`: the boundary-conditioned denoised
        sample, then fresh noise at the next sigma (none at the last step)."""
        sigma = self._sigma().to(torch.float32)
        index = self._step_index
        assert index is not None
        x = sample.to(torch.float32)
        output = model_output.to(torch.float32)
        if self.config.prediction_type == "epsilon":
            x0 = x - sigma * output
        else:  # v: x0 = c_skip * x + c_out * v with k-diffusion's v scalings
            x0 = x / (sigma**2 + 1) - output * sigma / (sigma**2 + 1) ** 0.5
        # 0-d tensors, so they combine with latents on any device
        timestep = self.table.sigma_to_t(sigma.reshape(1))[0].to(torch.float32)
        scaled_t = timestep * self.config.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled_t**2 + SIGMA_DATA**2)
        c_out = scaled_t / (scaled_t**2 + SIGMA_DATA**2) ** 0.5
        denoised = c_out * x0 + c_skip * x
        prev = denoised
        following = self.sigmas[index + 1]
        if following > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=x.device, dtype=torch.float32
            )
            prev = denoised + following.to(torch.float32) * noise
        self._step_index = index + 1
        prev, denoised = prev.to(model_output.dtype), denoised.to(model_output.dtype)
        if not return_dict:
            return prev, denoised
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised)
