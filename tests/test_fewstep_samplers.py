"""A1111 1.10's LCM sampler, its SGM Uniform and Simple schedules, and TCD.

Each is checked against an independent re-implementation of A1111's code written here
from `modules/sd_samplers_lcm.py` and `modules/sd_schedulers.py` (k-diffusion's
`DiscreteSchedule` maths in float64 numpy), not against the engine's own helpers: the
LCM loop on the tiny SD1 must give the engine's pixels within 1/255.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.errors import InvalidRequestError
from pipelines.loading import LoadedModel
from pipelines.model_manager import ActiveModel
from pipelines.samplers import (
    SAMPLER_NAMES,
    list_samplers,
    make_scheduler,
    resolve_sampler,
    schedulers_for,
    set_timesteps,
    step_eta,
)
from pipelines.schema import GenerationRequest
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_samplers import SD1_CONFIG

# ------------------------------------------------------- A1111, re-implemented here


def ldm_alphas_cumprod(config: dict) -> np.ndarray:
    """LDM's `make_beta_schedule("linear")` (diffusers' scaled_linear), float64 -> float32."""
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000) ** 2
    return np.cumprod(1.0 - betas).astype(np.float32)


class Discrete:
    """k-diffusion `DiscreteSchedule` over a sigma table (float64 maths)."""

    def __init__(self, sigmas: np.ndarray) -> None:
        self.sigmas = sigmas.astype(np.float64)
        self.log_sigmas = np.log(self.sigmas)

    def sigma_to_t(self, sigma: float) -> float:
        log_sigma = math.log(sigma)
        low = int(np.clip(np.sum(log_sigma - self.log_sigmas >= 0) - 1, 0, len(self.sigmas) - 2))
        lo, hi = self.log_sigmas[low], self.log_sigmas[low + 1]
        w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
        return (1 - w) * low + w * (low + 1)

    def t_to_sigma(self, t: float) -> float:
        low, high, w = math.floor(t), math.ceil(t), t - math.floor(t)
        return math.exp((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high])


class LcmDiscrete(Discrete):
    """A1111's `LCMCompVisDenoiser` table: 50 sigmas at 20j + 19, snapping sigma_to_t."""

    def __init__(self, alphas: np.ndarray) -> None:
        valid = np.array([alphas[20 * j + 19] for j in range(50)], dtype=np.float32)
        super().__init__(((1 - valid) / valid) ** 0.5)

    def sigma_to_t(self, sigma: float) -> float:
        return float(np.abs(math.log(sigma) - self.log_sigmas).argmin() * 20 + 19)

    def t_to_sigma(self, t: float) -> float:
        return super().t_to_sigma(min(max((t - 19) / 20, 0.0), 49.0))


def a1111_ladder(schedule: str, n: int, table: Discrete) -> list[float]:
    """`sd_schedulers.py` (automatic = the table's own `get_sigmas`)."""
    s_min, s_max = table.sigmas[0], table.sigmas[-1]
    start, end = table.sigma_to_t(s_max), table.sigma_to_t(s_min)
    if schedule in ("automatic", "uniform", "normal"):
        return [table.t_to_sigma(t) for t in np.linspace(start, end, n)] + [0.0]
    if schedule == "sgm_uniform":
        return [table.t_to_sigma(t) for t in np.linspace(start, end, n + 1)[:-1]] + [0.0]
    if schedule == "simple":
        stride = len(table.sigmas) / n
        return [table.sigmas[-(1 + int(x * stride))] for x in range(n)] + [0.0]
    if schedule == "karras":
        ramp = np.linspace(0, 1, n)
        lo, hi = s_min ** (1 / 7), s_max ** (1 / 7)
        return list((hi + ramp * (lo - hi)) ** 7) + [0.0]
    if schedule == "exponential":
        return list(np.exp(np.linspace(math.log(s_max), math.log(s_min), n))) + [0.0]
    raise AssertionError(schedule)


# ---------------------------------------------------- SGM Uniform and Simple ladders

