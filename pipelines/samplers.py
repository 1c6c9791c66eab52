"""A1111 sampler and schedule names, mapped onto diffusers schedulers.

A1111 (>= 1.9) names a sampler ("DPM++ 2M") and, separately, a schedule type ("Karras");
older clients and infotexts still send combined names ("DPM++ 2M Karras"). This module is
the one place that turns those names into a diffusers scheduler built from the model's own
scheduler config, so beta schedule, prediction type and training steps always come from the
checkpoint and only the solver and the noise schedule come from the request.

Pure: no torch or diffusers import until `make_scheduler` runs, no state.

Facts from A1111 v1.10 (`modules/sd_samplers_*.py`, `modules/sd_schedulers.py`):
- "Automatic" means the sampler's own default schedule (`options["scheduler"]`): karras
  for DPM++ 2M / DPM++ SDE / DPM++ 2S a / DPM2 / DPM2 a, exponential for the DPM++ 2M/3M
  SDE family, the model's plain sigma ladder ("uniform") for the rest.
- DDIM, PLMS and UniPC ignore the schedule in A1111 and step through
  `range(0, 1000, 1000 // steps) + 1`; that is the "ddim" schedule (`leading` spacing,
  `steps_offset=1`), so it is their automatic choice here.
- The infotext's "Schedule type" is the label of the schedule automatic resolved to
  ("Karras" for DPM++ 2M), or "Automatic" when the sampler has no default of its own.
- LCM is A1111's own loop (`pipelines/lcm.py`) over LCM's 50-sigma table, so every
  schedule type applies to it as in A1111 (diffusers' `LCMScheduler` ignores them).
- DPM++ 2S a is A1111's own loop (`sample_dpmpp_2s_ancestral`, `pipelines/kdiffusion.py`)
  over every schedule type's ladder; Euler a runs its own loop for the schedules diffusers'
  ancestral Euler cannot take (Karras, Exponential, Beta).
- SGM Uniform and Simple are A1111's exact ladders (`pipelines/schedules.py`) for the
  classes that take one (`_LADDER_ROUTES`: Euler both; Heun and the DPM++ multistep
  family Simple); the others use "trailing" spacing, within one training timestep.
- TCD (not in A1111 1.10; diffusers' `TCDScheduler`) runs with gamma (eta) 0.3, the TCD
  model cards' value, and at most 50 steps (its distillation grid).

Approximations (diffusers has no exact port): DPM2, DPM2 a and DPM++ 3M SDE do not drop
the next-to-last sigma as A1111 does; the Brownian noise of the SDE samplers differs, so seeds
do not reproduce A1111's pixels. Left out (no diffusers equivalent): DPM fast,
DPM adaptive, Restart, DDIM CFG++; schedules polyexponential, kl_optimal,
align_your_steps.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipelines.errors import InvalidRequestError

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

API_DEFAULT_SAMPLER = "Euler"
"""What A1111's API uses when `sampler_name` is null or empty."""

UI_DEFAULT_SAMPLER = "DPM++ 2M"
"""A1111's UI default sampler (with schedule "Automatic", i.e. Karras)."""

AUTOMATIC = "automatic"

_MODEL_CONFIG_KEYS = frozenset(
    {
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
        "rescale_betas_zero_snr",
        "clip_sample",
        "clip_sample_range",
        "set_alpha_to_one",
        "steps_offset",
        "sample_max_value",
    }
)
"""Keys of a model's scheduler config that describe the model, not the solver.

Everything else (a repo's `use_karras_sigmas`, `algorithm_type`, `timestep_spacing`, ...)
describes the scheduler the repo happened to ship and must not leak into ours.
"""


