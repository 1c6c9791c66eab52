"""DPM++ 2S a with every A1111 schedule type: A1111's own `sample_dpmpp_2s_ancestral`
(`pipelines/kdiffusion.py`), checked against that loop transcribed here from k-diffusion
(float64, its `get_ancestral_step`, t = -log(sigma), a fixed noise sampler), first over
an analytic denoiser driven through diffusers-style `scale_model_input` / `step` calls,
then end to end on the tiny SD1 through the service."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.model_manager import ActiveModel
from pipelines.samplers import (
    SCHEDULER_LABELS,
    make_scheduler,
    resolve_sampler,
    schedulers_for,
    set_timesteps,
)
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_fewstep_samplers import (
    Discrete,
    _model,
    _request,
    a1111_ladder,
    ldm_alphas_cumprod,
)
from tests.test_samplers import SD1_CONFIG

# ---------------------------------------------------- k-diffusion, transcribed here

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
NoiseSampler = Callable[[float, float], torch.Tensor]


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """k-diffusion's `get_ancestral_step`."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(
        sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    )
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def sample_dpmpp_2s_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: list[float],
    noise_sampler: NoiseSampler,
    eta: float = 1.0,
    s_noise: float = 1.0,
    midpoint_to_next_sigma: bool = False,
) -> torch.Tensor:
    """k-diffusion's `sample_dpmpp_2s_ancestral`. `midpoint_to_next_sigma` is a deliberate
    mistake (the 2S step aimed at sigmas[i + 1], not sigma_down), to show the comparison
    can tell."""
    sigma_fn = lambda t: math.exp(-t)  # noqa: E731 (as k-diffusion writes it)
    t_fn = lambda sigma: -math.log(sigma)  # noqa: E731
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            # Euler method
            d = (x - denoised) / sigmas[i]
            dt = sigma_down - sigmas[i]
            x = x + d * dt
        else:
            # DPM-Solver++(2S)
            target = sigmas[i + 1] if midpoint_to_next_sigma else sigma_down
            t, t_next = t_fn(sigmas[i]), t_fn(target)
            r = 1 / 2
            h = t_next - t
            s = t + r * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - math.expm1(-h * r) * denoised
            denoised_2 = model(x_2, sigma_fn(s))
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - math.expm1(-h) * denoised_2
        # Noise addition
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


# ------------------------------------------------------ an analytic denoiser

ALPHAS = ldm_alphas_cumprod(SD1_CONFIG)
TABLE = Discrete(((1 - ALPHAS) / ALPHAS) ** 0.5)
SHAPE = (2, 4, 8, 8)


def analytic_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A smooth, non-linear stand-in for CFGDenoiser's output (float64)."""
    return 0.3 + (x - 0.3) / (1 + sigma**2) + 0.2 * torch.sin(2 * x) / (1 + sigma)


def unet_stand_in(prediction_type: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The analytic denoiser as a UNet: it sees only the scaled input and the timestep, so
    sigma comes back through the table (a wrong timestep or c_in shows)."""

    def unet(scaled: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        sigma = TABLE.t_to_sigma(float(timestep))
        x = scaled.double() * math.sqrt(sigma**2 + 1)
        denoised = analytic_denoiser(x, sigma)
        if prediction_type == "epsilon":
            out = (x - denoised) / sigma
        else:  # denoised = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)
            out = (x / (sigma**2 + 1) - denoised) * math.sqrt(sigma**2 + 1) / sigma
        return out.float()

    return unet


def generators(seed: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + item) for item in range(SHAPE[0])]


def draw(gens: list[torch.Generator]) -> torch.Tensor:
    """One noise draw [B, ...]: each item from its own generator (A1111's ImageRNG)."""
    return torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens]).double()


def expected(
    schedule: str,
    steps: int,
    seed: int,
    eta: float = 1.0,
    tail: int = 0,
    init: torch.Tensor | None = None,
    **mistake: bool,
) -> torch.Tensor:
    """The transcribed loop on A1111's ladder (from `tail` on, noised from `init` as
    A1111's `sample_img2img` does), noise from the items' generators."""
    gens = generators(seed)
    sigmas = a1111_ladder(schedule, steps, TABLE)[tail:]
    noise = draw(gens)
    x = noise * sigmas[0] if init is None else init.double() + noise * sigmas[0]
    return sample_dpmpp_2s_ancestral(
        analytic_denoiser, x, sigmas, lambda s, s_next: draw(gens), eta=eta, **mistake
    )


