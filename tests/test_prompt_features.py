"""A1111's prompt grammar, seed features and tiling through the real engine, each checked
against a hand-built run: diffusers' own pipeline switching conditioning from a step
callback, a loop of separate UNet passes for `AND`, and the noise functions alone.

The tiny random models barely listen to their prompts (another text moves pixels by about
1/255), so conditioning is compared on the decoded image before quantisation, where a
switch one step early or late shows as 1e-5 to 5e-4."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.generation import run as run_module
from pipelines.generation.noise import PhiloxGenerator, SeedPlan, initial_noise, slerp
from pipelines.infotext import parse_infotext
from pipelines.loading import LoadedModel
from pipelines.model_manager import ActiveModel
from pipelines.prompt import EncodedPrompt
from pipelines.samplers import make_scheduler, resolve_sampler
from pipelines.schema import GenerationRequest, LoraSpec
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

SMALL = {"width": 64, "height": 64, "steps": 4, "cfg_scale": 7.0, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Service:
    data = tmp_path_factory.mktemp("grammar")
    loras = data / "loras"
    keys = sd1_keys(SD1_MODULES)
    write(loras / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    settings = Settings(data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(loras,), threads=2)
    made = build_service(settings)
    made.folders.hash_missing()
    return made


def request(**fields: object) -> GenerationRequest:
    values = {**SMALL, "checkpoint": "tiny-sd1", "seed": 3, **fields}
    return GenerationRequest(**values)  # type: ignore[arg-type]


def image(service: Service, **fields: object) -> np.ndarray:
    return np.asarray(service.generate(request(**fields)).images[0]).astype(int)


def active(service: Service, checkpoint: str = "tiny-sd1") -> ActiveModel:
    service.generate(request(checkpoint=checkpoint, steps=1))  # load it, base weights
    model: ActiveModel = service.runner.manager.current  # type: ignore[attr-defined]
    return model


def encode(model: ActiveModel, text: str, negative: bool = False) -> EncodedPrompt:
    return model.encoder.encode(
        text, clip_skip=1, device="cpu", dtype=torch.float32, negative=negative
    )


def decoded(
    service: Service, monkeypatch: pytest.MonkeyPatch, roll: int = 0, **fields: object
) -> torch.Tensor:
    """The engine's decoded image in [0, 1] before quantisation (what diffusers returns as
    `output_type="pt"`), the initial latent rolled by `roll` columns."""
    noise_of, post_process = run_module.initial_noise, run_module.Txt2ImgRun.post_process
    kept: list[torch.Tensor] = []

    def rolled_noise(*args: object, **kwargs: object):
        noise, generators = noise_of(*args, **kwargs)  # type: ignore[arg-type]
        return noise.roll(roll, dims=-1), generators

    def keep(self: object, pixels: torch.Tensor):
        kept.append((pixels / 2 + 0.5).clamp(0, 1))
        return post_process(self, pixels)  # type: ignore[arg-type]

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "initial_noise", rolled_noise)
        patch.setattr(run_module.Txt2ImgRun, "post_process", keep)
        service.generate(request(**fields))
    return kept[0]


def diffusers_run(
    model: ActiveModel, embeds_for_step: Callable[[int], torch.Tensor], seed: int, steps: int
) -> torch.Tensor:
    """diffusers' StableDiffusionPipeline (Euler), the prompt embeddings replaced before
    each step through its step-end callback: an independent prompt-editing run."""
    scheduler = make_scheduler(resolve_sampler("Euler", "automatic"), model.scheduler_config)
    pipe = type(model.pipe)(**{**model.pipe.components, "scheduler": scheduler})
    negative = encode(model, "", negative=True).embeds

    def switch(_pipe: object, index: int, _t: object, tensors: dict) -> dict:
        if index + 1 < steps:
            return {"prompt_embeds": torch.cat([negative, embeds_for_step(index + 1)])}
        return {}

    out = pipe(
        prompt_embeds=embeds_for_step(0),
        negative_prompt_embeds=negative,
        num_inference_steps=steps,
        guidance_scale=SMALL["cfg_scale"],
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(seed),
        callback_on_step_end=switch,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
        output_type="pt",
    )
    return out.images


# ------------------------------------------------------------------ prompt grammar


@pytest.mark.parametrize("prompt", ["[a castle:a castle:0.5]", "[a castle|a castle]"])
def test_editing_or_alternating_to_the_same_text_is_that_text(service: Service, prompt: str):
    assert np.array_equal(image(service, prompt=prompt), image(service, prompt="a castle"))


def test_prompt_editing_equals_diffusers_switching_at_that_step(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = active(service)
    before, after = encode(model, "a castle").embeds, encode(model, "a dragon").embeds
    # A1111: `[a castle:a dragon:0.5]` over 4 steps is (2, "a castle"), (4, "a dragon"),
    # and step index i uses the first entry whose end >= i: indices 0-2 castle, 3 dragon.
    expected = diffusers_run(model, lambda i: before if i <= 2 else after, seed=5, steps=4)
    made = decoded(service, monkeypatch, prompt="[a castle:a dragon:0.5]", seed=5)
    assert torch.allclose(made, expected, rtol=0, atol=1e-6)
    early = diffusers_run(model, lambda i: before if i <= 1 else after, seed=5, steps=4)
    assert (made - early).abs().max() > 1e-5


def test_alternation_equals_diffusers_switching_every_step(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = active(service)
    texts = [encode(model, "a castle").embeds, encode(model, "a dragon").embeds]
    # A1111: the schedule is (1, castle), (2, dragon), (3, castle), (4, dragon) and step
    # index i takes the first entry ending at or after i: castle, castle, dragon, castle.
    expected = diffusers_run(model, lambda i: texts[max(i - 1, 0) % 2], seed=6, steps=4)
    made = decoded(service, monkeypatch, prompt="[a castle|a dragon]", seed=6)
    assert torch.allclose(made, expected, rtol=0, atol=1e-6)
    naive = diffusers_run(model, lambda i: texts[i % 2], seed=6, steps=4)
    assert (made - naive).abs().max() > 1e-5


def test_lora_tag_inside_an_edit_applies_for_the_whole_run(service: Service) -> None:
    inside = image(service, prompt="[a castle <lora:ink:0.8>:a dragon:0.5]")
    outside = image(service, prompt="[a castle:a dragon:0.5]", loras=(LoraSpec("ink", 0.8),))
    assert np.array_equal(inside, outside)
    assert not np.array_equal(inside, image(service, prompt="[a castle:a dragon:0.5]"))


def test_and_equals_separate_unet_passes_combined_as_a1111(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = active(service)
    pipe = model.pipe
    uncond = encode(model, "", negative=True).embeds
    castle, dragon = encode(model, "a castle").embeds, encode(model, "a dragon").embeds

    def separate_passes(parts: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
        scheduler = make_scheduler(resolve_sampler("Euler", "automatic"), model.scheduler_config)
        scheduler.set_timesteps(4)
        generator = torch.Generator("cpu").manual_seed(9)
        latents = torch.randn((1, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = scheduler.scale_model_input(latents, t)
                u = pipe.unet(x, t, encoder_hidden_states=uncond).sample
                delta = sum(
                    w * (pipe.unet(x, t, encoder_hidden_states=c).sample - u) for c, w in parts
                )
                latents = scheduler.step(u + SMALL["cfg_scale"] * delta, t, latents).prev_sample
            pixels = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        return (pixels / 2 + 0.5).clamp(0, 1)

    expected = separate_passes([(castle, 1.2), (dragon, 0.8)])
    made = decoded(service, monkeypatch, prompt="a castle :1.2 AND a dragon :0.8", seed=9)
    assert torch.allclose(made, expected, rtol=0, atol=1e-5)
    swapped = separate_passes([(castle, 0.8), (dragon, 1.2)])
    assert (made - swapped).abs().max() > 1e-4


@pytest.mark.parametrize("checkpoint", ["tiny-sd1", "tiny-sdxl"])
def test_and_of_one_text_halved_is_that_text(service: Service, checkpoint: str) -> None:
    """Two equal parts of weight 0.5 are the plain prompt (SDXL: the pooled text too)."""
    halves = image(service, prompt="a castle :0.5 AND a castle :0.5", checkpoint=checkpoint)
    plain = image(service, prompt="a castle", checkpoint=checkpoint)
    assert np.abs(halves - plain).max() <= 1


def test_negative_prompt_takes_editing(service: Service, monkeypatch: pytest.MonkeyPatch):
    def negative(text: str) -> torch.Tensor:
        return decoded(service, monkeypatch, prompt="a castle", negative_prompt=text)

    # the same engine is deterministic, so any difference is the schedule's
    assert not torch.equal(negative("[blurry:dark:0.5]"), negative("blurry"))
    assert not torch.equal(negative("[blurry:dark:0.5]"), negative("dark"))
    assert torch.equal(negative("[blurry:blurry:0.5]"), negative("blurry"))


def test_infotext_keeps_the_prompt_as_written_and_replays(service: Service) -> None:
    prompt = "[a castle:a dragon:0.5] AND a tower :0.7"
    result = service.generate(request(prompt=prompt, seed=12))
    parsed = parse_infotext(result.infotexts[0])
    assert parsed.prompt == prompt
    assert np.array_equal(
        np.asarray(result.images[0]).astype(int), image(service, **_replay(parsed))
    )


def _replay(parsed) -> dict[str, object]:
    """The request fields an infotext holds (what the page's PNG-info recall fills)."""
    params = parsed.params
    fields: dict[str, object] = {"prompt": parsed.prompt, "seed": int(params["Seed"])}
    if "Variation seed" in params:
        fields["subseed"] = int(params["Variation seed"])
        fields["subseed_strength"] = float(params["Variation seed strength"])
    if "Seed resize from" in params:
        width, height = params["Seed resize from"].split("x")
        fields["seed_resize_from_w"], fields["seed_resize_from_h"] = int(width), int(height)
    fields["tiling"] = params.get("Tiling") == "True"
    return fields


# ------------------------------------------------------------------------ seeds


def test_variation_strength_zero_is_the_seed_alone(service: Service) -> None:
    varied = image(service, prompt="a castle", seed=3, subseed=99, subseed_strength=0.0)
    assert np.array_equal(varied, image(service, prompt="a castle", seed=3))


@pytest.mark.parametrize("sampler", ["Euler", "DPM++ 2M"])
def test_variation_strength_one_is_the_subseed_alone(service: Service, sampler: str) -> None:
    varied = image(service, sampler_name=sampler, seed=3, subseed=99, subseed_strength=1.0)
    assert np.array_equal(varied, image(service, sampler_name=sampler, seed=99))


def test_ancestral_strength_one_starts_from_the_subseed_noise() -> None:
    """Ancestral samplers draw later noise from the main seed's generator (A1111), so
    only the initial noise is the subseed's."""
    shape = (4, 8, 8)
    varied, generators = initial_noise(SeedPlan([3], [99], 1.0), shape)
    alone, _ = initial_noise(SeedPlan([99], [0]), shape)
    assert torch.equal(varied, alone)
    main, main_generators = initial_noise(SeedPlan([3], [0]), shape)
    assert torch.equal(
        torch.randn(4, generator=generators[0]), torch.randn(4, generator=main_generators[0])
    )


def test_variation_is_the_spherical_mix_of_the_two_noises() -> None:
    shape = (4, 8, 8)
    varied, _ = initial_noise(SeedPlan([3], [99], 0.3), shape)
    first, _ = initial_noise(SeedPlan([3], [0]), shape)
    second, _ = initial_noise(SeedPlan([99], [0]), shape)
    assert torch.allclose(varied[0], slerp(0.3, first[0], second[0]))
    assert not torch.allclose(varied, first) and not torch.allclose(varied, second)


def test_noise_made_at_a_smaller_size_is_centred() -> None:
    small, _ = initial_noise(SeedPlan([3], [0]), (4, 8, 8))
    large, _ = initial_noise(SeedPlan([3], [0], resize_from=(64, 64)), (4, 16, 12))
    assert torch.equal(large[0, :, 4:12, 2:10], small[0])  # (16-8)//2 rows, (12-8)//2 cols
    plain, _ = initial_noise(SeedPlan([3], [0]), (4, 16, 12))
    assert torch.equal(large[0, :, :4], plain[0, :, :4])  # outside: this size's own noise


def test_noise_made_at_a_larger_size_is_cropped_from_its_centre() -> None:
    large, _ = initial_noise(SeedPlan([3], [0]), (4, 16, 16))
    small, _ = initial_noise(SeedPlan([3], [0], resize_from=(128, 128)), (4, 8, 8))
    assert torch.equal(small[0], large[0, :, 4:12, 4:12])


def test_batch_items_use_consecutive_seeds_and_subseeds(service: Service) -> None:
    fields = {"subseed": 40, "subseed_strength": 0.5}
    batch = service.generate(request(seed=20, batch_size=2, **fields))
    single = image(service, seed=21, subseed=41, subseed_strength=0.5)
    assert np.abs(np.asarray(batch.images[1]).astype(int) - single).max() <= 1
    assert "Variation seed: 41" in batch.infotexts[1]


def test_random_subseed_is_drawn_reported_and_replays(service: Service) -> None:
    result = service.generate(request(seed=4, subseed=-1, subseed_strength=0.4))
    parsed = parse_infotext(result.infotexts[0])
    assert parsed.params["Variation seed strength"] == "0.4"
    assert result.request.subseed == int(parsed.params["Variation seed"]) >= 0
    again = image(service, **_replay(parsed))
    assert np.array_equal(np.asarray(result.images[0]).astype(int), again)


def test_seed_resize_is_written_and_replays(service: Service) -> None:
    result = service.generate(
        request(seed=4, width=96, seed_resize_from_w=64, seed_resize_from_h=64)
    )
    parsed = parse_infotext(result.infotexts[0])
    assert parsed.params["Seed resize from"] == "64x64"
    again = image(service, width=96, **_replay(parsed))
    assert np.array_equal(np.asarray(result.images[0]).astype(int), again)


# ----------------------------------------------------------------------- tiling


def test_tiling_makes_the_image_roll_with_its_latent(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    columns = 4  # a multiple of the UNet's downsampling, so every level rolls whole cells
    size = {"width": 128, "height": 64}
    base = decoded(service, monkeypatch, 0, tiling=True, **size)
    shifted = decoded(service, monkeypatch, columns, tiling=True, **size)
    assert torch.allclose(shifted, base.roll(8 * columns, dims=-1), rtol=0, atol=1e-4)
    assert "Tiling: True" in service.generate(request(tiling=True)).infotexts[0]
    plain = decoded(service, monkeypatch, 0, tiling=False, **size)
    plain_shifted = decoded(service, monkeypatch, columns, tiling=False, **size)
    assert (plain_shifted - plain.roll(8 * columns, dims=-1)).abs().max() > 1e-2


def test_tiling_is_restored_afterwards(service: Service) -> None:
    tiled = image(service, tiling=True)
    model = active(service)
    modes = {m.padding_mode for m in model.pipe.unet.modules() if isinstance(m, torch.nn.Conv2d)}
    assert modes == {"zeros"}
    assert not np.array_equal(tiled, image(service))


# ----------------------------------------------------------------- noise sources


def test_nv_source_reproduces_cuda_randn() -> None:
    """`torch.randn((3, 4), device="cuda")` after `manual_seed(0)`, as A1111's
    `rng_philox` documents it."""
    expected = [
        [-0.92466259, -0.42534415, -2.6438457, 0.14518388],
        [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
        [-1.07454231, -0.36314407, -1.67105067, 2.26550497],
    ]
    made = PhiloxGenerator(0).randn((3, 4))
    assert torch.allclose(made, torch.tensor(expected), rtol=0, atol=1e-6)
    second = PhiloxGenerator(0)
    second.randn((3, 4))
    assert not torch.allclose(second.randn((3, 4)), made)  # the offset moves on


def test_nv_initial_noise_is_philox_per_seed_and_subseed() -> None:
    shape = (4, 8, 8)
    nv, generators = initial_noise(SeedPlan([7, 8], [0, 0], source="NV"), shape)
    assert torch.equal(nv[1], PhiloxGenerator(8).randn(shape))
    assert isinstance(generators[0], torch.Generator)  # later noise: CPU generators
    varied, _ = initial_noise(SeedPlan([7], [9], 1.0, source="NV"), shape)
    assert torch.equal(varied[0], PhiloxGenerator(9).randn(shape))


def test_gpu_source_on_a_cpu_model_is_the_cpu_source() -> None:
    shape = (4, 8, 8)
    gpu, _ = initial_noise(SeedPlan([7], [0], source="GPU"), shape)
    cpu, _ = initial_noise(SeedPlan([7], [0], source="CPU"), shape)
    assert torch.equal(gpu, cpu)


def test_noise_source_is_written_as_a1111_does(service: Service) -> None:
    cpu = service.generate(request(seed=3))
    nv = service.generate(request(seed=3, randn_source="NV"))
    gpu = service.generate(request(seed=3, randn_source="GPU"))
    assert parse_infotext(cpu.infotexts[0]).params["RNG"] == "CPU"
    assert parse_infotext(nv.infotexts[0]).params["RNG"] == "NV"
    assert "RNG" not in parse_infotext(gpu.infotexts[0]).params  # A1111's default
    assert not np.array_equal(np.asarray(cpu.images[0]), np.asarray(nv.images[0]))
    assert np.array_equal(np.asarray(cpu.images[0]), np.asarray(gpu.images[0]))  # on a CPU