@dataclass(frozen=True)
class _Schedule:
    """One A1111 schedule type and the diffusers config that expresses it."""

    name: str
    label: str
    aliases: tuple[str, ...] | None = None
    default_rho: float = -1.0
    need_inner_model: bool = False
    flags: Mapping[str, object] = field(default_factory=dict)
    """Config keys the scheduler class must accept for this schedule to be possible."""
    extras: Mapping[str, object] = field(default_factory=dict)
    """Config keys applied when the class accepts them (sigma ladders start from these)."""
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Sampler:
    """One A1111 sampler: its diffusers class, solver kwargs and A1111 metadata."""

    name: str
    class_name: str
    aliases: tuple[str, ...]
    kwargs: Mapping[str, object] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)
    """A1111's sampler options as `/sdapi/v1/samplers` reports them (values as strings)."""
    automatic: str | None = "uniform"
    """Schedule that "Automatic" builds; None keeps the class's own timestep logic."""
    ignores: frozenset[str] = frozenset()
    """Config keys the class accepts but never reads, so they cannot express a schedule."""
    requires: tuple[str, ...] = ()
    own_schedules: bool = False
    """The class computes A1111's ladders itself from a `schedule` config key (LCM,
    DPM++ 2S a)."""
    fallback: str | None = None
    """A class running A1111's own loop (it takes a `schedule` config key) for the schedule
    types `class_name` cannot express, so every A1111 combination exists (Euler a)."""
    eta: float = 0.0
    """The `eta` its `step` gets, where it takes one (DDIM's A1111 default 0; TCD's gamma)."""

    @property
    def a1111_default(self) -> str | None:
        """A1111's own default schedule for this sampler, if it has one."""
        return self.options.get("scheduler")


_SCHEDULES: tuple[_Schedule, ...] = (
    _Schedule(AUTOMATIC, "Automatic"),
    _Schedule("uniform", "Uniform", need_inner_model=True, flags={"timestep_spacing": "linspace"}),
    _Schedule(
        "karras",
        "Karras",
        default_rho=7.0,
        flags={"use_karras_sigmas": True},
        extras={"timestep_spacing": "linspace"},
    ),
    _Schedule(
        "exponential",
        "Exponential",
        flags={"use_exponential_sigmas": True},
        extras={"timestep_spacing": "linspace"},
    ),
    _Schedule(
        "sgm_uniform",
        "SGM Uniform",
        aliases=("SGMUniform",),
        need_inner_model=True,
        flags={"timestep_spacing": "trailing"},
    ),
    _Schedule("simple", "Simple", need_inner_model=True, flags={"timestep_spacing": "trailing"}),
    _Schedule("normal", "Normal", need_inner_model=True, flags={"timestep_spacing": "linspace"}),
    _Schedule(
        "ddim",
        "DDIM",
        need_inner_model=True,
        flags={"timestep_spacing": "leading"},
        extras={"steps_offset": 1},
    ),
    _Schedule(
        "beta",
        "Beta",
        need_inner_model=True,
        flags={"use_beta_sigmas": True},
        extras={"timestep_spacing": "linspace"},
        requires=("scipy",),
    ),
)

_UNSUPPORTED_SCHEDULES = {
    "polyexponential": "Polyexponential",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
}
"""A1111 schedule types diffusers cannot express; named so errors can say so."""

_DPMPP_MULTISTEP = {"solver_type": "midpoint", "lower_order_final": True, "euler_at_final": False}

