"""A1111 1.10's `Euler a` (k-diffusion's `sample_euler_ancestral`) over any A1111 sigma
ladder, as a diffusers-style scheduler.

diffusers' `EulerAncestralDiscreteScheduler` takes no Karras, Exponential or Beta sigmas,
while A1111 runs every schedule type with every k-diffusion sampler. For those schedules
this class runs A1111's own loop:

    x = noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x += randn_like(x) * s_noise * sigma_up   # the seed's generator

with `model` A1111's `CompVisDenoiser` (UNet on `x / sqrt(sigma^2 + 1)` at the fractional
timestep of `sigma`; `denoised = x - sigma * eps`, or the v-prediction scalings) and
`get_ancestral_step`: `sigma_up = min(to, eta * sqrt(to^2 (from^2 - to^2) / from^2))`,
`sigma_down = sqrt(to^2 - sigma_up^2)`. eta and s_noise are A1111's `eta_ancestral` and
`s_noise` defaults (1). The loop is cut into `scale_model_input` / `step`, so the project's
denoising loop (guidance, prompt editing, img2img tails) drives it like any scheduler.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_euler_ancestral_discrete import (
    EulerAncestralDiscreteSchedulerOutput,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from pipelines.schedules import LADDERS, SigmaTable, a1111_sigmas, alphas_cumprod_from_config


class A1111LadderScheduler(SchedulerMixin, ConfigMixin):
    """What A1111's k-diffusion loops share, cut into diffusers' scheduler calls: a sigma
    table, the request's ladder over it (`schedule` config key), latents scaled by sigma,
    the UNet fed `x / sqrt(sigma^2 + 1)` at each sigma's table timestep, img2img starting
    from `x + noise * sigma`. Subclasses set `table` in `__init__` and write `step`."""

    order = 1
    _compatibles: list[Any] = []
    table: SigmaTable

    def _start(self, table: SigmaTable) -> None:
        self.table = table
        self.num_inference_steps: int | None = None
        self.sigmas = torch.tensor([table.sigma_max, 0.0])
        self.timesteps = table.sigma_to_t(self.sigmas[:1])
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
        """The schedule's A1111 ladder over the table, and the table timestep of each sigma
        (what the UNet is called with)."""
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

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """img2img's start: `x + noise * sigma` at the tail's first sigma (A1111)."""
        sigma = self.sigmas[self._begin_index or 0].to(original_samples.device)
        return original_samples + noise * sigma.to(original_samples.dtype)

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)


class A1111EulerAncestralScheduler(A1111LadderScheduler):
    """A1111's `Euler a` on an A1111 ladder (see the module docstring).

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the
            model's noise schedule (kept from its scheduler config).
        prediction_type: "epsilon" or "v_prediction".
        schedule: an A1111 schedule name (`schedules.LADDERS`).
        eta: A1111's `eta_ancestral` (1: full ancestral noise; 0: plain Euler).
        s_noise: A1111's `s_noise`.
    Example:
        >>> scheduler = A1111EulerAncestralScheduler(schedule="karras")
        >>> scheduler.set_timesteps(4)
        >>> len(scheduler.timesteps)
        4
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
        schedule: str = "karras",
        eta: float = 1.0,
        s_noise: float = 1.0,
    ) -> None:
        if schedule not in LADDERS:
            raise ValueError(f"unknown schedule {schedule!r}; one of {sorted(LADDERS)}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"Euler a cannot sample a {prediction_type!r} model")
        self._start(SigmaTable(alphas_cumprod_from_config(self.config)))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> EulerAncestralDiscreteSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One iteration of A1111's `sample_euler_ancestral`."""
        sigma = self._sigma().to(torch.float32)
        index = self._step_index
        assert index is not None
        x = sample.to(torch.float32)
        output = model_output.to(torch.float32)
        if self.config.prediction_type == "epsilon":
            denoised = x - sigma * output
        else:  # k-diffusion's v scalings (sigma_data 1)
            denoised = x / (sigma**2 + 1) - output * sigma / (sigma**2 + 1) ** 0.5
        following = self.sigmas[index + 1].to(torch.float32)
        eta = float(self.config.eta)
        sigma_up = torch.minimum(
            following, eta * (following**2 * (sigma**2 - following**2) / sigma**2) ** 0.5
        )
        sigma_down = (following**2 - sigma_up**2) ** 0.5
        prev = x + (x - denoised) / sigma * (sigma_down - sigma)
        if following > 0:
            noise = randn_tensor(
                model_output.shape, generator=generator, device=x.device, dtype=torch.float32
            )
            prev = prev + noise * float(self.config.s_noise) * sigma_up
        self._step_index = index + 1
        prev, denoised = prev.to(model_output.dtype), denoised.to(model_output.dtype)
        if not return_dict:
            return prev, denoised
        return EulerAncestralDiscreteSchedulerOutput(
            prev_sample=prev, pred_original_sample=denoised
        )