ALPHAS = ldm_alphas_cumprod(SD1_CONFIG)
TABLE = Discrete(((1 - ALPHAS) / ALPHAS) ** 0.5)
EXACT = {
    ("Euler", "sgm_uniform"),
    ("Euler", "simple"),
    ("Heun", "simple"),
    ("DPM++ 2M", "simple"),
    ("DPM++ 2M SDE", "simple"),
    ("DPM++ 2M SDE Heun", "simple"),
    ("DPM++ 3M SDE", "simple"),
    ("DPM++ 2S a", "sgm_uniform"),  # A1111's own loop, over A1111's ladder
    ("DPM++ 2S a", "simple"),
}
"""Sampler x schedule whose diffusers class takes A1111's exact ladder."""
LADDER_CASES = [
    (sampler, schedule)
    for sampler in SAMPLER_NAMES
    for schedule in ("sgm_uniform", "simple")
    if sampler != "LCM" and schedule in schedulers_for(sampler)
]


def test_a1111_sgm_uniform_and_simple_differ_from_trailing_spacing():
    """Why the ladders matter: diffusers' "trailing" is not A1111's for these step counts."""
    sgm = [TABLE.sigma_to_t(s) for s in a1111_ladder("sgm_uniform", 4, TABLE)[:-1]]
    assert sgm == pytest.approx([999, 749.25, 499.5, 249.75], abs=1e-3)
    simple = [TABLE.sigma_to_t(s) for s in a1111_ladder("simple", 3, TABLE)[:-1]]
    assert simple == pytest.approx([999, 666, 333], abs=1e-3)  # trailing: 999, 666, 332


@pytest.mark.parametrize(("sampler", "schedule"), LADDER_CASES)
@pytest.mark.parametrize("steps", [3, 4, 7, 20])
def test_sgm_uniform_and_simple_timesteps_match_a1111(sampler, schedule, steps):
    """Every A1111 timestep is one the scheduler steps at: exactly where the class takes
    a ladder (`EXACT`), else within one training timestep (diffusers' rounding)."""
    choice = resolve_sampler(sampler, schedule)
    scheduler = make_scheduler(choice, SD1_CONFIG)
    set_timesteps(scheduler, choice, steps)
    ours = torch.as_tensor(scheduler.timesteps, dtype=torch.float64)
    expected = [TABLE.sigma_to_t(s) for s in a1111_ladder(schedule, steps, TABLE)[:-1]]
    worst = max(float((ours - t).abs().min()) for t in expected)
    assert worst <= (0.01 if (sampler, schedule) in EXACT else 1.0), worst
    if (sampler, schedule) in EXACT and hasattr(scheduler, "sigmas"):
        ladder = torch.as_tensor(scheduler.sigmas, dtype=torch.float64)
        for sigma in a1111_ladder(schedule, steps, TABLE)[:-1]:
            assert float((ladder - sigma).abs().min()) <= 1e-4 * sigma