_SAMPLERS: tuple[_Sampler, ...] = (
    _Sampler(
        "DPM++ 2M",
        "DPMSolverMultistepScheduler",
        ("k_dpmpp_2m", "dpmpp_2m"),
        {"algorithm_type": "dpmsolver++", "solver_order": 2, **_DPMPP_MULTISTEP},
        {"scheduler": "karras"},
        automatic="karras",
    ),
    _Sampler(
        "DPM++ SDE",
        "DPMSolverSDEScheduler",
        ("k_dpmpp_sde", "dpmpp_sde"),
        {},
        {"scheduler": "karras", "second_order": "True", "brownian_noise": "True"},
        automatic="karras",
        requires=("torchsde",),
    ),
    _Sampler(
        "DPM++ 2M SDE",
        "DPMSolverMultistepScheduler",
        ("k_dpmpp_2m_sde", "dpmpp_2m_sde"),
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_DPMPP_MULTISTEP},
        {"scheduler": "exponential", "brownian_noise": "True"},
        automatic="exponential",
    ),
    _Sampler(
        "DPM++ 2M SDE Heun",
        "DPMSolverMultistepScheduler",
        ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun"),
        {
            "algorithm_type": "sde-dpmsolver++",
            "solver_order": 2,
            **_DPMPP_MULTISTEP,
            "solver_type": "heun",
        },
        {"scheduler": "exponential", "brownian_noise": "True", "solver_type": "heun"},
        automatic="exponential",
    ),
    _Sampler(
        "DPM++ 2S a",
        # A1111's own `sample_dpmpp_2s_ancestral`; diffusers has no such solver
        "pipelines.kdiffusion:A1111DPMPP2SAncestralScheduler",
        ("k_dpmpp_2s_a", "dpmpp_2s_ancestral"),
        {},
        {"scheduler": "karras", "uses_ensd": "True", "second_order": "True"},
        automatic="karras",
        own_schedules=True,
    ),
    _Sampler(
        "DPM++ 3M SDE",
        "DPMSolverMultistepScheduler",
        ("k_dpmpp_3m_sde", "dpmpp_3m_sde"),
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, **_DPMPP_MULTISTEP},
        {
            "scheduler": "exponential",
            "discard_next_to_last_sigma": "True",
            "brownian_noise": "True",
        },
        automatic="exponential",
    ),
    _Sampler(
        "Euler a",
        "EulerAncestralDiscreteScheduler",
        ("k_euler_a", "k_euler_ancestral", "euler_ancestral"),
        {},
        {"uses_ensd": "True"},
        # diffusers' class takes no Karras, Exponential or Beta sigmas; A1111's loop does
        fallback="pipelines.kdiffusion:A1111EulerAncestralScheduler",
    ),
    _Sampler("Euler", "EulerDiscreteScheduler", ("k_euler", "euler"), {}, {}),
    _Sampler("LMS", "LMSDiscreteScheduler", ("k_lms", "lms"), {}, {}, requires=("scipy",)),
    _Sampler("Heun", "HeunDiscreteScheduler", ("k_heun", "heun"), {}, {"second_order": "True"}),
    _Sampler(
        "DPM2",
        "KDPM2DiscreteScheduler",
        ("k_dpm_2", "dpm_2"),
        {},
        {"scheduler": "karras", "discard_next_to_last_sigma": "True", "second_order": "True"},
        automatic="karras",
    ),
    _Sampler(
        "DPM2 a",
        "KDPM2AncestralDiscreteScheduler",
        ("k_dpm_2_a", "dpm_2_ancestral"),
        {},
        {
            "scheduler": "karras",
            "discard_next_to_last_sigma": "True",
            "uses_ensd": "True",
            "second_order": "True",
        },
        automatic="karras",
    ),
    _Sampler("DDIM", "DDIMScheduler", ("ddim",), {}, {}, automatic="ddim"),
    _Sampler(
        "PLMS", "PNDMScheduler", ("plms", "pndm"), {"skip_prk_steps": True}, {}, automatic="ddim"
    ),
    _Sampler(
        "UniPC",
        "UniPCMultistepScheduler",
        ("unipc", "uni_pc"),
        # A1111's defaults: uni_pc_variant "bh1", uni_pc_order 3, lower-order final step,
        # stopping at t = 1/1000 (sigma_min) rather than 0. diffusers' bh1 also turns the
        # last step to NaN when it ends at sigma 0, so sigma_min is needed either way.
        {
            "solver_type": "bh1",
            "solver_order": 3,
            "lower_order_final": True,
            "predict_x0": True,
            "final_sigmas_type": "sigma_min",
        },
        {},
    ),
    _Sampler(
        "LCM",
        "pipelines.lcm:A1111LCMScheduler",
        ("k_lcm", "lcm"),
        {},
        {},
        automatic=None,
        # A1111's own LCM loop over LCM's 50-sigma table; every schedule type applies.
        own_schedules=True,
    ),
    _Sampler(
        "TCD",
        "TCDScheduler",
        ("tcd",),
        {},
        {},
        automatic=None,
        # TCDScheduler takes `timestep_spacing` but derives its steps from
        # `original_inference_steps` alone, so no schedule type can change it.
        ignores=frozenset({"timestep_spacing"}),
        # gamma 0.3, the TCD LoRAs' model cards' value (h1t/TCD-SD15-LoRA, TCD-SDXL-LoRA).
        eta=0.3,
    ),
)

