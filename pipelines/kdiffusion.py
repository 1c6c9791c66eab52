"""A1111 1.10's k-diffusion ancestral samplers over any A1111 sigma ladder, as
diffusers-style schedulers: `Euler a` (`sample_euler_ancestral`) and `DPM++ 2S a`
(`sample_dpmpp_2s_ancestral`).

diffusers' `EulerAncestralDiscreteScheduler` takes no Karras, Exponential or Beta sigmas,
and diffusers has no DPM++ 2S a at all (its single-step SDE DPM-Solver++ is another
method), while A1111 runs every schedule type with every k-diffusion sampler. These
classes run A1111's own loops. `Euler a`:

    x = noise * sigmas[0]
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x += randn_like(x) * s_noise * sigma_up   # the seed's generator

`DPM++ 2S a` replaces the Euler step by a DPM-Solver++(2S) step to sigma_down, in
k-diffusion's time t = -log(sigma), through the midpoint s of t and t_next:

        if sigma_down == 0:                       # the last step: Euler, as above
            x = x + (x - denoised) / sigmas[i] * (0 - sigmas[i])
        else:
            t, t_next = -log(sigmas[i]), -log(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = exp(-s) / exp(-t) * x - expm1(-h / 2) * denoised
            denoised_2 = model(x_2, exp(-s))      # a second UNet evaluation
            x = exp(-t_next) / exp(-t) * x - expm1(-h) * denoised_2
        (then the same noise as Euler a)

with `model` A1111's `CompVisDenoiser` (UNet on `x / sqrt(sigma^2 + 1)` at the fractional
timestep of `sigma`; `denoised = x - sigma * eps`, or the v-prediction scalings) and
`get_ancestral_step`: `sigma_up = min(to, eta * sqrt(to^2 (from^2 - to^2) / from^2))`,
`sigma_down = sqrt(to^2 - sigma_up^2)`. eta and s_noise are A1111's `eta_ancestral` and
`s_noise` defaults (1). The loops are cut into `scale_model_input` / `step`, so the
project's denoising loop (guidance, prompt editing, img2img tails) drives them like any
scheduler; DPM++ 2S a is second order as diffusers' Heun is (`order` 2: the UNet runs at
`sigmas[0], mid_0, sigmas[1], mid_1, ..., sigmas[n - 1]`, 2n - 1 evaluations).
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
    from `x + noise * sigma`. Subclasses set `table` in `__init__` and write `step`; the
    ancestral ones (with `eta` and `s_noise` config keys) share `_ancestral_step` and
    `_noised`."""

    order = 1
    _compatibles: list[Any] = []
    table: SigmaTable

    def _start_from_config(self, sampler: str) -> None:
        """Check the config's schedule and prediction type (naming `sampler`), then build the
        sigma table from its betas: what each subclass's `__init__` does after diffusers'
        `register_to_config` has recorded its arguments."""
        schedule, prediction = self.config.schedule, self.config.prediction_type
        if schedule not in LADDERS:
            raise ValueError(f"unknown schedule {schedule!r}; one of {sorted(LADDERS)}")
        if prediction not in ("epsilon", "v_prediction"):
            raise ValueError(f"{sampler} cannot sample a {prediction!r} model")
        self._start(SigmaTable(alphas_cumprod_from_config(self.config)))

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

    def _denoised(self, x: torch.Tensor, output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """`CompVisDenoiser`'s denoised image from the UNet's output at `sigma` (float32)."""
        if self.config.prediction_type == "epsilon":
            return x - sigma * output
        # k-diffusion's v scalings (sigma_data 1)
        return x / (sigma**2 + 1) - output * sigma / (sigma**2 + 1) ** 0.5

    def _ancestral_step(
        self, sigma: torch.Tensor, following: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """k-diffusion's `get_ancestral_step(sigma, following, eta)`: (sigma_down, sigma_up)."""
        eta = float(self.config.eta)
        sigma_up = torch.minimum(
            following, eta * (following**2 * (sigma**2 - following**2) / sigma**2) ** 0.5
        )
        return (following**2 - sigma_up**2) ** 0.5, sigma_up

    def _noised(
        self,
        x: torch.Tensor,
        sigma_up: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None,
    ) -> torch.Tensor:
        """`x + randn_like(x) * s_noise * sigma_up`, the noise from the items' generators
        (A1111's seeded `randn_like`)."""
        noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        return x + noise * float(self.config.s_noise) * sigma_up

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
        self._start_from_config("Euler a")

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
        denoised = self._denoised(x, model_output.to(torch.float32), sigma)
        following = self.sigmas[index + 1].to(torch.float32)
        sigma_down, sigma_up = self._ancestral_step(sigma, following)
        prev = x + (x - denoised) / sigma * (sigma_down - sigma)
        if following > 0:
            prev = self._noised(prev, sigma_up, generator)
        self._step_index = index + 1
        prev, denoised = prev.to(model_output.dtype), denoised.to(model_output.dtype)
        if not return_dict:
            return prev, denoised
        return EulerAncestralDiscreteSchedulerOutput(
            prev_sample=prev, pred_original_sample=denoised
        )


class A1111DPMPP2SAncestralScheduler(A1111LadderScheduler):
    """A1111's `DPM++ 2S a` on an A1111 ladder (see the module docstring).

    Each ladder step but the last takes two calls of `step`: the first (at `sigmas[i]`)
    returns the midpoint latents `x_2`, the second (at the midpoint's sigma) the step's
    result, noised. `sigmas` lists every evaluation's sigma, then 0; `ladder` is A1111's.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas: the
            model's noise schedule (kept from its scheduler config).
        prediction_type: "epsilon" or "v_prediction".
        schedule: an A1111 schedule name (`schedules.LADDERS`).
        eta: A1111's `eta_ancestral` (1: full ancestral noise; 0: DPM-Solver++(2S)).
        s_noise: A1111's `s_noise`.
    Example:
        >>> scheduler = A1111DPMPP2SAncestralScheduler(schedule="uniform")
        >>> scheduler.set_timesteps(3)
        >>> len(scheduler.timesteps)  # 2 evaluations per step, 1 for the last
        5
    """

    order = 2

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
        self._start_from_config("DPM++ 2S a")
        self._lay_out(self.sigmas)

    def set_timesteps(
        self, num_inference_steps: int, device: str | torch.device | None = None
    ) -> None:
        """The schedule's A1111 ladder, each step's midpoint after it (none after the
        last), and the table timestep of each (what the UNet is called with)."""
        super().set_timesteps(num_inference_steps, device)
        self._lay_out(self.sigmas, device)

    def _lay_out(self, ladder: torch.Tensor, device: str | torch.device | None = None) -> None:
        """Evaluation sigmas [2n] from the ladder [n + 1]: `sigmas[i]`, then the midpoint
        `exp(-(t + t_next) / 2)` when sigma_down > 0."""
        self.ladder = ladder.to(torch.float32)
        self.rungs: list[int] = []  # ladder step of each evaluation
        self.downs: list[torch.Tensor] = []  # (sigma_down, sigma_up) of each ladder step
        self.ups: list[torch.Tensor] = []
        evaluated = []
        for i in range(len(self.ladder) - 1):
            sigma, following = self.ladder[i], self.ladder[i + 1]
            sigma_down, sigma_up = self._ancestral_step(sigma, following)
            self.downs.append(sigma_down)
            self.ups.append(sigma_up)
            evaluated.append(sigma)
            self.rungs.append(i)
            if sigma_down != 0:
                t, t_next = sigma.log().neg(), sigma_down.log().neg()
                evaluated.append((t + (t_next - t) / 2).neg().exp())
                self.rungs.append(i)
        self.sigmas = torch.stack([*evaluated, self.ladder.new_zeros(())])
        self.timesteps = self.table.sigma_to_t(self.sigmas[:-1]).to(device=device)
        self._x: torch.Tensor | None = None  # the step's start while at its midpoint

    def step(
        self,
        model_output: torch.Tensor,
        timestep: Any,
        sample: torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
    ) -> EulerAncestralDiscreteSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """Half of an iteration of A1111's `sample_dpmpp_2s_ancestral` (its last step:
        all of it)."""
        sigma_now = self._sigma().to(torch.float32)
        index = self._step_index
        assert index is not None
        rung = self.rungs[index]
        x = sample.to(torch.float32)
        denoised = self._denoised(x, model_output.to(torch.float32), sigma_now)
        sigma = self.ladder[rung]
        sigma_down, sigma_up = self.downs[rung], self.ups[rung]
        midpoint = index > 0 and self.rungs[index - 1] == rung
        if sigma_down == 0:  # Euler
            prev = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            t, t_next = sigma.log().neg(), sigma_down.log().neg()
            h = t_next - t
            if midpoint:  # `denoised` is denoised_2, `x` is x_2
                assert self._x is not None, "DPM++ 2S a stepped at a midpoint it never reached"
                prev = (t_next.neg().exp() / t.neg().exp()) * self._x - (-h).expm1() * denoised
                self._x = None
            else:  # to the midpoint s
                self._x = x
                s = t + h / 2
                prev = (s.neg().exp() / t.neg().exp()) * x - (-h / 2).expm1() * denoised
        if (midpoint or sigma_down == 0) and self.ladder[rung + 1] > 0:
            prev = self._noised(prev, sigma_up, generator)
        self._step_index = index + 1
        prev, denoised = prev.to(model_output.dtype), denoised.to(model_output.dtype)
        if not return_dict:
            return prev, denoised
        return EulerAncestralDiscreteSchedulerOutput(
            prev_sample=prev, pred_original_sample=denoised
        )
