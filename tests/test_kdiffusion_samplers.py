"""Euler a with every A1111 schedule type: the ones diffusers' ancestral Euler cannot take
(Karras, Exponential, Beta) run A1111's own `sample_euler_ancestral`, checked here against
that loop re-implemented from k-diffusion (float64, A1111's CFGDenoiser, the seed's
generator for every noise draw)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.model_manager import ActiveModel
from pipelines.samplers import make_scheduler, resolve_sampler, schedulers_for
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_fewstep_samplers import (
    Discrete,
    _model,
    _request,
    a1111_ladder,
    ldm_alphas_cumprod,
)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Service:
    data = tmp_path_factory.mktemp("kdiffusion")
    return build_service(Settings(data_dir=data, ckpt_dirs=(models_dir,), threads=2))


def a1111_sample_euler_ancestral(
    model: ActiveModel, schedule: str, steps: int, cfg: float, seed: int, ensd: int = 0
) -> np.ndarray:
    """k-diffusion's `sample_euler_ancestral` (eta 1, s_noise 1) on A1111's ladder with
    `CompVisDenoiser` (fractional timesteps) and CFG on the denoised outputs; with `ensd`,
    the later noise comes from a generator seeded with seed + ensd (A1111's
    `ImageRNG.first`)."""
    pipe = model.pipe
    alphas = ldm_alphas_cumprod(dict(model.scheduler_config))
    table = Discrete(((1 - alphas) / alphas) ** 0.5)
    sigmas = a1111_ladder(schedule, steps, table)
    encode = model.encoder.encode
    cond = encode("a lighthouse", clip_skip=1, device="cpu", dtype=torch.float32).embeds
    uncond = encode("fog", clip_skip=1, device="cpu", dtype=torch.float32, negative=True).embeds
    generator = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=generator).double() * sigmas[0]
    if ensd:
        generator = torch.Generator("cpu").manual_seed(seed + ensd)

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.tensor(table.sigma_to_t(sigma), dtype=torch.float32)
        c_in = 1 / math.sqrt(sigma**2 + 1)
        out = []
        for hidden in (cond, uncond):
            with torch.no_grad():
                eps = pipe.unet((x * c_in).float(), t, encoder_hidden_states=hidden).sample
            out.append(x - sigma * eps.double())
        return out[1] + (out[0] - out[1]) * cfg

    for i in range(len(sigmas) - 1):
        now, following = sigmas[i], sigmas[i + 1]
        denoised = denoise(x, now)
        up = min(following, math.sqrt(following**2 * (now**2 - following**2) / now**2))
        down = math.sqrt(following**2 - up**2)
        x = x + (x - denoised) / now * (down - now)
        if following > 0:
            x = x + torch.randn((1, 4, 8, 8), generator=generator).double() * up
    with torch.no_grad():
        pixels = pipe.vae.decode((x / pipe.vae.config.scaling_factor).float()).sample
    image = ((pixels / 2 + 0.5).clamp(0, 1) * 255).round()
    return image[0].permute(1, 2, 0).numpy().astype(int)


def test_euler_a_offers_every_a1111_schedule_type() -> None:
    assert {"karras", "exponential", "beta"} <= set(schedulers_for("Euler a"))
    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012}
    built = make_scheduler(resolve_sampler("Euler a Karras"), config)
    assert type(built).__name__ == "A1111EulerAncestralScheduler"
    plain = make_scheduler(resolve_sampler("Euler a", "uniform"), config)
    assert type(plain).__name__ == "EulerAncestralDiscreteScheduler"  # diffusers' where it can


@pytest.mark.parametrize(
    ("schedule", "steps", "cfg"), [("karras", 4, 5.0), ("exponential", 3, 7.0)]
)
def test_euler_a_karras_and_exponential_equal_a1111s_loop(
    service: Service, schedule: str, steps: int, cfg: float
) -> None:
    torch.set_num_threads(2)
    model = _model(service)
    expected = a1111_sample_euler_ancestral(model, schedule, steps, cfg, seed=21)
    request = _request(sampler_name="Euler a", scheduler=schedule, steps=steps, cfg_scale=cfg)
    made = service.generate(request)
    ours = np.asarray(made.images[0]).astype(int)
    assert np.abs(ours - expected).max() <= 1
    other = a1111_sample_euler_ancestral(model, schedule, steps, cfg, seed=22)
    assert np.abs(other - expected).max() > 1  # the comparison can tell seeds apart
    assert "Schedule type: " + schedule.capitalize() in made.infotexts[0]
    again = np.asarray(service.generate(request).images[0]).astype(int)
    assert np.array_equal(again, ours)


def test_euler_a_beta_runs_in_img2img_and_hires(service: Service) -> None:
    from pipelines.schema import HiresFix, ImageInputs

    made = service.generate(_request(sampler_name="Euler a", scheduler="beta", steps=3))
    assert "Schedule type: Beta" in made.infotexts[0]
    init = ImageInputs(images=(made.images[0],))
    again = service.generate(
        _request(
            sampler_name="Euler a",
            scheduler="karras",
            steps=4,
            img2img=init,
            denoising_strength=0.5,
        )
    )
    assert again.images[0].size == (64, 64)
    hires = HiresFix(scale=1.5, second_pass_steps=2)
    big = service.generate(
        _request(
            sampler_name="Euler a",
            scheduler="exponential",
            steps=2,
            hires=hires,
            denoising_strength=0.5,
        )
    )
    assert big.images[0].size == (96, 96)