_UNSUPPORTED_SAMPLERS = {
    "dpm fast": "DPM fast",
    "k_dpm_fast": "DPM fast",
    "dpm adaptive": "DPM adaptive",
    "k_dpm_ad": "DPM adaptive",
    "restart": "Restart",
    "ddim cfg++": "DDIM CFG++",
    "ddim_cfgpp": "DDIM CFG++",
}
"""A1111 samplers with no diffusers equivalent; named so errors can say so."""

_LEGACY_ALIASES = {
    "k_lms_ka": ("LMS", "karras"),
    "k_dpm_2_ka": ("DPM2", "karras"),
    "k_dpm_2_a_ka": ("DPM2 a", "karras"),
    "k_dpmpp_2s_a_ka": ("DPM++ 2S a", "karras"),
    "k_dpmpp_2m_ka": ("DPM++ 2M", "karras"),
    "k_dpmpp_sde_ka": ("DPM++ SDE", "karras"),
    "k_dpmpp_2m_sde_ka": ("DPM++ 2M SDE", "karras"),
    "k_dpmpp_2m_sde_exp": ("DPM++ 2M SDE", "exponential"),
    "k_dpmpp_2m_sde_heun_ka": ("DPM++ 2M SDE Heun", "karras"),
    "k_dpmpp_2m_sde_heun_exp": ("DPM++ 2M SDE Heun", "exponential"),
    "k_dpmpp_3m_sde_ka": ("DPM++ 3M SDE", "karras"),
    "k_dpmpp_3m_sde_exp": ("DPM++ 3M SDE", "exponential"),
}
"""Aliases of A1111 <= 1.8's combined samplers ("DPM++ 2M Karras" was `k_dpmpp_2m_ka`)."""

_SAMPLER_BY_NAME = {s.name: s for s in _SAMPLERS}
_SAMPLER_LOOKUP = {key.casefold(): s.name for s in _SAMPLERS for key in (s.name, *s.aliases)}
_SCHEDULE_BY_NAME = {s.name: s for s in _SCHEDULES}
_SCHEDULE_LOOKUP = {
    key.casefold(): s.name for s in _SCHEDULES for key in (s.name, s.label, *(s.aliases or ()))
}
_SCHEDULE_SUFFIXES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        [(key, s.name) for s in _SCHEDULES for key in {s.name, s.label, *(s.aliases or ())}]
        + [(k, k) for k in _UNSUPPORTED_SCHEDULES]
        + [(label, name) for name, label in _UNSUPPORTED_SCHEDULES.items()],
        key=lambda pair: (-len(pair[0]), pair[0]),
    )
)
"""(suffix, schedule name), longest first, so "SGM Uniform" wins over "Uniform"."""

SAMPLER_NAMES: tuple[str, ...] = tuple(s.name for s in _SAMPLERS)
"""Every sampler this module knows, in A1111's order (some may lack an optional package)."""

SCHEDULER_NAMES: tuple[str, ...] = tuple(s.name for s in _SCHEDULES)
"""Schedule type names (A1111's `name` field), "automatic" first."""

SCHEDULER_LABELS: tuple[str, ...] = tuple(s.label for s in _SCHEDULES)
"""Schedule type labels as A1111's UI shows them, "Automatic" first."""