def ours(
    schedule: str,
    steps: int,
    seed: int,
    prediction_type: str = "epsilon",
    eta: float = 1.0,
    tail: int = 0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scheduler driven as diffusers' pipelines drive one (img2img: `begin_index`
    and `add_noise` as `Img2ImgRun` sets them)."""
    choice = resolve_sampler("DPM++ 2S a", schedule)
    config = {**SD1_CONFIG, "prediction_type": prediction_type}
    built = make_scheduler(choice, config)
    scheduler = type(built).from_config(built.config, eta=eta)
    set_timesteps(scheduler, choice, steps)
    start = tail * scheduler.order
    scheduler.set_begin_index(start)
    gens = generators(seed)
    noise = draw(gens).float()
    if init is None:
        sample = noise * scheduler.init_noise_sigma
    else:
        sample = scheduler.add_noise(init, noise, scheduler.timesteps[start : start + 1])
    unet = unet_stand_in(prediction_type)
    for timestep in scheduler.timesteps[start:]:
        model_input = scheduler.scale_model_input(sample, timestep)
        sample = scheduler.step(unet(model_input, timestep), timestep, sample, generator=gens)[0]
    return sample.double()


@pytest.mark.parametrize(
    ("schedule", "prediction_type", "eta"),
    [
        ("karras", "epsilon", 1.0),
        ("uniform", "epsilon", 1.0),
        ("sgm_uniform", "epsilon", 1.0),
        ("exponential", "epsilon", 0.5),
        ("karras", "v_prediction", 1.0),
        ("uniform", "v_prediction", 1.0),
    ],
)
def test_steps_equal_k_diffusions_loop(schedule: str, prediction_type: str, eta: float) -> None:
    made = ours(schedule, 4, seed=3, prediction_type=prediction_type, eta=eta)
    wanted = expected(schedule, 4, seed=3, eta=eta)
    assert torch.allclose(made, wanted, rtol=1e-4, atol=1e-4), (made - wanted).abs().max()
    # the comparison can tell a seed, and a 2S step aimed at the wrong sigma, apart
    assert (expected(schedule, 4, seed=4, eta=eta) - wanted).abs().max() > 1e-2
    wrong = expected(schedule, 4, seed=3, eta=eta, midpoint_to_next_sigma=True)
    assert (wrong - wanted).abs().max() > 1e-2


def test_img2img_tail_equals_k_diffusions_loop() -> None:
    """A1111's `sample_img2img`: 5 steps at strength 0.6 denoise `sigmas[2:]` from
    `init + noise * sigmas[2]`."""
    init = torch.linspace(-1, 1, math.prod(SHAPE)).reshape(SHAPE)
    made = ours("karras", 5, seed=8, tail=2, init=init)
    wanted = expected("karras", 5, seed=8, tail=2, init=init)
    assert torch.allclose(made, wanted, rtol=1e-4, atol=1e-4), (made - wanted).abs().max()


def test_two_unet_evaluations_per_step_but_the_last() -> None:
    choice = resolve_sampler("DPM++ 2S a", "uniform")
    scheduler = make_scheduler(choice, SD1_CONFIG)
    set_timesteps(scheduler, choice, 4)
    assert type(scheduler).__name__ == "A1111DPMPP2SAncestralScheduler"
    assert scheduler.order == 2
    assert len(scheduler.timesteps) == 2 * 4 - 1
    ladder = a1111_ladder("uniform", 4, TABLE)
    firsts = scheduler.sigmas[0::2].double()  # s_0, s_1, s_2, s_3 (then mid_i, 0 at odd)
    assert torch.allclose(firsts, torch.tensor(ladder[:-1], dtype=torch.float64), rtol=1e-5)
    assert float(scheduler.sigmas[-1]) == 0
    for i in range(3):  # midpoint: exp(-(t + t_next) / 2), t_next at sigma_down
        down, _ = get_ancestral_step(ladder[i], ladder[i + 1], 1.0)
        mid = math.exp((math.log(ladder[i]) + math.log(down)) / 2)
        assert float(scheduler.sigmas[2 * i + 1]) == pytest.approx(mid, rel=1e-4)
        assert float(scheduler.timesteps[2 * i + 1]) == pytest.approx(
            TABLE.sigma_to_t(mid), abs=1e-2
        )


def test_every_schedule_type_is_offered_and_resolves() -> None:
    from frontends.page.ui import schedule_choices

    assert schedule_choices("DPM++ 2S a") == list(SCHEDULER_LABELS)
    for schedule in schedulers_for("DPM++ 2S a"):
        choice = resolve_sampler("DPM++ 2S a", schedule)
        built = make_scheduler(choice, SD1_CONFIG)
        assert built.config.schedule == choice.schedule
    assert resolve_sampler("DPM++ 2S a", None).schedule == "karras"  # A1111's automatic
    assert resolve_sampler("DPM++ 2S a Karras").label == "Karras"


# ------------------------------------------------------------ through the service


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Service:
    data = tmp_path_factory.mktemp("dpmpp2sa")
    return build_service(Settings(data_dir=data, ckpt_dirs=(models_dir,), threads=2))


def a1111_pixels(model: ActiveModel, schedule: str, steps: int, cfg: float, seed: int):
    """The transcribed loop with A1111's CompVisDenoiser and CFGDenoiser on the tiny SD1
    (one item, the seed's generator for every draw), decoded to 8-bit pixels."""
    pipe = model.pipe
    alphas = ldm_alphas_cumprod(dict(model.scheduler_config))
    table = Discrete(((1 - alphas) / alphas) ** 0.5)
    encode = model.encoder.encode
    cond = encode("a lighthouse", clip_skip=1, device="cpu", dtype=torch.float32).embeds
    uncond = encode("fog", clip_skip=1, device="cpu", dtype=torch.float32, negative=True).embeds

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.tensor(table.sigma_to_t(sigma), dtype=torch.float32)
        c_in = 1 / math.sqrt(sigma**2 + 1)
        out = []
        for hidden in (cond, uncond):
            with torch.no_grad():
                eps = pipe.unet((x * c_in).float(), t, encoder_hidden_states=hidden).sample
            out.append(x - sigma * eps.double())
        return out[1] + (out[0] - out[1]) * cfg

    generator = torch.Generator("cpu").manual_seed(seed)

    def noise(*_: float) -> torch.Tensor:
        return torch.randn((1, 4, 8, 8), generator=generator).double()

    sigmas = a1111_ladder(schedule, steps, table)
    x = sample_dpmpp_2s_ancestral(denoise, noise() * sigmas[0], sigmas, noise)
    with torch.no_grad():
        pixels = pipe.vae.decode((x / pipe.vae.config.scaling_factor).float()).sample
    image = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round()
    return image[0].permute(1, 2, 0).numpy().astype(int)


def test_service_image_equals_a1111s_loop(service: Service) -> None:
    torch.set_num_threads(2)
    model = _model(service)
    wanted = a1111_pixels(model, "uniform", 3, 5.0, seed=21)
    request = _request(sampler_name="DPM++ 2S a", scheduler="uniform", steps=3, cfg_scale=5.0)
    made = service.generate(request)
    assert np.abs(np.asarray(made.images[0]).astype(int) - wanted).max() <= 1
    assert np.abs(a1111_pixels(model, "uniform", 3, 5.0, seed=22) - wanted).max() > 1
    assert "Sampler: DPM++ 2S a, Schedule type: Uniform" in made.infotexts[0]


def test_every_schedule_runs_through_the_service(service: Service) -> None:
    torch.set_num_threads(2)
    for schedule in schedulers_for("DPM++ 2S a"):
        request = _request(sampler_name="DPM++ 2S a", scheduler=schedule, steps=2)
        made = service.generate(request)
        label = resolve_sampler("DPM++ 2S a", schedule).label
        assert f"Schedule type: {label}" in made.infotexts[0]
        pixels = np.asarray(made.images[0])
        assert pixels.shape == (64, 64, 3) and pixels.std() > 0
        if schedule in ("karras", "sgm_uniform"):
            again = np.asarray(service.generate(request).images[0])
            assert np.array_equal(again, pixels)


def test_img2img_and_hires_run(service: Service) -> None:
    from pipelines.schema import HiresFix, ImageInputs

    torch.set_num_threads(2)
    first = service.generate(_request(sampler_name="DPM++ 2S a", scheduler="simple", steps=2))
    init = ImageInputs(images=(first.images[0],))
    fields = {"img2img": init, "denoising_strength": 0.5, "sampler_name": "DPM++ 2S a"}
    made = service.generate(_request(scheduler="normal", steps=4, **fields))
    again = service.generate(_request(scheduler="normal", steps=4, **fields))
    assert np.array_equal(np.asarray(made.images[0]), np.asarray(again.images[0]))
    assert not np.array_equal(np.asarray(made.images[0]), np.asarray(first.images[0]))
    hires = HiresFix(scale=1.5, second_pass_steps=2)
    big = service.generate(
        _request(
            sampler_name="DPM++ 2S a",
            scheduler="ddim",
            steps=2,
            hires=hires,
            denoising_strength=0.5,
        )
    )
    assert big.images[0].size == (96, 96)
