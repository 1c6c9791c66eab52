"""A1111's sigma ladders, computed the way A1111 1.10 computes them.

A1111 samples with k-diffusion: a model is a table of discrete sigmas (k-diffusion's
`DiscreteSchedule`: `sigma_to_t` and `t_to_sigma` interpolate log-sigma between the table's
entries), and a schedule type (`modules/sd_schedulers.py`) turns a step count into a
ladder of sigmas ending in 0. diffusers' `timestep_spacing` only approximates some of those
ladders (its "trailing" rounds A1111's fractional SGM Uniform timesteps, and rounds where
Simple truncates), so the samplers that can take a ladder are given this one.

The LCM sampler (`modules/sd_samplers_lcm.py`) uses a table of its own: the 50 sigmas at
the timesteps LCM was distilled on (19, 39, ..., 999), with `sigma_to_t` snapping to the
nearest of them; `LcmSigmaTable` is that table.

Pure torch (scipy only for the Beta schedule, as A1111); no state.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

BETA_ALPHA = 0.6
BETA_BETA = 0.6
"""A1111's `beta_dist_alpha` / `beta_dist_beta` defaults (diffusers' beta sigmas use the same)."""

KARRAS_RHO = 7.0


def alphas_cumprod_from_config(config: dict[str, object] | object) -> torch.Tensor:
    """The model's alphas_cumprod [T] in float32, computed in float64 as the LDM
    checkpoints' own buffer was (`ldm.modules.diffusionmodules.util.make_beta_schedule`).

    Reads `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule` and
    `trained_betas` from a diffusers scheduler config (a mapping or a config object).
    """

    def get(key: str, default: object) -> object:
        if isinstance(config, dict):
            return config.get(key, default)
        return getattr(config, key, default)

    steps = int(get("num_train_timesteps", 1000))  # type: ignore[call-overload]
    trained = get("trained_betas", None)
    schedule = str(get("beta_schedule", "scaled_linear"))
    start = float(get("beta_start", 0.00085))  # type: ignore[arg-type]
    end = float(get("beta_end", 0.012))  # type: ignore[arg-type]
    if trained is not None:
        betas = torch.tensor(np.asarray(trained), dtype=torch.float64)
    elif schedule == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, steps, dtype=torch.float64) ** 2
    elif schedule == "linear":
        betas = torch.linspace(start, end, steps, dtype=torch.float64)
    elif schedule == "squaredcos_cap_v2":
        from diffusers.schedulers.scheduling_ddpm import betas_for_alpha_bar

        betas = betas_for_alpha_bar(steps).to(torch.float64)
    else:
        raise ValueError(f"beta schedule {schedule!r} is not supported")
    return torch.cumprod(1.0 - betas, dim=0).to(torch.float32)


class SigmaTable:
    """k-diffusion's `DiscreteSchedule` (what A1111's `CompVisDenoiser` is): sigmas [T]
    ascending, log-sigma interpolation between entries, fractional timesteps."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5  # [T], float32
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of `sigma` (k-diffusion, unquantized)."""
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at a fractional timestep (log-sigma interpolated)."""
        t = t.float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """A1111's "Uniform" (and the k-diffusion samplers' automatic) ladder."""
        t_max = len(self.sigmas) - 1
        t = torch.linspace(t_max, 0, n)
        return _append_zero(self.t_to_sigma(t))