@dataclass(frozen=True)
class SamplerChoice:
    """A validated sampler + schedule, ready for `make_scheduler` and the infotext.

    `scheduler` is what was asked for ("automatic" stays "automatic"); `schedule` is what
    gets built (automatic resolved, e.g. "karras" for DPM++ 2M; "automatic" only for LCM,
    whose ladder is its own table's, and TCD, which keeps diffusers' timesteps); `label`
    is A1111's infotext "Schedule type" value ("Karras", or "Automatic" when the sampler
    has no default).
    """

    sampler: str
    scheduler: str
    schedule: str
    label: str


def _missing(packages: tuple[str, ...]) -> list[str]:
    """The optional packages among `packages` that are not installed."""
    return [p for p in packages if importlib.util.find_spec(p) is None]


def _unavailable_reason(sampler: _Sampler) -> str | None:
    """Why the sampler cannot run here (a missing optional package), or None."""
    missing = _missing(sampler.requires)
    if not missing:
        return None
    names = ", ".join(missing)
    return f'sampler "{sampler.name}" needs the Python package {names}, which is not installed'


def _scheduler_class(class_name: str) -> type[SchedulerMixin]:
    """A diffusers scheduler class by name, or one of ours as "module:Class"."""
    if ":" in class_name:
        module, name = class_name.split(":")
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    import diffusers

    return getattr(diffusers, class_name)  # type: ignore[no-any-return]


@functools.cache
def _init_params(class_name: str) -> frozenset[str]:
    """Config keys a scheduler class accepts, read from its `__init__`."""
    cls = _scheduler_class(class_name)
    return frozenset(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}


def _accepted(sampler: _Sampler) -> frozenset[str]:
    """Config keys through which the sampler's class can be configured."""
    return _init_params(sampler.class_name) - sampler.ignores


def _class_expresses(sampler: _Sampler, schedule: _Schedule) -> bool:
    """Whether the sampler's own diffusers class can express the schedule."""
    if schedule.name == AUTOMATIC or sampler.own_schedules:
        return True
    return set(schedule.flags) <= _accepted(sampler)


def _expressible(sampler: _Sampler, schedule: _Schedule) -> bool:
    """Whether the sampler can run the schedule at all (its class, or its fallback)."""
    return sampler.fallback is not None or _class_expresses(sampler, schedule)


def _runs_fallback(sampler: _Sampler, schedule_name: str) -> bool:
    """Whether `schedule_name` runs on the sampler's A1111-loop fallback class."""
    schedule = _SCHEDULE_BY_NAME[schedule_name]
    return sampler.fallback is not None and not _class_expresses(sampler, schedule)


def _schedules_for(sampler: _Sampler) -> list[_Schedule]:
    """Schedules valid with `sampler`, in A1111's order (optional packages present)."""
    return [s for s in _SCHEDULES if _expressible(sampler, s) and not _missing(s.requires)]


def schedulers_for(sampler_name: str) -> list[str]:
    """Schedule type names usable with the sampler, "automatic" first.

    Example: `schedulers_for("Euler a")` -> `["automatic", "uniform", "sgm_uniform", ...]`.
    """
    sampler = _SAMPLER_BY_NAME[_canonical_sampler(sampler_name)]
    return [s.name for s in _schedules_for(sampler)]


def _canonical_sampler(name: str) -> str:
    """Canonical sampler name for a name or alias; raises listing the valid ones."""
    key = name.strip().casefold()
    found = _SAMPLER_LOOKUP.get(key)
    if found is not None:
        return found
    listed = ", ".join(SAMPLER_NAMES)
    if key in _UNSUPPORTED_SAMPLERS:
        raise InvalidRequestError(
            f'Sampler "{_UNSUPPORTED_SAMPLERS[key]}" has no diffusers equivalent and is not '
            f"available; choose one of: {listed}",
            field="sampler_name",
        )
    raise InvalidRequestError(
        f'Unknown sampler "{name}"; choose one of: {listed}', field="sampler_name"
    )


