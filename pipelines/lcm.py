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
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_lcm import LCMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from pipelines.schedules import LADDERS, LcmSigmaTable, a1111_sigmas, alphas_cumprod_from_config

SIGMA_DATA = 0.5
"""LCM's boundary-condition sigma_data (A1111 and diffusers alike)."""


class A1111LCMScheduler(SchedulerMixin, ConfigMixin):
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

    order = 1
    _compatibles: list[Any] = []

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
        self.table = LcmSigmaTable(self.alphas_cumprod, original_inference_steps)
        self.num_inference_steps: int | None = None
        self.sigmas = torch.tensor([self.table.sigma_max, 0.0])
        self.timesteps = self.table.sigma_to_t(self.sigmas[:1])
        self._step_index: int | None = None
        self._begin_index: int | None = None

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        """A1111 starts from `noise * sigmas[0]`."""
        return self.sigmas[0]

    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where an img2img tail starts (A1111's `sigmas[steps - t_enc - 1:]`)."""
        self._begin_index = begin_index

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None
    ) -> None:
        """The schedule's sigma ladder over LCM's table, and the table timestep nearest
        each sigma (what the UNet is called with)."""
        sigmas = a1111_sigmas(self.config.schedule, num_inference_steps, self.table)
        self.num_inference_steps = len(sigmas) - 1
        self.sigmas = sigmas
        self.timesteps = self.table.sigma_to_t(sigmas[:-1]).to(device=device)
        self._step_index = None
        self._begin_index = None

    def _sigma(self) -> torch.Tensor:
        if self._step_index is None:
            self._step_index = self._begin_index or 0
        return self.sigmas[self._step_index]

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        """The UNet's input: `x / sqrt(sigma^2 + 1)` (k-diffusion's c_in)."""
        sigma = self._sigma()
        return sample / ((sigma**2 + 1) ** 0.5)

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

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """img2img's start: `x + noise * sigma` at the tail's first sigma (A1111)."""
        sigma = self.sigmas[self._begin_index or 0].to(original_samples.device)
        return original_samples + noise * sigma.to(original_samples.dtype)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
