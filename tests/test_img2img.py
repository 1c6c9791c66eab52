"""img2img and inpainting through the real engine with tiny random models, checked against
A1111's rules: step counts, the original kept outside the (blurred) mask, "only masked"
geometry, strength 0 near the VAE round trip, inpainting UNets' extra channels, LoRAs."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.errors import InvalidRequestError
from pipelines.generation.img2img import encode_pixels, img2img_steps
from pipelines.imageops import blur_mask
from pipelines.infotext import parse_infotext
from pipelines.loading import LoadedModel, random_pipeline
from pipelines.schema import GenerationRequest, ImageInputs, LoraSpec
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

CONFIGS = Path(__file__).resolve().parents[1] / "pipelines" / "configs"
SMALL = {"steps": 10, "cfg_scale": 7.0, "sampler_name": "Euler", "seed": 5, "prompt": "a cat"}


def init_image(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    """Smooth colour gradients with some noise: an image a VAE can roughly keep."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    channels = [
        (x / width * 255),
        (y / height * 255),
        ((x + y) / (width + height) * 255),
    ]
    array = np.stack(channels, axis=-1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def box_mask(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Service:
    data = tmp_path_factory.mktemp("img2img")
    loras = data / "loras"
    keys = sd1_keys(SD1_MODULES)
    write(loras / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    settings = Settings(data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(loras,), threads=2)
    made = build_service(settings)
    made.folders.hash_missing()
    return made


def run(service: Service, inputs: ImageInputs, **fields: object) -> tuple[np.ndarray, object]:
    first = inputs.images[0]
    values = {**SMALL, "width": first.width, "height": first.height, "checkpoint": "tiny-sd1"}
    values.update(fields)
    result = service.generate(GenerationRequest(**values, img2img=inputs))  # type: ignore[arg-type]
    return np.asarray(result.images[0]).astype(int), result


class UNetCalls:
    """Counts the UNet's forward calls (and keeps the first call's input)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.count = 0
        self.first: torch.Tensor | None = None
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=False)

    def hook(self, module: object, args: tuple) -> None:
        self.count += 1
        if self.first is None:
            self.first = args[0].detach().clone()

    def close(self) -> None:
        self.handle.remove()


def loaded_unet(service: Service) -> torch.nn.Module:
    manager = service.runner.manager  # type: ignore[attr-defined]
    return manager.current.pipe.unet


# -- steps


@pytest.mark.parametrize(
    ("steps", "strength", "fix", "expected"),
    [
        (20, 0.75, False, (20, 15)),
        (20, 1.0, False, (20, 19)),  # min(strength, 0.999)
        (20, 0.0, False, (20, 0)),
        (10, 0.5, True, (20, 9)),
        (10, 0.3, True, (33, 9)),
        (10, 0.0, True, (10, 0)),  # no stretched schedule for strength 0
    ],
)
def test_img2img_steps_follow_a1111(
    steps: int, strength: float, fix: bool, expected: tuple[int, int]
) -> None:
    assert img2img_steps(steps, strength, fix) == expected


@pytest.mark.parametrize(
    ("sampler", "per_step", "last_saved"),
    [("Euler", 1, 0), ("DPM++ 2M", 1, 0), ("DDIM", 1, 0), ("Heun", 2, 1), ("DPM++ 2S a", 2, 1)],
)
@pytest.mark.parametrize(("strength", "fix"), [(0.5, False), (0.75, False), (0.5, True)])
def test_unet_calls_equal_a1111s_count(
    service: Service, sampler: str, per_step: int, last_saved: int, strength: float, fix: bool
) -> None:
    image = init_image(64, 64)
    inputs = ImageInputs(images=(image,), fix_steps=fix)
    run(service, inputs, steps=2)  # load the model first
    calls = UNetCalls(loaded_unet(service))
    try:
        run(service, inputs, sampler_name=sampler, denoising_strength=strength)
    finally:
        calls.close()
    _, t_enc = img2img_steps(10, strength, fix)
    # A1111 samples t_enc + 1 steps; Heun and DPM++ 2S a evaluate twice per step but not
    # on the last
    assert calls.count == (t_enc + 1) * per_step - last_saved


# -- strength


def test_strength_zero_stays_at_the_encoded_input_and_distance_grows(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Strength 0 is one step at the schedule's smallest sigma (0.03 for 10 Euler steps), so
    the latents stay near the encoded input: within 1% of how far strength 1 takes them
    (the random tiny UNet predicts noise ~15x the latents' size, so this is the honest
    scale; a trained model's strength-0 image is the VAE round trip to a grey level)."""
    from pipelines.generation import img2img

    kept: dict[str, torch.Tensor] = {}
    decode = img2img.Img2ImgRun.decode

    def keep(self: img2img.Img2ImgRun, inputs: object, latents: torch.Tensor) -> torch.Tensor:
        kept["moved"] = (latents - self.init_latents).norm() / self.init_latents.norm()
        return decode(self, inputs, latents)  # type: ignore[arg-type]

    monkeypatch.setattr(img2img.Img2ImgRun, "decode", keep)
    image = init_image(64, 64)
    inputs = ImageInputs(images=(image,))
    moved, pixels = [], []
    for strength in (0.0, 0.4, 0.8, 1.0):
        out, _ = run(service, inputs, denoising_strength=strength)
        moved.append(float(kept["moved"]))
        pixels.append(np.abs(out - np.asarray(image).astype(int)).mean())
    assert moved == sorted(moved), moved
    assert moved[0] < 0.01 * moved[-1], moved
    assert pixels[0] < pixels[-1], pixels


def test_same_request_same_pixels_and_infotext(service: Service) -> None:
    inputs = ImageInputs(images=(init_image(),), mask=box_mask((96, 64), (20, 16, 60, 48)))
    first, result = run(service, inputs, denoising_strength=0.6)
    second, _ = run(service, inputs, denoising_strength=0.6)
    assert np.array_equal(first, second)
    params = parse_infotext(result.infotexts[0]).params  # type: ignore[attr-defined]
    assert params["Denoising strength"] == "0.6"
    assert params["Mask blur"] == "4"
    assert params["Inpaint area"] == "Only masked"
    assert params["Masked content"] == "fill"
    assert params["Size"] == "96x64"


# -- inpainting


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_outside_the_mask_the_output_is_the_input(service: Service, fill: int) -> None:
    image = init_image()
    mask = box_mask(image.size, (30, 20, 62, 44))
    inputs = ImageInputs(images=(image,), mask=mask, inpaint_full_res=False, inpainting_fill=fill)
    out, result = run(service, inputs, denoising_strength=0.9)
    original = np.asarray(image).astype(int)
    blurred = np.asarray(blur_mask(mask, 4, 4))
    outside = blurred == 0
    assert np.array_equal(out[outside], original[outside])
    inside = np.asarray(mask) == 255
    assert np.abs(out[inside] - original[inside]).mean() > 5  # the masked part was repainted
    assert result.images[0].size == image.size  # type: ignore[attr-defined]


def test_only_masked_returns_an_input_sized_image(service: Service) -> None:
    image = init_image(160, 120)
    mask = box_mask(image.size, (100, 40, 130, 70))
    inputs = ImageInputs(images=(image,), mask=mask, inpaint_full_res_padding=8)
    out, result = run(service, inputs, width=64, height=64, denoising_strength=0.9)
    assert result.images[0].size == (160, 120)  # type: ignore[attr-defined]
    original = np.asarray(image).astype(int)
    outside = np.asarray(blur_mask(mask, 4, 4)) == 0
    assert np.array_equal(out[outside], original[outside])
    inside = np.asarray(mask) == 255
    assert np.abs(out[inside] - original[inside]).mean() > 5
    assert "Masked area padding: 8" in result.infotexts[0]  # type: ignore[attr-defined]


def test_blank_mask_with_only_masked_falls_back_to_img2img(service: Service) -> None:
    image = init_image(64, 64)
    inputs = ImageInputs(images=(image,), mask=Image.new("L", (64, 64), 0))
    _, result = run(service, inputs)
    assert any("mask is blank" in note for note in result.notes)  # type: ignore[attr-defined]


def test_a_mask_of_another_size_is_resized_with_a_note(service: Service) -> None:
    image = init_image(96, 64)
    mask = box_mask((48, 32), (10, 8, 30, 24))  # half size: the same region
    inputs = ImageInputs(
        images=(image,), mask=mask, inpaint_full_res=False, mask_blur_x=0, mask_blur_y=0
    )
    out, result = run(service, inputs, denoising_strength=0.9)
    assert any("resized to the image" in note for note in result.notes)  # type: ignore[attr-defined]
    # Lanczos (A1111's resize) rings up to 3 source pixels = 6 image pixels past the edge
    outside = np.asarray(box_mask((96, 64), (14, 10, 66, 54))) == 0
    assert np.array_equal(out[outside], np.asarray(image).astype(int)[outside])


def test_inverted_mask_repaints_the_rest(service: Service) -> None:
    image = init_image()
    mask = box_mask(image.size, (30, 20, 62, 44))
    inputs = ImageInputs(
        images=(image,),
        mask=mask,
        inpaint_full_res=False,
        inpainting_mask_invert=True,
        mask_blur_x=0,
        mask_blur_y=0,
    )
    out, result = run(service, inputs, denoising_strength=0.9)
    inside = np.asarray(mask) == 255
    assert np.array_equal(out[inside], np.asarray(image).astype(int)[inside])
    assert "Mask mode: Inpaint not masked" in result.infotexts[0]  # type: ignore[attr-defined]


# -- resize modes


@pytest.mark.parametrize("mode", [0, 1, 2, 3])
def test_every_resize_mode_gives_the_request_size(service: Service, mode: int) -> None:
    image = init_image(128, 64)  # 2:1 into a square
    out, result = run(
        service,
        ImageInputs(images=(image,), resize_mode=mode),
        width=64,
        height=64,
        denoising_strength=0.3,
    )
    assert result.images[0].size == (64, 64)  # type: ignore[attr-defined]


def test_several_init_images_make_one_batch(service: Service) -> None:
    images = (init_image(seed=1), init_image(seed=2))
    _, result = run(service, ImageInputs(images=images), batch_size=4, denoising_strength=0.2)
    assert len(result.images) == 2  # type: ignore[attr-defined]
    with pytest.raises(InvalidRequestError) as error:
        run(service, ImageInputs(images=images * 2), batch_size=2)
    assert error.value.field == "init_images"


def test_bad_image_inputs_name_the_field(service: Service) -> None:
    image = init_image()
    for inputs, field in (
        (ImageInputs(images=(image,), resize_mode=4), "resize_mode"),
        (ImageInputs(images=(image,), inpainting_fill=7), "inpainting_fill"),
        (ImageInputs(images=()), "init_images"),
    ):
        with pytest.raises(InvalidRequestError) as error:
            run(service, inputs) if inputs.images else service.generate(
                GenerationRequest(img2img=inputs)
            )
        assert error.value.field == field
    with pytest.raises(InvalidRequestError) as error:
        run(service, ImageInputs(images=(image,)), denoising_strength=1.5)
    assert error.value.field == "denoising_strength"


# -- LoRA


def test_a_lora_stack_applies_to_img2img(service: Service) -> None:
    inputs = ImageInputs(images=(init_image(),))
    plain, _ = run(service, inputs, denoising_strength=0.8)
    styled, result = run(service, inputs, denoising_strength=0.8, loras=(LoraSpec("ink", 1.0),))
    again, _ = run(service, inputs, denoising_strength=0.8)
    assert np.abs(plain - styled).mean() > 0.5
    assert np.array_equal(plain, again)  # the base weights came back
    assert "<lora:ink:1>" in result.infotexts[0]  # type: ignore[attr-defined]


# -- inpainting checkpoints


@pytest.fixture(scope="module")
def inpainting_service(tmp_path_factory: pytest.TempPathFactory) -> Service:
    """The demo model's shape with a 9-channel UNet (an SD1 inpainting checkpoint)."""
    folder = tmp_path_factory.mktemp("inpainting-model")
    text = (CONFIGS / "demo-tiny.yaml").read_text()
    text = text.replace(
        "in_channels: 4\n        out_channels", "in_channels: 9\n        out_channels"
    )
    text = text.replace("conditioning_key: crossattn", "conditioning_key: hybrid")
    (folder / "tiny-inpaint.yaml").write_text(text)
    shutil.copytree(CONFIGS / "demo-tiny-clip", folder / "demo-tiny-clip")
    loaded = random_pipeline(folder / "tiny-inpaint.yaml", 0, folder / "cache")
    assert loaded.pipe.unet.config.in_channels == 9
    settings = Settings(data_dir=folder, ckpt_dirs=(folder / "none",), threads=2)
    made = build_service(settings)
    made.runner.use_pipeline(loaded, "tiny-inpaint")  # type: ignore[attr-defined]
    return made


def test_an_inpainting_unet_gets_the_mask_and_masked_image(inpainting_service: Service) -> None:
    image = init_image(64, 64)
    mask = box_mask((64, 64), (16, 16, 48, 40))
    inputs = ImageInputs(
        images=(image,),
        mask=mask,
        inpaint_full_res=False,
        inpainting_fill=1,
        mask_blur_x=0,
        mask_blur_y=0,
    )
    request = GenerationRequest(**{**SMALL, "width": 64, "height": 64}, img2img=inputs)
    pipe = inpainting_service.runner.manager.current.pipe  # type: ignore[attr-defined]
    calls = UNetCalls(pipe.unet)
    try:
        result = inpainting_service.generate(request)
    finally:
        calls.close()
    assert calls.first is not None and calls.first.shape[1] == 9
    first = calls.first[0]  # the uncond row of item 0
    # independent: A1111's conditioning, mask rounded, image blanked under it, encoded
    repaint = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255)[None, None]
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    source = pixels * 2 - 1
    blanked = (source * (1 - repaint) + 1) / 2
    with torch.no_grad():
        expected_latents = encode_pixels(pipe.vae, blanked, torch.float32)[0]
    expected_mask = torch.nn.functional.interpolate(repaint, size=(8, 8))[0, 0]
    assert torch.equal(first[4], expected_mask)
    assert torch.allclose(first[5:], expected_latents, atol=1e-5)
    assert parse_infotext(result.infotexts[0]).params["Conditional mask weight"] == "1"
    outside = np.asarray(mask) == 0
    out = np.asarray(result.images[0]).astype(int)
    assert np.array_equal(out[outside], np.asarray(image).astype(int)[outside])


def test_every_sampler_inpaints_twice_alike_and_keeps_the_outside(service: Service) -> None:
    from pipelines.samplers import list_samplers

    image = init_image(64, 64)
    mask = box_mask(image.size, (16, 16, 48, 48))
    inputs = ImageInputs(
        images=(image,), mask=mask, inpaint_full_res=False, mask_blur_x=0, mask_blur_y=0
    )
    outside = np.asarray(mask) == 0
    original = np.asarray(image).astype(int)
    names = [str(item["name"]) for item in list_samplers()]
    assert len(names) > 10
    for name in names:
        first, _ = run(service, inputs, sampler_name=name, steps=4, denoising_strength=0.7)
        second, _ = run(service, inputs, sampler_name=name, steps=4, denoising_strength=0.7)
        assert np.array_equal(first, second), name
        assert np.array_equal(first[outside], original[outside]), name
        assert np.isfinite(first).all() and np.abs(first - original).mean() > 1, name


# -- SD upscale


def test_split_and_combine_grid_round_trip_exactly() -> None:
    from pipelines.imageops import combine_grid, split_grid

    image = init_image(200, 150)
    grid = split_grid(image, 64, 64, 16)
    xs = sorted({tile.x for _, row in grid.rows for tile in row})
    ys = [y for y, _ in grid.rows]
    assert xs[0] == 0 and xs[-1] == 200 - 64 and ys[0] == 0 and ys[-1] == 150 - 64
    assert all(b - a <= 64 - 16 for a, b in zip(xs, xs[1:], strict=False))  # overlap kept
    assert np.array_equal(np.asarray(combine_grid(grid)), np.asarray(image))


def test_sd_upscale_makes_the_upscaled_size_from_tiles(service: Service) -> None:
    from pipelines.schema import SdUpscale

    image = init_image(96, 80)
    inputs = ImageInputs(images=(image,), sd_upscale=SdUpscale(2.0, "Lanczos", 16))
    out, result = run(
        service,
        inputs,
        width=64,
        height=64,
        batch_size=2,
        n_iter=2,
        steps=3,
        denoising_strength=0.3,
    )
    assert [im.size for im in result.images] == [(192, 160)] * 2  # type: ignore[attr-defined]
    assert result.seeds == [5, 6]  # type: ignore[attr-defined]
    assert "Size: 64x64" in result.infotexts[0]  # type: ignore[attr-defined]
    # the top-left corner, before the next tiles' overlap, is the first tile batch's first
    # image: tiles 0 and 1 of the Lanczos-upscaled image, img2img'd with seeds 5 and 6
    from pipelines.imageops import split_grid

    upscaled = image.resize((192, 160), Image.Resampling.LANCZOS)
    grid = split_grid(upscaled, 64, 64, 16)
    first_row = grid.rows[0][1]
    alone, _ = run(
        service,
        ImageInputs(images=(first_row[0].image, first_row[1].image)),
        width=64,
        height=64,
        batch_size=2,
        steps=3,
        denoising_strength=0.3,
    )
    next_x, next_y = first_row[1].x, grid.rows[1][0]
    assert np.array_equal(out[:next_y, :next_x], alone[:next_y, :next_x])
    with pytest.raises(InvalidRequestError) as error:
        run(
            service,
            ImageInputs(images=(image,), sd_upscale=SdUpscale(1.0, "None", 16)),
            width=128,
            height=128,
        )
    assert error.value.field == "width"