def _canonical_schedule(name: str) -> str:
    """Canonical schedule name for a name, label or alias; raises listing the valid ones."""
    key = name.strip().casefold()
    found = _SCHEDULE_LOOKUP.get(key)
    if found is not None:
        return found
    listed = ", ".join(SCHEDULER_LABELS)
    for unsupported, label in _UNSUPPORTED_SCHEDULES.items():
        if key in (unsupported, label.casefold()):
            raise InvalidRequestError(
                f'Schedule type "{label}" cannot be expressed with diffusers schedulers; '
                f"choose one of: {listed}",
                field="scheduler",
            )
    raise InvalidRequestError(
        f'Unknown schedule type "{name}"; choose one of: {listed}', field="scheduler"
    )


def split_combined_name(name: str) -> tuple[str, str | None]:
    """Split an old combined sampler name into (sampler, schedule), as A1111 >= 1.9 does.

    "DPM++ 2M Karras" -> ("DPM++ 2M", "karras"); "k_dpmpp_2m_ka" -> ("DPM++ 2M", "karras");
    "Euler a" -> ("Euler a", None). Matching ignores case. A known sampler is returned by
    its canonical name; an unknown remainder is returned as given, for the caller's error.
    A1111 strips a schedule suffix whatever precedes it; so does this.
    """
    text = name.strip()
    key = text.casefold()
    if key in _SAMPLER_LOOKUP:
        return _SAMPLER_LOOKUP[key], None
    if key in _LEGACY_ALIASES:
        return _LEGACY_ALIASES[key]
    for suffix, schedule in _SCHEDULE_SUFFIXES:
        if key.endswith(" " + suffix.casefold()):
            head = text[: -(len(suffix) + 1)].strip()
            return _SAMPLER_LOOKUP.get(head.casefold(), head), schedule
    return text, None


def resolve_sampler(name: str | None, scheduler: str | None = None) -> SamplerChoice:
    """Validate a sampler and schedule type from any front end.

    Args:
        name: A1111 sampler name, alias or old combined name (any case); None or "" means
            "Euler", A1111's API default.
        scheduler: A1111 schedule name or label (any case); None or "" means automatic. A
            schedule suffix in `name` wins over this, as in A1111.

    Returns:
        The canonical choice, e.g. `resolve_sampler("DPM++ 2M Karras", None)` ->
        `SamplerChoice("DPM++ 2M", "karras", "karras", "Karras")`.

    Raises:
        InvalidRequestError: unknown sampler (field "sampler_name"), unknown schedule or
            one the sampler's diffusers class cannot do (field "scheduler"), or a missing
            optional package; the message lists what is valid.
    """
    # 1. Sampler name, possibly with a schedule suffix.
    sampler_name, suffix = split_combined_name((name or "").strip() or API_DEFAULT_SAMPLER)
    sampler = _SAMPLER_BY_NAME[_canonical_sampler(sampler_name)]
    reason = _unavailable_reason(sampler)
    if reason is not None:
        available = ", ".join(s.name for s in _SAMPLERS if _unavailable_reason(s) is None)
        raise InvalidRequestError(f"The {reason}; choose one of: {available}", field="sampler_name")

    # 2. Schedule: the suffix wins over the separate field.
    requested = suffix if suffix is not None else ((scheduler or "").strip() or AUTOMATIC)
    schedule = _SCHEDULE_BY_NAME[_canonical_schedule(requested)]
    valid = _schedules_for(sampler)
    if schedule not in valid:
        missing = _missing(schedule.requires)
        why = (
            f"needs the Python package {', '.join(missing)}, which is not installed"
            if missing and _expressible(sampler, schedule)
            else f'is not supported with sampler "{sampler.name}"'
        )
        raise InvalidRequestError(
            f'Schedule type "{schedule.label}" {why}; choose one of: '
            + ", ".join(s.label for s in valid),
            field="scheduler",
        )

    # 3. What automatic builds, and what A1111 writes as "Schedule type".
    if schedule.name == AUTOMATIC:
        built = sampler.automatic or AUTOMATIC
        default = sampler.a1111_default
        label = _SCHEDULE_BY_NAME[default].label if default else schedule.label
    else:
        built, label = schedule.name, schedule.label
    return SamplerChoice(sampler=sampler.name, scheduler=schedule.name, schedule=built, label=label)


