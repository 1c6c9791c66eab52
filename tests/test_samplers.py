"""A1111 sampler/schedule names -> diffusers schedulers (pipelines/samplers.py)."""

from __future__ import annotations

import inspect

import pytest
import torch

from pipelines.errors import InvalidRequestError
from pipelines.samplers import (
    SAMPLER_NAMES,
    SCHEDULER_LABELS,
    SCHEDULER_NAMES,
    SamplerChoice,
    list_samplers,
    list_schedulers,
    make_scheduler,
    resolve_sampler,
    schedulers_for,
    split_combined_name,
)

# diffusers' schedulers hand torch tensors to numpy (`np.array(t)`, `np.maximum(t, ...)`),
# and torch's `Tensor.__array__`/`__array_wrap__` predate numpy 2's signatures, so numpy
# warns during `set_timesteps`. Harmless, and not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings(
        "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
    ),
    pytest.mark.filterwarnings(
        "ignore:__array_wrap__ must accept context and return_scalar:DeprecationWarning"
    ),
    # torchsde's Brownian tree is built from float64 sigma bounds and queried with float32
    # sigmas, so the ends miss by ~1e-7 and it warns; the noise is still correct.
    pytest.mark.filterwarnings("ignore:Should have ta>=t0 but got:UserWarning"),
    pytest.mark.filterwarnings("ignore:Should have tb<=t1 but got:UserWarning"),
]

# What `pipe.scheduler.config` holds for a stock SD 1.x checkpoint (PNDM, leading spacing).
SD1_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "clip_sample": False,
    "timestep_spacing": "leading",
}

# A repo that ships its own solver choice: none of it may leak into another sampler.
OPINIONATED_CONFIG = {
    **SD1_CONFIG,
    "_class_name": "DPMSolverMultistepScheduler",
    "use_karras_sigmas": True,
    "algorithm_type": "dpmsolver",
    "solver_order": 3,
    "timestep_spacing": "trailing",
    "final_sigmas_type": "sigma_min",
}

COMBOS = [(s, sch) for s in SAMPLER_NAMES for sch in schedulers_for(s)]

EXPECTED_CLASS = {
    "DPM++ 2M": "DPMSolverMultistepScheduler",
    "DPM++ SDE": "DPMSolverSDEScheduler",
    "DPM++ 2M SDE": "DPMSolverMultistepScheduler",
    "DPM++ 2M SDE Heun": "DPMSolverMultistepScheduler",
    "DPM++ 2S a": "A1111DPMPP2SAncestralScheduler",
    "DPM++ 3M SDE": "DPMSolverMultistepScheduler",
    "Euler a": "EulerAncestralDiscreteScheduler",
    "Euler": "EulerDiscreteScheduler",
    "LMS": "LMSDiscreteScheduler",
    "Heun": "HeunDiscreteScheduler",
    "DPM2": "KDPM2DiscreteScheduler",
    "DPM2 a": "KDPM2AncestralDiscreteScheduler",
    "DDIM": "DDIMScheduler",
    "PLMS": "PNDMScheduler",
    "UniPC": "UniPCMultistepScheduler",
    "LCM": "A1111LCMScheduler",
    "TCD": "TCDScheduler",
}


def _sigmas(scheduler) -> torch.Tensor:
    return torch.as_tensor(scheduler.sigmas, dtype=torch.float64)


def test_every_required_sampler_is_known():
    assert set(EXPECTED_CLASS) == set(SAMPLER_NAMES)


A1111_LOOP = {
    ("Euler a", schedule): "A1111EulerAncestralScheduler"
    for schedule in ("karras", "exponential", "beta")
}
"""Combinations diffusers' class cannot express, run on A1111's own loop."""


@pytest.mark.parametrize(("sampler", "schedule"), COMBOS)
def test_every_supported_combination_builds_and_steps(sampler, schedule):
    scheduler = make_scheduler(resolve_sampler(sampler, schedule), SD1_CONFIG)
    scheduler.set_timesteps(4)
    expected = EXPECTED_CLASS[sampler]
    if (sampler, schedule) in A1111_LOOP:
        expected = A1111_LOOP[sampler, schedule]
    assert type(scheduler).__name__ == expected
    timesteps = torch.as_tensor(scheduler.timesteps, dtype=torch.float64)
    assert len(timesteps) >= 4
    assert torch.isfinite(timesteps).all()
    assert (timesteps >= 0).all() and (timesteps < 1000).all()
    if hasattr(scheduler, "sigmas"):
        assert torch.isfinite(_sigmas(scheduler)).all()