class LcmSigmaTable(SigmaTable):
    """A1111's `LCMCompVisDenoiser`: the 50 sigmas at LCM's distillation timesteps
    (`skip * j + skip - 1`), `sigma_to_t` snapping to the nearest of them."""

    def __init__(self, alphas_cumprod: torch.Tensor, original_steps: int = 50) -> None:
        timesteps = alphas_cumprod.shape[0]
        self.skip = timesteps // original_steps
        valid = torch.zeros(original_steps, dtype=torch.float32)
        for x in range(original_steps):
            valid[original_steps - 1 - x] = alphas_cumprod[timesteps - 1 - x * self.skip]
        super().__init__(valid)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log() - self.log_sigmas[:, None]
        nearest = dists.abs().argmin(dim=0).view(sigma.shape)
        return nearest * self.skip + (self.skip - 1)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        index = ((t - (self.skip - 1)) / self.skip).float()
        return super().t_to_sigma(index.clamp(min=0, max=len(self.sigmas) - 1))

    def get_sigmas(self, n: int) -> torch.Tensor:
        start = self.sigma_to_t(torch.tensor(self.sigma_max))
        end = self.sigma_to_t(torch.tensor(self.sigma_min))
        return _append_zero(self.t_to_sigma(torch.linspace(start, end, n)))


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _from_list(values: Sequence[float | torch.Tensor]) -> torch.Tensor:
    return torch.tensor([float(v) for v in values], dtype=torch.float32)


def _uniform(n: int, table: SigmaTable) -> torch.Tensor:
    return table.get_sigmas(n)


def _karras(n: int, table: SigmaTable) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = table.sigma_min ** (1 / KARRAS_RHO)
    max_inv_rho = table.sigma_max ** (1 / KARRAS_RHO)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** KARRAS_RHO)


def _exponential(n: int, table: SigmaTable) -> torch.Tensor:
    return _append_zero(
        torch.linspace(math.log(table.sigma_max), math.log(table.sigma_min), n).exp()
    )


def _linspace_t(n: int, table: SigmaTable, sgm: bool) -> torch.Tensor:
    start = table.sigma_to_t(torch.tensor(table.sigma_max))
    end = table.sigma_to_t(torch.tensor(table.sigma_min))
    timesteps = torch.linspace(start, end, n + 1)[:-1] if sgm else torch.linspace(start, end, n)
    return _from_list([*(table.t_to_sigma(t) for t in timesteps), 0.0])


def _sgm_uniform(n: int, table: SigmaTable) -> torch.Tensor:
    return _linspace_t(n, table, sgm=True)


def _normal(n: int, table: SigmaTable) -> torch.Tensor:
    return _linspace_t(n, table, sgm=False)


def _simple(n: int, table: SigmaTable) -> torch.Tensor:
    stride = len(table.sigmas) / n
    return _from_list([*(table.sigmas[-(1 + int(x * stride))] for x in range(n)), 0.0])


def _ddim(n: int, table: SigmaTable) -> torch.Tensor:
    stride = max(len(table.sigmas) // n, 1)
    picked = [table.sigmas[x] for x in range(1, len(table.sigmas), stride)]
    return _from_list([*reversed(picked), 0.0])


def _beta(n: int, table: SigmaTable) -> torch.Tensor:
    from scipy import stats

    fractions = 1 - np.linspace(0, 1, n)
    points = [stats.beta.ppf(x, BETA_ALPHA, BETA_BETA) for x in fractions]
    span = table.sigma_max - table.sigma_min
    return _from_list([*(table.sigma_min + x * span for x in points), 0.0])


LADDERS: dict[str, Callable[[int, SigmaTable], torch.Tensor]] = {
    "automatic": _uniform,
    "uniform": _uniform,
    "karras": _karras,
    "exponential": _exponential,
    "sgm_uniform": _sgm_uniform,
    "simple": _simple,
    "normal": _normal,
    "ddim": _ddim,
    "beta": _beta,
}
"""A1111 schedule name -> ladder function (automatic: the table's own `get_sigmas`, which
is what A1111 uses for a sampler without a default schedule, such as LCM)."""


def a1111_sigmas(schedule: str, steps: int, table: SigmaTable) -> torch.Tensor:
    """A1111's sigma ladder [steps + 1] (last 0; the DDIM schedule may give more or fewer
    steps, as in A1111) for `schedule` on `table`.

    Example: `a1111_sigmas("sgm_uniform", 4, SigmaTable(alphas))` -> sigmas at t = 999,
    749.25, 499.5, 249.75, then 0.
    """
    return LADDERS[schedule](steps, table)