def scheduler_config(
    choice: SamplerChoice, base_scheduler_config: Mapping[str, Any]
) -> dict[str, Any]:
    """The config `make_scheduler` builds from: model keys, then sampler, then schedule."""
    sampler = _SAMPLER_BY_NAME[choice.sampler]
    config: dict[str, Any] = {
        k: v for k, v in base_scheduler_config.items() if k in _MODEL_CONFIG_KEYS
    }
    if _runs_fallback(sampler, choice.schedule):
        assert sampler.fallback is not None
        config["schedule"] = choice.schedule
        return {k: v for k, v in config.items() if k in _init_params(sampler.fallback)}
    accepted = _accepted(sampler)
    config.update(sampler.kwargs)
    if sampler.own_schedules:
        config["schedule"] = choice.schedule
    else:
        schedule = _SCHEDULE_BY_NAME[choice.schedule]
        config.update(schedule.extras)
        config.update(schedule.flags)
    return {k: v for k, v in config.items() if k in accepted}


def make_scheduler(
    choice: SamplerChoice, base_scheduler_config: Mapping[str, Any]
) -> SchedulerMixin:
    """Build the diffusers scheduler for `choice` from the model's scheduler config.

    Args:
        choice: from `resolve_sampler`.
        base_scheduler_config: the loaded pipeline's `pipe.scheduler.config`; its model
            keys (betas, `prediction_type`, `num_train_timesteps`, `steps_offset`, ...) are
            kept, its solver and schedule keys are replaced.

    Returns:
        A fresh scheduler, e.g. `DPMSolverMultistepScheduler(use_karras_sigmas=True, ...)`
        for `resolve_sampler("DPM++ 2M", None)`.
    """
    checked = resolve_sampler(choice.sampler, choice.scheduler)
    if checked != choice:
        raise InvalidRequestError(f"Inconsistent sampler choice {choice!r}", field="scheduler")
    sampler = _SAMPLER_BY_NAME[choice.sampler]
    fallback = _runs_fallback(sampler, choice.schedule) and sampler.fallback
    cls = _scheduler_class(fallback or sampler.class_name)
    return cls.from_config(scheduler_config(choice, base_scheduler_config))


_GENERATOR_NOISE = frozenset({"LCM", "TCD"})
"""Samplers without A1111's `uses_ensd` flag whose loops still draw later noise from the
per-item generators (A1111's `sample_lcm` through k-diffusion's `randn_like`), so ENSD's
re-seed changes them too."""


def uses_ensd(sampler_name: str) -> bool:
    """Whether A1111's eta noise seed delta changes this sampler's images: A1111 re-seeds
    the per-item generators whatever the sampler (`ImageRNG.first`), so it shows in the
    samplers that draw later noise from them: those whose options say `uses_ensd` (the
    ancestral ones) and LCM and TCD. Brownian-tree SDE samplers seed from the seeds
    themselves, and the others draw nothing. A1111 writes `ENSD` only for `uses_ensd`
    samplers; we also write it for LCM and TCD, so their infotexts replay the image."""
    sampler = _SAMPLER_BY_NAME.get(sampler_name)
    if sampler is None:
        return False
    return sampler.options.get("uses_ensd") == "True" or sampler.name in _GENERATOR_NOISE


def step_eta(choice: SamplerChoice) -> float:
    """The `eta` the sampler's `step` is called with (where it takes one): 0 (A1111's DDIM
    default) except TCD's gamma 0.3."""
    return _SAMPLER_BY_NAME[choice.sampler].eta