@pytest.mark.parametrize(("sampler", "schedule"), COMBOS)
def test_every_supported_combination_denoises(sampler, schedule):
    """A few steps with a stand-in model: every solver path runs and stays finite."""
    scheduler = make_scheduler(resolve_sampler(sampler, schedule), SD1_CONFIG)
    scheduler.set_timesteps(4)
    generator = torch.Generator().manual_seed(0)
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if takes_generator else {}
    sample = torch.randn(1, 4, 8, 8, generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(sample, t)
        noise_prediction = 0.5 * model_input  # shape (1, 4, 8, 8), like a UNet's output
        sample = scheduler.step(noise_prediction, t, sample, **extra).prev_sample
    assert torch.isfinite(sample).all()


@pytest.mark.parametrize("sampler", [s for s in SAMPLER_NAMES if "karras" in schedulers_for(s)])
def test_karras_changes_sigmas(sampler):
    karras = make_scheduler(resolve_sampler(sampler, "karras"), SD1_CONFIG)
    karras.set_timesteps(10)
    own = "schedule" in karras.config  # LCM: A1111's ladders computed by the class itself
    assert karras.config.schedule == "karras" if own else karras.config.use_karras_sigmas
    others = [s for s in ("uniform", "exponential") if s in schedulers_for(sampler)]
    assert others
    for other in others:
        plain = make_scheduler(resolve_sampler(sampler, other), SD1_CONFIG)
        plain.set_timesteps(10)
        assert own or not plain.config.use_karras_sigmas
        assert not torch.allclose(_sigmas(karras), _sigmas(plain))


@pytest.mark.parametrize(
    ("schedule", "flags"),
    [
        ("uniform", {"timestep_spacing": "linspace"}),
        ("karras", {"use_karras_sigmas": True, "timestep_spacing": "linspace"}),
        ("exponential", {"use_exponential_sigmas": True}),
        ("beta", {"use_beta_sigmas": True}),
        ("sgm_uniform", {"timestep_spacing": "trailing"}),
        ("simple", {"timestep_spacing": "trailing"}),
        ("ddim", {"timestep_spacing": "leading", "steps_offset": 1}),
    ],
)
def test_schedule_sets_diffusers_flags(schedule, flags):
    scheduler = make_scheduler(resolve_sampler("Euler", schedule), SD1_CONFIG)
    for key, value in flags.items():
        assert scheduler.config[key] == value


@pytest.mark.parametrize(
    ("sampler", "kwargs"),
    [
        ("DPM++ 2M", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
        ("DPM++ 2M SDE", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
        ("DPM++ 2M SDE Heun", {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}),
        ("DPM++ 3M SDE", {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
        ("DPM++ 2S a", {"schedule": "karras", "eta": 1.0, "s_noise": 1.0}),
        ("PLMS", {"skip_prk_steps": True}),
        ("UniPC", {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"}),
    ],
)
def test_sampler_kwargs(sampler, kwargs):
    scheduler = make_scheduler(resolve_sampler(sampler, None), SD1_CONFIG)
    for key, value in kwargs.items():
        assert scheduler.config[key] == value


def test_model_config_is_kept_and_solver_config_is_not():
    v_config = {**OPINIONATED_CONFIG, "prediction_type": "v_prediction", "beta_end": 0.02}
    for sampler in SAMPLER_NAMES:
        scheduler = make_scheduler(resolve_sampler(sampler, None), v_config)
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.beta_end == 0.02
        assert scheduler.config.beta_schedule == "scaled_linear"
    euler = make_scheduler(resolve_sampler("Euler", "uniform"), OPINIONATED_CONFIG)
    assert euler.config.use_karras_sigmas is False
    assert euler.config.timestep_spacing == "linspace"
    dpm = make_scheduler(resolve_sampler("DPM++ 2M", "exponential"), OPINIONATED_CONFIG)
    assert dpm.config.use_karras_sigmas is False
    assert dpm.config.use_exponential_sigmas is True
    assert dpm.config.algorithm_type == "dpmsolver++"
    assert dpm.config.solver_order == 2
    assert dpm.config.final_sigmas_type == "zero"


def test_automatic_karras_starts_at_the_models_largest_sigma():
    """A1111's Karras ladder runs from the model's sigma_max (~14.6 for SD1) to sigma_min."""
    scheduler = make_scheduler(resolve_sampler("DPM++ 2M", None), SD1_CONFIG)
    scheduler.set_timesteps(20)
    sigmas = _sigmas(scheduler)
    assert sigmas[0] == pytest.approx(14.6146, rel=1e-3)
    assert sigmas[-2] == pytest.approx(0.0292, rel=1e-2)
    assert sigmas[-1] == 0


@pytest.mark.parametrize(
    ("name", "scheduler", "expected"),
    [
        (None, None, SamplerChoice("Euler", "automatic", "uniform", "Automatic")),
        ("", "", SamplerChoice("Euler", "automatic", "uniform", "Automatic")),
        ("  ", " ", SamplerChoice("Euler", "automatic", "uniform", "Automatic")),
        ("DPM++ 2M", None, SamplerChoice("DPM++ 2M", "automatic", "karras", "Karras")),
        ("DPM++ 2M", "Automatic", SamplerChoice("DPM++ 2M", "automatic", "karras", "Karras")),
        ("DPM++ 2M", "karras", SamplerChoice("DPM++ 2M", "karras", "karras", "Karras")),
        ("DPM++ 2M", "Uniform", SamplerChoice("DPM++ 2M", "uniform", "uniform", "Uniform")),
        ("DPM++ 2M Karras", None, SamplerChoice("DPM++ 2M", "karras", "karras", "Karras")),
        (
            "DPM++ 2M Karras",
            "exponential",
            SamplerChoice("DPM++ 2M", "karras", "karras", "Karras"),
        ),
        (
            "DPM++ 2M SDE",
            None,
            SamplerChoice("DPM++ 2M SDE", "automatic", "exponential", "Exponential"),
        ),
        ("DPM2 a", None, SamplerChoice("DPM2 a", "automatic", "karras", "Karras")),
        (
            "Euler a",
            "SGM Uniform",
            SamplerChoice("Euler a", "sgm_uniform", "sgm_uniform", "SGM Uniform"),
        ),
        (
            "euler a",
            "sgmuniform",
            SamplerChoice("Euler a", "sgm_uniform", "sgm_uniform", "SGM Uniform"),
        ),
        ("DDIM", None, SamplerChoice("DDIM", "automatic", "ddim", "Automatic")),
        ("PLMS", None, SamplerChoice("PLMS", "automatic", "ddim", "Automatic")),
        ("UniPC", None, SamplerChoice("UniPC", "automatic", "uniform", "Automatic")),
        ("LCM", None, SamplerChoice("LCM", "automatic", "automatic", "Automatic")),
        ("Euler", "BETA", SamplerChoice("Euler", "beta", "beta", "Beta")),
    ],
)
def test_resolve(name, scheduler, expected):
    assert resolve_sampler(name, scheduler) == expected


@pytest.mark.parametrize(
    ("alias", "sampler"),
    [
        ("k_euler", "Euler"),
        ("K_EULER_A", "Euler a"),
        ("k_euler_ancestral", "Euler a"),
        ("euler_ancestral", "Euler a"),
        ("k_lms", "LMS"),
        ("k_heun", "Heun"),
        ("k_dpm_2", "DPM2"),
        ("k_dpm_2_a", "DPM2 a"),
        ("k_dpmpp_2s_a", "DPM++ 2S a"),
        ("k_dpmpp_2m", "DPM++ 2M"),
        ("k_dpmpp_sde", "DPM++ SDE"),
        ("k_dpmpp_2m_sde", "DPM++ 2M SDE"),
        ("k_dpmpp_2m_sde_heun", "DPM++ 2M SDE Heun"),
        ("k_dpmpp_3m_sde", "DPM++ 3M SDE"),
        ("ddim", "DDIM"),
        ("plms", "PLMS"),
        ("unipc", "UniPC"),
        ("k_lcm", "LCM"),
        ("dpm++ 2m", "DPM++ 2M"),
        ("  Euler a  ", "Euler a"),
    ],
)
def test_aliases(alias, sampler):
    assert resolve_sampler(alias, None).sampler == sampler


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("DPM++ 2M", ("DPM++ 2M", None)),
        ("DPM++ 2M Karras", ("DPM++ 2M", "karras")),
        ("dpm++ 2m karras", ("DPM++ 2M", "karras")),
        ("DPM++ SDE Karras", ("DPM++ SDE", "karras")),
        ("DPM++ 2M SDE Karras", ("DPM++ 2M SDE", "karras")),
        ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "exponential")),
        ("DPM++ 2M SDE Heun Karras", ("DPM++ 2M SDE Heun", "karras")),
        ("DPM++ 2M SDE Heun Exponential", ("DPM++ 2M SDE Heun", "exponential")),
        ("DPM++ 3M SDE Karras", ("DPM++ 3M SDE", "karras")),
        ("DPM++ 2S a Karras", ("DPM++ 2S a", "karras")),
        ("DPM2 Karras", ("DPM2", "karras")),
        ("DPM2 a Karras", ("DPM2 a", "karras")),
        ("LMS Karras", ("LMS", "karras")),
        ("Euler a Karras", ("Euler a", "karras")),
        ("Euler SGM Uniform", ("Euler", "sgm_uniform")),
        ("Euler sgm_uniform", ("Euler", "sgm_uniform")),
        ("Euler Uniform", ("Euler", "uniform")),
        ("Euler Automatic", ("Euler", "automatic")),
        ("Euler Polyexponential", ("Euler", "polyexponential")),
        ("k_dpmpp_2m_ka", ("DPM++ 2M", "karras")),
        ("k_dpmpp_sde_ka", ("DPM++ SDE", "karras")),
        ("k_dpmpp_3m_sde_exp", ("DPM++ 3M SDE", "exponential")),
        ("Foo Karras", ("Foo", "karras")),
        ("Foo", ("Foo", None)),
        ("DDIM", ("DDIM", None)),
    ],
)
def test_split_combined_name(name, expected):
    assert split_combined_name(name) == expected


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(InvalidRequestError) as err:
        resolve_sampler("Eulerr", None)
    assert err.value.field == "sampler_name"
    assert err.value.status == 422
    assert "Eulerr" in err.value.message
    for name in ("Euler a", "DPM++ 2M", "UniPC"):
        assert name in err.value.message


@pytest.mark.parametrize("name", ["DPM fast", "DPM adaptive", "Restart", "k_dpm_fast"])
def test_a1111_samplers_without_diffusers_equivalent_are_named(name):
    with pytest.raises(InvalidRequestError) as err:
        resolve_sampler(name, None)
    assert err.value.field == "sampler_name"
    assert "no diffusers equivalent" in err.value.message


def test_unknown_scheduler_lists_valid_names():
    with pytest.raises(InvalidRequestError) as err:
        resolve_sampler("Euler", "zigzag")
    assert err.value.field == "scheduler"
    assert "zigzag" in err.value.message
    assert "Karras" in err.value.message and "SGM Uniform" in err.value.message


@pytest.mark.parametrize("schedule", ["polyexponential", "KL Optimal", "align_your_steps"])
def test_a1111_schedules_diffusers_cannot_express_are_named(schedule):
    with pytest.raises(InvalidRequestError) as err:
        resolve_sampler("Euler", schedule)
    assert err.value.field == "scheduler"
    assert "cannot be expressed" in err.value.message


@pytest.mark.parametrize(
    ("sampler", "schedule"),
    [
        ("DDIM", "Karras"),
        ("DDIM Karras", None),
        ("PLMS", "beta"),
        ("TCD", "uniform"),
    ],
)
def test_unsupported_combinations_are_rejected(sampler, schedule):
    with pytest.raises(InvalidRequestError) as err:
        resolve_sampler(sampler, schedule)
    assert err.value.field == "scheduler"
    canonical = split_combined_name(sampler)[0]
    valid = [
        next(x["label"] for x in list_schedulers() if x["name"] == s)
        for s in schedulers_for(canonical)
    ]
    assert err.value.message.endswith("choose one of: " + ", ".join(valid))
    assert f'sampler "{canonical}"' in err.value.message


def test_make_scheduler_rejects_a_hand_made_invalid_choice():
    with pytest.raises(InvalidRequestError):
        make_scheduler(SamplerChoice("DDIM", "karras", "karras", "Karras"), SD1_CONFIG)


def test_list_samplers_has_a1111_shape():
    listed = list_samplers()
    assert [s["name"] for s in listed] == list(SAMPLER_NAMES)
    by_name = {s["name"]: s for s in listed}
    assert by_name["DPM++ 2M"] == {
        "name": "DPM++ 2M",
        "aliases": ["k_dpmpp_2m", "dpmpp_2m"],
        "options": {"scheduler": "karras"},
    }
    assert by_name["Euler a"]["aliases"][:2] == ["k_euler_a", "k_euler_ancestral"]
    for sampler in listed:
        assert set(sampler) == {"name", "aliases", "options"}
        assert all(isinstance(v, str) for v in sampler["options"].values())
        assert "Karras" not in sampler["name"]


def test_list_schedulers_has_a1111_shape():
    listed = list_schedulers()
    assert [s["name"] for s in listed] == list(SCHEDULER_NAMES)
    assert [s["label"] for s in listed] == list(SCHEDULER_LABELS)
    assert listed[0] == {
        "name": "automatic",
        "label": "Automatic",
        "aliases": None,
        "default_rho": -1.0,
        "need_inner_model": False,
    }
    karras = next(s for s in listed if s["name"] == "karras")
    assert karras["default_rho"] == 7.0
    sgm = next(s for s in listed if s["name"] == "sgm_uniform")
    assert sgm["aliases"] == ["SGMUniform"]


def test_every_sampler_supports_automatic():
    for sampler in SAMPLER_NAMES:
        assert schedulers_for(sampler)[0] == "automatic"


def test_a_missing_optional_package_is_a_reason_not_a_crash():
    from pipelines.samplers import _Sampler, _unavailable_reason

    needy = _Sampler("Needy", "EulerDiscreteScheduler", (), requires=("no_such_package_zz",))
    reason = _unavailable_reason(needy)
    assert reason is not None and "no_such_package_zz" in reason and "Needy" in reason