def test_euler_sgm_uniform_is_a1111s_ladder_exactly():
    choice = resolve_sampler("Euler", "sgm_uniform")
    scheduler = make_scheduler(choice, SD1_CONFIG)
    set_timesteps(scheduler, choice, 4)
    expected = torch.tensor(a1111_ladder("sgm_uniform", 4, TABLE), dtype=torch.float64)
    assert torch.allclose(scheduler.sigmas.double(), expected, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- LCM: the ladder

LCM_TABLE = LcmDiscrete(ALPHAS)
LCM_SCHEDULES = ["automatic", "uniform", "karras", "exponential", "sgm_uniform", "simple"]


def test_lcm_takes_every_schedule_type_as_a1111():
    assert set(schedulers_for("LCM")) >= set(LCM_SCHEDULES) | {"normal", "ddim"}
    assert resolve_sampler("LCM", "karras").label == "Karras"
    assert resolve_sampler("LCM", None).label == "Automatic"


@pytest.mark.parametrize("schedule", LCM_SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_ladder_and_timesteps_are_a1111s(schedule, steps):
    choice = resolve_sampler("LCM", schedule)
    scheduler = make_scheduler(choice, SD1_CONFIG)
    set_timesteps(scheduler, choice, steps)
    expected = a1111_ladder(schedule, steps, LCM_TABLE)
    assert scheduler.sigmas.double().tolist() == pytest.approx(expected, rel=1e-5)
    timesteps = [LCM_TABLE.sigma_to_t(s) for s in expected[:-1]]
    assert scheduler.timesteps.tolist() == timesteps
    assert float(scheduler.init_noise_sigma) == pytest.approx(expected[0], rel=1e-6)


def test_lcm_four_steps_end_at_timestep_19_unlike_diffusers_lcmscheduler():
    choice = resolve_sampler("LCM", None)
    scheduler = make_scheduler(choice, SD1_CONFIG)
    set_timesteps(scheduler, choice, 4)
    assert scheduler.timesteps.tolist() == [999, 679, 339, 19]


# ------------------------------------------------------ LCM: the loop on a tiny model


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Service:
    data = tmp_path_factory.mktemp("fewstep")
    return build_service(Settings(data_dir=data, ckpt_dirs=(models_dir,), threads=2))


def _request(**fields: object) -> GenerationRequest:
    values = {
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "width": 64,
        "height": 64,
        "checkpoint": "tiny-sd1",
        "seed": 21,
        **fields,
    }
    return GenerationRequest(**values)  # type: ignore[arg-type]


def _model(service: Service) -> ActiveModel:
    service.generate(_request(steps=1))
    model: ActiveModel = service.runner.manager.current  # type: ignore[attr-defined]
    return model


def a1111_sample_lcm(
    model: ActiveModel,
    schedule: str,
    steps: int,
    cfg: float,
    seed: int,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
) -> np.ndarray:
    """A1111's `sample_lcm` with `CFGDenoiserLCM` (CFG on the denoised outputs) and the
    seed's generator for every noise draw, decoded to 8-bit pixels. With `init` latents,
    A1111's `sample_img2img`: the tail `sigmas[steps - t_enc - 1:]` from `init + noise *
    sigma`."""
    pipe = model.pipe
    alphas = ldm_alphas_cumprod(dict(model.scheduler_config))
    table = LcmDiscrete(alphas)
    sigmas = a1111_ladder(schedule, steps, table)
    if init is not None:
        t_enc = int(min(strength, 0.999) * steps)
        sigmas = sigmas[steps - t_enc - 1 :]
    encode = model.encoder.encode
    cond = encode("a lighthouse", clip_skip=1, device="cpu", dtype=torch.float32).embeds
    uncond = encode("fog", clip_skip=1, device="cpu", dtype=torch.float32, negative=True).embeds
    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=generator).double() * sigmas[0]
    if init is not None:
        x = init.double() + x

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = table.sigma_to_t(sigma)
        c_in = 1 / math.sqrt(sigma**2 + 1)
        out = []
        for hidden in (cond, uncond):
            with torch.no_grad():
                eps = pipe.unet(
                    (x * c_in).float(), torch.tensor(int(t)), encoder_hidden_states=hidden
                ).sample.double()
            x0 = x - sigma * eps
            scaled = t * 10.0
            c_skip = 0.25 / (scaled**2 + 0.25)
            c_out = scaled / math.sqrt(scaled**2 + 0.25)
            out.append(c_out * x0 + c_skip * x)
        denoised_cond, denoised_uncond = out
        return denoised_uncond + (denoised_cond - denoised_uncond) * cfg

    for i in range(len(sigmas) - 1):
        x = denoise(x, sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * torch.randn((1, 4, 8, 8), generator=generator).double()
    with torch.no_grad():
        pixels = pipe.vae.decode((x / pipe.vae.config.scaling_factor).float()).sample
    image = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round()
    return image[0].permute(1, 2, 0).numpy().astype(int)


@pytest.mark.parametrize(
    ("schedule", "steps", "cfg"),
    [("automatic", 4, 1.5), ("karras", 3, 2.0), ("sgm_uniform", 4, 1.5), ("simple", 6, 2.0)],
)
def test_lcm_image_equals_a1111s_loop(service: Service, schedule, steps, cfg):
    torch.set_num_threads(2)
    model = _model(service)
    expected = a1111_sample_lcm(model, schedule, steps, cfg, seed=21)
    made = service.generate(
        _request(sampler_name="LCM", scheduler=schedule, steps=steps, cfg_scale=cfg)
    )
    ours = np.asarray(made.images[0]).astype(int)
    assert np.abs(ours - expected).max() <= 1
    other = a1111_sample_lcm(model, schedule, steps, cfg, seed=22)
    assert np.abs(other - expected).max() > 1  # the comparison can tell seeds apart


def test_lcm_without_noise_draws_the_seed_once(service: Service):
    """One step: no noise after the last step, so the image is the first denoise only."""
    model = _model(service)
    expected = a1111_sample_lcm(model, "automatic", 1, 1.0, seed=21)
    made = service.generate(_request(sampler_name="LCM", steps=1, cfg_scale=1.0))
    assert np.abs(np.asarray(made.images[0]).astype(int) - expected).max() <= 1


def test_lcm_checkpoint_gets_its_guidance_embedding(service: Service, monkeypatch):
    """An LCM-distilled UNet (`time_cond_proj_dim`) still receives `timestep_cond` with the
    A1111 LCM sampler, and runs unguided."""
    from pipelines.generation.denoise import DenoiseLoop

    seen: list[object] = []
    original = DenoiseLoop.__call__

    def spy(self, latents, timesteps, on_step, *rest):
        seen.append((self.timestep_cond, self.guided, type(self.scheduler).__name__))
        return original(self, latents, timesteps, on_step, *rest)

    model = _model(service)
    unet = model.pipe.unet
    from diffusers.configuration_utils import FrozenDict

    config = FrozenDict({**unet.config, "time_cond_proj_dim": 8})
    monkeypatch.setattr(unet, "_internal_dict", config)
    projection = torch.nn.Linear(8, unet.time_embedding.linear_1.in_features, bias=False)
    torch.nn.init.zeros_(projection.weight)  # an LCM UNet's guidance projection, zeroed
    monkeypatch.setattr(unet.time_embedding, "cond_proj", projection)
    monkeypatch.setattr(DenoiseLoop, "__call__", spy)
    made = service.generate(_request(sampler_name="LCM", steps=2, cfg_scale=4.0))
    assert made.images
    cond, guided, name = seen[-1]
    assert isinstance(cond, torch.Tensor) and cond.shape == (1, 8)
    assert guided is False and name == "A1111LCMScheduler"


# ------------------------------------------------------------------------------- TCD


def test_tcd_is_listed_and_keeps_its_own_timesteps():
    names = [s["name"] for s in list_samplers()]
    assert "TCD" in names and "TCD" in SAMPLER_NAMES
    assert schedulers_for("TCD") == ["automatic"]
    choice = resolve_sampler("tcd", None)
    assert step_eta(choice) == 0.3  # gamma, the TCD LoRA model cards' value
    assert step_eta(resolve_sampler("DDIM", None)) == 0.0
    scheduler = make_scheduler(choice, SD1_CONFIG)
    assert type(scheduler).__name__ == "TCDScheduler"
    set_timesteps(scheduler, choice, 4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]


def test_tcd_uses_gamma_and_runs(service: Service, monkeypatch):
    from diffusers import TCDScheduler

    etas: list[float] = []
    original = TCDScheduler.step

    def spy(self, model_output, timestep, sample, eta=0.3, **kwargs):
        etas.append(eta)
        return original(self, model_output, timestep, sample, eta=eta, **kwargs)

    monkeypatch.setattr(TCDScheduler, "step", spy)
    made = service.generate(_request(sampler_name="TCD", steps=4, cfg_scale=1.0))
    assert etas == [0.3] * 4
    assert "Sampler: TCD" in made.infotexts[0]


def test_tcd_refuses_more_steps_than_its_grid(service: Service):
    with pytest.raises(InvalidRequestError) as err:
        service.generate(_request(sampler_name="TCD", steps=51))
    assert err.value.field == "steps" and "50" in err.value.message


# ------------------------------------------------------------- the starting noise


@pytest.mark.parametrize(("sampler", "schedule"), [("Euler", "ddim"), ("LCM", "ddim")])
def test_initial_noise_is_scaled_by_the_ladders_first_sigma(
    service: Service, monkeypatch, sampler, schedule
):
    """The timesteps are set before the noise is scaled, so a ladder that does not start
    at the model's largest sigma (the DDIM schedule) starts from its own first sigma (the
    noise used to be scaled by sigma_max = 14.6 whatever the ladder)."""
    from pipelines.generation.denoise import DenoiseLoop
    from pipelines.generation.noise import SeedPlan, initial_noise

    seen: list[tuple[torch.Tensor, float]] = []
    original = DenoiseLoop.__call__

    def spy(self, latents, timesteps, on_step, *rest):
        seen.append((latents.clone(), float(self.scheduler.init_noise_sigma)))
        return original(self, latents, timesteps, on_step, *rest)

    monkeypatch.setattr(DenoiseLoop, "__call__", spy)
    service.generate(_request(sampler_name=sampler, scheduler=schedule, steps=5))
    latents, first = seen[-1]
    noise, _ = initial_noise(SeedPlan([21], [0]), (4, 8, 8))
    assert first < 10  # DDIM ladders over 5 steps start well below sigma_max
    assert torch.allclose(latents, noise * first)


@pytest.mark.parametrize("sampler", ["LCM", "TCD"])
def test_img2img_and_hires_fix_run_with_the_few_step_samplers(service: Service, sampler):
    """The img2img tail (begin index, `add_noise`) and the hires pass run with both (LCM's
    img2img against A1111's loop in the next test)."""
    from PIL import Image

    from pipelines.schema import HiresFix, ImageInputs

    red = Image.new("RGB", (64, 64), (200, 30, 30))
    base = {"sampler_name": sampler, "steps": 8, "cfg_scale": 1.0}
    made = service.generate(
        _request(**base, img2img=ImageInputs(images=(red,)), denoising_strength=0.3)
    )
    assert made.images[0].size == (64, 64) and "Denoising strength: 0.3" in made.infotexts[0]
    hires = service.generate(_request(**base, hires=HiresFix(scale=1.5), denoising_strength=0.5))
    assert hires.images[0].size == (96, 96)
    assert f"Sampler: {sampler}" in hires.infotexts[0]


def test_lcm_img2img_equals_a1111s_img2img_loop(service: Service):
    from PIL import Image

    from pipelines.generation.img2img import encode_pixels
    from pipelines.schema import ImageInputs

    model = _model(service)
    init_image = Image.new("RGB", (64, 64), (200, 30, 30))
    pixels = torch.from_numpy(np.asarray(init_image, dtype=np.float32) / 255).permute(2, 0, 1)
    init = encode_pixels(model.pipe.vae, pixels[None], torch.float32)
    expected = a1111_sample_lcm(model, "sgm_uniform", 8, 1.5, 21, init=init, strength=0.5)
    made = service.generate(
        _request(
            sampler_name="LCM",
            scheduler="sgm_uniform",
            steps=8,
            cfg_scale=1.5,
            img2img=ImageInputs(images=(init_image,)),
            denoising_strength=0.5,
        )
    )
    assert np.abs(np.asarray(made.images[0]).astype(int) - expected).max() <= 1


# ---------------------------------------------------------------- CFG 1 and below


def _unet_batches(service: Service, monkeypatch, **fields: object) -> tuple[list[int], np.ndarray]:
    model = _model(service)
    unet = model.pipe.unet
    batches: list[int] = []
    original = type(unet).forward

    def spy(self, sample, *args, **kwargs):
        batches.append(sample.shape[0])
        return original(self, sample, *args, **kwargs)

    monkeypatch.setattr(type(unet), "forward", spy)
    made = service.generate(_request(sampler_name="Euler", steps=3, **fields))
    monkeypatch.undo()
    return batches, np.asarray(made.images[0]).astype(int)


def test_cfg_1_skips_the_uncond_pass_and_below_1_keeps_it_as_a1111(service: Service, monkeypatch):
    """A1111 computes uncond + cfg * (cond - uncond) at every CFG: at 1 that is cond, so
    the uncond pass is skipped; at 0 it is the negative prompt's own image."""
    batches, _ = _unet_batches(service, monkeypatch, cfg_scale=1.0)
    assert batches == [1, 1, 1]
    batches, zero = _unet_batches(service, monkeypatch, cfg_scale=0.0)
    assert batches == [2, 2, 2]
    _, negative_alone = _unet_batches(
        service, monkeypatch, cfg_scale=1.0, prompt="fog", negative_prompt=""
    )
    assert np.abs(zero - negative_alone).max() <= 1
    batches, _ = _unet_batches(service, monkeypatch, cfg_scale=0.5, prompt="a AND b:0.5")
    assert batches == [3, 3, 3]  # 0.5 * (1 + 0.5) != 1: uncond does not cancel
    batches, _ = _unet_batches(service, monkeypatch, cfg_scale=0.5, prompt="a AND b")
    assert batches == [2, 2, 2]  # 0.5 * (1 + 1) == 1: 0.5 * (cond_a + cond_b), no uncond