_LADDER_ROUTES: Mapping[str, tuple[str, frozenset[str]]] = {
    "EulerDiscreteScheduler": ("sigmas", frozenset({"sgm_uniform", "simple"})),
    "HeunDiscreteScheduler": ("timesteps", frozenset({"simple"})),
    "DPMSolverMultistepScheduler": ("timesteps", frozenset({"simple"})),
}
"""Classes that take A1111's exact ladder for a schedule diffusers' spacing only
approximates: as sigmas (SGM Uniform's timesteps are fractional), or as integer timesteps
(Simple's are whole). The other classes use "trailing" spacing, within one training
timestep of A1111's (tests/test_fewstep_samplers.py measures it)."""

_STEP_LIMITED = {"TCDScheduler": "original_inference_steps"}
"""Classes that cannot take more steps than their distillation grid has."""


def set_timesteps(scheduler: Any, choice: SamplerChoice, steps: int, device: Any = None) -> None:
    """`scheduler.set_timesteps(steps)`, with A1111's exact SGM Uniform / Simple ladder
    where the class can take it (`_LADDER_ROUTES`).

    Args:
        scheduler: from `make_scheduler(choice, ...)`.
        choice: the validated sampler and schedule.
        steps: the full schedule's length (img2img and hires fix slice its tail).
        device: where the timesteps go.

    Raises:
        InvalidRequestError: more steps than the sampler can take (TCD: 50), field "steps".
    """
    class_name = type(scheduler).__name__
    limit_key = _STEP_LIMITED.get(class_name)
    if limit_key is not None and steps > int(scheduler.config[limit_key]):
        raise InvalidRequestError(
            f'Sampler "{choice.sampler}" takes at most {scheduler.config[limit_key]} steps '
            f"(its distillation grid); {steps} were asked for",
            field="steps",
        )
    route, schedules = _LADDER_ROUTES.get(class_name, ("", frozenset()))
    if choice.schedule in schedules:
        from pipelines.schedules import SigmaTable, a1111_sigmas, alphas_cumprod_from_config

        table = SigmaTable(alphas_cumprod_from_config(scheduler.config))
        ladder = a1111_sigmas(choice.schedule, steps, table)
        if route == "sigmas":
            scheduler.set_timesteps(sigmas=ladder.tolist(), device=device)
        else:
            timesteps = [int(round(float(t))) for t in table.sigma_to_t(ladder[:-1])]
            scheduler.set_timesteps(timesteps=timesteps, device=device)
        return
    scheduler.set_timesteps(steps, device=device)


def check_steps(choice: SamplerChoice, steps: int) -> None:
    """Refuse, before any work, more steps than the sampler can take (TCD: 50)."""
    sampler = _SAMPLER_BY_NAME[choice.sampler]
    limit_key = _STEP_LIMITED.get(sampler.class_name)
    if limit_key is None:
        return
    limit = (
        inspect.signature(_scheduler_class(sampler.class_name).__init__)
        .parameters[limit_key]
        .default
    )
    if steps > limit:
        raise InvalidRequestError(
            f'Sampler "{choice.sampler}" takes at most {limit} steps (its distillation grid); '
            f"{steps} were asked for",
            field="steps",
        )


def list_samplers() -> list[dict[str, object]]:
    """`/sdapi/v1/samplers`: `[{name, aliases, options}]`, installed samplers only."""
    return [
        {"name": s.name, "aliases": list(s.aliases), "options": dict(s.options)}
        for s in _SAMPLERS
        if _unavailable_reason(s) is None
    ]


def list_schedulers() -> list[dict[str, object]]:
    """`/sdapi/v1/schedulers`: `[{name, label, aliases, default_rho, need_inner_model}]`."""
    return [
        {
            "name": s.name,
            "label": s.label,
            "aliases": list(s.aliases) if s.aliases is not None else None,
            "default_rho": s.default_rho,
            "need_inner_model": s.need_inner_model,
        }
        for s in _SCHEDULES
        if not _missing(s.requires)
    ]
