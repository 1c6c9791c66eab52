"""A1111's hires fix through the real engine with tiny models: sizes, latent modes, step
counts, the LoRA stack in both passes, and an infotext that replays its pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import InvalidRequestError
from pipelines.infotext import hires_from_params, parse_infotext
from pipelines.loading import LoadedModel
from pipelines.schema import LATENT_UPSCALE_MODES, GenerationRequest, HiresFix
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_img2img import UNetCalls, loaded_unet
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

SMALL = {"steps": 3, "sampler_name": "Euler", "seed": 4, "prompt": "a house", "width": 64}


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Service:
    data = tmp_path_factory.mktemp("hires")
    loras = data / "loras"
    keys = sd1_keys(SD1_MODULES)
    write(loras / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    settings = Settings(data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(loras,), threads=2)
    made = build_service(settings)
    made.folders.hash_missing()
    return made


def hires_request(hires: HiresFix, **fields: object) -> GenerationRequest:
    values = {**SMALL, "height": 64, "checkpoint": "tiny-sd1", "denoising_strength": 0.6}
    values.update(fields)
    return GenerationRequest(**values, hires=hires)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("hires", "size", "expected"),
    [
        (HiresFix(scale=2.0), (64, 64), (128, 128)),
        (HiresFix(scale=1.5), (64, 96), (96, 144)),
        (HiresFix(resize_x=160), (64, 96), (160, 240)),
        (HiresFix(resize_y=96), (96, 64), (144, 96)),
        # both sides: cover 160x96 keeping 1:1, then crop the excess (A1111's truncate)
        (HiresFix(resize_x=160, resize_y=96), (64, 64), (160, 96)),
        (HiresFix(resize_x=96, resize_y=160, upscaler="Lanczos"), (64, 64), (96, 160)),
    ],
)
def test_hires_output_has_the_requested_size(
    service: Service, hires: HiresFix, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert hires.final_size(*size) == expected
    result = service.generate(hires_request(hires, width=size[0], height=size[1], steps=2))
    assert result.images[0].size == expected
    params = parse_infotext(result.infotexts[0]).params
    assert params["Size"] == f"{size[0]}x{size[1]}"  # A1111: the first pass's size
    assert params["Denoising strength"] == "0.6"


@pytest.mark.parametrize("mode", [*LATENT_UPSCALE_MODES, "None", "Lanczos", "Nearest"])
def test_every_upscaler_gives_the_size_and_reproduces(service: Service, mode: str) -> None:
    wanted = hires_request(HiresFix(scale=1.5, upscaler=mode), steps=2)
    first, second = service.generate(wanted), service.generate(wanted)
    assert first.images[0].size == (96, 96)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert f"Hires upscaler: {mode}" in first.infotexts[0]


def test_latent_modes_differ_from_each_other(service: Service) -> None:
    images = {
        mode: np.asarray(service.generate(hires_request(HiresFix(upscaler=mode))).images[0])
        for mode in ("Latent", "Latent (nearest)", "Lanczos")
    }
    assert not np.array_equal(images["Latent"], images["Latent (nearest)"])
    assert not np.array_equal(images["Latent"], images["Lanczos"])


@pytest.mark.parametrize(("hr_steps", "sampler", "per_step"), [(0, None, 1), (5, "Heun", 2)])
def test_second_pass_runs_exactly_the_hires_steps(
    service: Service, hr_steps: int, sampler: str | None, per_step: int
) -> None:
    service.generate(hires_request(HiresFix(), steps=1))  # load first
    calls = UNetCalls(loaded_unet(service))
    try:
        service.generate(
            hires_request(HiresFix(second_pass_steps=hr_steps, sampler_name=sampler), steps=3)
        )
    finally:
        calls.close()
    second = hr_steps or 3
    # A1111 hands `steps` to sample_img2img: exactly that many, whatever the strength;
    # Heun evaluates twice per step but not on the last
    assert calls.count == 3 + second * per_step - (per_step - 1)


def test_the_lora_stack_applies_in_both_passes(service: Service) -> None:
    """A weight the LoRA changes, read at every UNet call: with the tag in the prompt both
    passes see it; a hires prompt without the tag runs its pass on the base weights."""
    service.generate(hires_request(HiresFix(), steps=1))
    unet = loaded_unet(service)
    layer = dict(unet.named_modules())["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    seen: list[float] = []
    handle = unet.register_forward_pre_hook(lambda *_: seen.append(float(layer.weight.sum())))
    try:
        base = float(layer.weight.sum())
        service.generate(hires_request(HiresFix(), prompt="a house <lora:ink:1>", steps=2))
        both = list(seen)
        seen.clear()
        service.generate(
            hires_request(HiresFix(prompt="a house"), prompt="a house <lora:ink:1>", steps=2)
        )
        split = list(seen)
    finally:
        handle.remove()
    assert len(both) == 4 and all(abs(value - base) > 1e-3 for value in both)
    assert all(abs(value - base) > 1e-3 for value in split[:2])
    assert all(value == base for value in split[2:])
    assert float(layer.weight.sum()) == base  # the next request starts from the base


def test_a_pasted_hires_infotext_replays_bit_identically(service: Service) -> None:
    wanted = hires_request(
        HiresFix(
            scale=1.5,
            upscaler="Latent (bicubic)",
            second_pass_steps=2,
            sampler_name="DPM++ 2M",
            prompt="a red house",
        ),
        prompt="a house <lora:ink:0.7>",
        subseed=9,
        subseed_strength=0.3,
    )
    result = service.generate(wanted)
    parsed = parse_infotext(result.infotexts[0])
    params = parsed.params
    replay = GenerationRequest(
        prompt=parsed.prompt,
        negative_prompt=parsed.negative_prompt,
        steps=int(params["Steps"]),
        sampler_name=params["Sampler"],
        scheduler=params["Schedule type"],
        cfg_scale=float(params["CFG scale"]),
        seed=int(params["Seed"]),
        subseed=int(params["Variation seed"]),
        subseed_strength=float(params["Variation seed strength"]),
        width=parsed.width or 0,
        height=parsed.height or 0,
        denoising_strength=float(params["Denoising strength"]),
        checkpoint="tiny-sd1",
        hires=hires_from_params(params),
    )
    again = service.generate(replay)
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(again.images[0]))
    assert again.infotexts == result.infotexts


def test_hires_bounds_name_the_field(service: Service) -> None:
    bounds = service.bounds()
    too_big = hires_request(HiresFix(scale=8.0), width=512, height=512)
    with pytest.raises(InvalidRequestError) as error:
        service.generate(too_big)
    assert error.value.field == "hr_scale" and str(bounds.max_size) in error.value.message
    with pytest.raises(InvalidRequestError) as error:
        service.generate(hires_request(HiresFix(scale=2.0), width=512, height=512, batch_size=2))
    assert error.value.field == "hr_scale" and "max-pixels" in error.value.message
    with pytest.raises(InvalidRequestError) as error:
        service.generate(hires_request(HiresFix(resize_x=4096)))
    assert error.value.field == "hr_resize_x"
    with pytest.raises(InvalidRequestError) as error:
        service.generate(hires_request(HiresFix(upscaler="Nope")))
    assert error.value.field == "hr_upscaler"


def test_interrupting_the_first_pass_skips_the_second(service: Service) -> None:
    from pipelines.interface import ProgressSnapshot

    def stop_early(snapshot: ProgressSnapshot) -> None:
        if snapshot.sampling_step >= 1:
            service.interrupt()

    job = service.submit(hires_request(HiresFix(), steps=4), on_progress=stop_early)
    result = service.result(job)
    assert result.interrupted
    assert all(image.size == (64, 64) for image in result.images)


# ------------------------------------------------------------------ hr_checkpoint_name


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Service:
    """`hrbase` (the tiny SD1) and `hrother` (the same with a different UNet), beside the
    shared tiny models (the SDXL one is of another family)."""
    from safetensors.torch import load_file, save_file

    from tests.conftest import DEMO_YAML, copy_yaml_with_clip

    folder = tmp_path_factory.mktemp("hr-checkpoints")
    state = load_file(models_dir / "tiny-sd1.safetensors")
    save_file(state, folder / "hrbase.safetensors")
    changed = {
        key: value * 1.3 if key.startswith("model.diffusion_model.out.") else value
        for key, value in state.items()
    }
    save_file(changed, folder / "hrother.safetensors")
    for name in ("hrbase", "hrother"):
        copy_yaml_with_clip(DEMO_YAML, folder / f"{name}.yaml")
    data = tmp_path_factory.mktemp("hr-checkpoints-data")
    settings = Settings(data_dir=data, ckpt_dirs=(folder, models_dir), threads=2)
    made = build_service(settings)
    made.folders.hash_missing()
    return made


def checkpoint_request(**fields: object) -> GenerationRequest:
    values = {**SMALL, "height": 64, "checkpoint": "hrbase", "denoising_strength": 0.6}
    values.update(fields)
    return GenerationRequest(**values)  # type: ignore[arg-type]


def test_hires_checkpoint_runs_the_second_pass_on_it(two_checkpoints: Service) -> None:
    service = two_checkpoints
    same = service.generate(checkpoint_request(hires=HiresFix(scale=1.5), steps=2))
    other = service.generate(
        checkpoint_request(hires=HiresFix(scale=1.5, checkpoint="hrother"), steps=2)
    )
    assert other.images[0].size == same.images[0].size == (96, 96)
    assert not np.array_equal(np.asarray(same.images[0]), np.asarray(other.images[0]))
    params = parse_infotext(other.infotexts[0]).params
    assert params["Model"] == "hrbase"  # A1111: Model is the first pass's
    hrother = service.resolve_checkpoint("hrother")
    assert params["Hires checkpoint"] == f"hrother [{hrother.short_hash}]"
    # naming the first pass's own checkpoint is no switch at all
    again = service.generate(
        checkpoint_request(hires=HiresFix(scale=1.5, checkpoint="hrbase"), steps=2)
    )
    assert np.array_equal(np.asarray(same.images[0]), np.asarray(again.images[0]))
    assert "Hires checkpoint" not in again.infotexts[0]


def test_hires_checkpoint_switches_back_for_each_batch(two_checkpoints: Service) -> None:
    """With two batches the second batch's first pass runs on the first checkpoint again:
    its image is the one a run of only that batch gives."""
    service = two_checkpoints
    hires = HiresFix(scale=1.5, checkpoint="hrother", upscaler="Lanczos")
    both = service.generate(checkpoint_request(hires=hires, steps=2, n_iter=2, seed=20))
    alone = service.generate(checkpoint_request(hires=hires, steps=2, seed=21))
    assert both.seeds == [20, 21]
    assert np.array_equal(np.asarray(both.images[1]), np.asarray(alone.images[0]))
    replay = hires_from_params(parse_infotext(both.infotexts[1]).params)
    assert replay is not None and replay.checkpoint == "hrother"
    replayed = service.generate(checkpoint_request(hires=replay, steps=2, seed=21))
    assert np.array_equal(np.asarray(replayed.images[0]), np.asarray(alone.images[0]))


def test_hires_checkpoint_errors_name_the_field(two_checkpoints: Service) -> None:
    from pipelines.errors import NotFoundError

    with pytest.raises(InvalidRequestError) as error:
        two_checkpoints.submit(checkpoint_request(hires=HiresFix(checkpoint="xl/tiny-sdxl")))
    assert error.value.field == "hr_checkpoint_name" and "SDXL" in error.value.message
    with pytest.raises(NotFoundError) as missing:
        two_checkpoints.submit(checkpoint_request(hires=HiresFix(checkpoint="nope")))
    assert missing.value.field == "hr_checkpoint_name"
