"""ControlNet units (sd-webui-controlnet compatible) through the real service with tiny
ControlNets built here from the tiny UNets (`ControlNetModel.from_unet`, output convolutions
made non-zero so they act), 64x64, few steps.

Each unit run is compared with a run made by hand: the tiny pipeline's own modules called in
a plain loop (diffusers' prompt encoding, the same seeded noise and Euler steps), the
ControlNet's residuals scaled as sd-webui-controlnet scales them and added to the UNet's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image
from safetensors.torch import save_file

from frontends.api.controlnet import control_types
from frontends.page.recall import recall
from pipelines.controlnet.models import controlnet_config, controlnet_from_state_dict
from pipelines.controlnet.preprocessors import (
    find_preprocessor,
    fit_map,
    pixel_perfect_resolution,
    sorted_preprocessors,
)
from pipelines.controlnet.units import a1111_sampling_step, soft_scales
from pipelines.errors import InvalidRequestError, LorastackError, NotFoundError
from pipelines.folders.controlnets import old_model_hash
from pipelines.imageops import resize_image
from pipelines.infotext import parse_infotext
from pipelines.loading import CONFIGS_DIR, LoadedModel, read_model_spec
from pipelines.samplers import make_scheduler, resolve_sampler
from pipelines.schema import (
    CONTROL_MODES,
    Bounds,
    ControlNetUnit,
    GenerationRequest,
    ImageInputs,
)
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.ldm_export import controlnet_to_ldm
from tests.test_api import API_PASSWORD, API_USER, SD1, THREADS, Server, call, start_app, stop_app
from tests.test_app_http import wait_for

CREDENTIALS = {"username": API_USER, "password": API_PASSWORD}

SMALL: dict[str, Any] = {
    "prompt": "a lighthouse on a cliff",
    "negative_prompt": "blurry",
    "steps": 2,
    "sampler_name": "Euler",
    "seed": 5,
    "width": 64,
    "height": 64,
    "checkpoint": "tiny-sd1",
}
CFG = 7.0


def tiny_controlnet(unet: Any, seed: int) -> ControlNetModel:
    """A ControlNet copied from `unet` with random (non-zero) output convolutions."""
    model = ControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block]:
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.3)
            conv.bias.copy_(torch.randn(conv.bias.shape, generator=generator) * 0.1)
        out = model.controlnet_cond_embedding.conv_out
        out.weight.copy_(torch.randn(out.weight.shape, generator=generator) * 0.3)
    return model.eval()


def control_image(seed: int = 0, size: tuple[int, int] = (64, 64)) -> Image.Image:
    """Shapes on a white background: something for every preprocessor to find."""
    width, height = size
    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    rng = np.random.default_rng(seed)
    for _ in range(3):
        x, y = rng.integers(0, width - 16), rng.integers(0, height - 16)
        color = tuple(int(c) for c in rng.integers(0, 200, 3))
        cv2.rectangle(canvas, (int(x), int(y)), (int(x) + 14, int(y) + 12), color, -1)
    cv2.line(canvas, (2, height - 3), (width - 3, 2), (0, 0, 0), 1)
    return Image.fromarray(canvas)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def nets(tiny_sd1: LoadedModel, tiny_sdxl: LoadedModel) -> dict[str, ControlNetModel]:
    return {
        "one": tiny_controlnet(tiny_sd1.pipe.unet, 1),
        "two": tiny_controlnet(tiny_sd1.pipe.unet, 2),
        "xl": tiny_controlnet(tiny_sdxl.pipe.unet, 3),
    }


@pytest.fixture(scope="module")
def controlnet_dir(
    tmp_path_factory: pytest.TempPathFactory, nets: dict[str, ControlNetModel]
) -> Path:
    """Every layout sd-webui-controlnet users share, and the files it runs that we do not."""
    folder = tmp_path_factory.mktemp("ControlNet")
    one = nets["one"]
    one.save_pretrained(folder / "tiny-cn")  # a diffusers folder
    nets["two"].save_pretrained(folder / "tiny-cn-two")
    nets["xl"].save_pretrained(folder / "tiny-cn-xl")
    ldm = controlnet_to_ldm(state_of(one), dict(one.config))
    save_file(ldm, folder / "tiny-cn-ldm.safetensors")
    prefixed = controlnet_to_ldm(state_of(one), dict(one.config), "control_model.")
    torch.save(prefixed, folder / "tiny-cn-ldm.pth")  # as the original training code saves
    save_file(state_of(one), folder / "tiny-cn-diffusers-keys.safetensors")

    def marker() -> torch.Tensor:
        return torch.zeros(1)

    unusable = {
        "control-lora.safetensors": {**ldm, "lora_controlnet": marker()},
        "lllite.safetensors": {"lllite_unet_input_blocks_1.down.0.weight": marker()},
        "t2i-adapter.safetensors": {"adapter.body.0.resnets.0.block1.weight": marker()},
        "union.safetensors": {**ldm, "control_add_embedding.linear_1.bias": marker()},
        "ip-adapter.safetensors": {
            "image_proj.proj.weight": marker(),
            "ip_adapter.1.to_k_ip.weight": marker(),
        },
        "not-a-controlnet.safetensors": {"weight": marker()},
    }
    for name, tensors in unusable.items():
        save_file(tensors, folder / name)
    (folder / "annotators" / "midas").mkdir(parents=True)
    save_file({"weight": marker()}, folder / "annotators" / "midas" / "model.safetensors")
    return folder


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, controlnet_dir: Path
) -> Service:
    data = tmp_path_factory.mktemp("controlnet-data")
    made = build_service(
        Settings(data_dir=data, ckpt_dirs=(models_dir,), controlnet_dir=controlnet_dir, threads=2)
    )
    made.folders.hash_missing()
    return made


def request(*units: ControlNetUnit, **fields: Any) -> GenerationRequest:
    return GenerationRequest(**{**SMALL, **fields}, controlnet=tuple(units))  # type: ignore[arg-type]


def unit(**fields: Any) -> ControlNetUnit:
    values = {"image": control_image(), "model": "tiny-cn", "resize_mode": "Just Resize"}
    return ControlNetUnit(**{**values, **fields})


def pixels(result: Any) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


# ------------------------------------------------------------------ the run by hand


HandUnit = tuple[ControlNetModel, torch.Tensor, list[float], bool, Callable[[int], bool]]
"""(model, hint [1, 3, H, W], scale per residual, conditioned rows only, acts at step)."""


def by_hand(pipe: Any, units: list[HandUnit], steps: int = 2, **fields: Any) -> Image.Image:
    """txt2img with ControlNet residuals in a plain diffusers-style loop."""
    values = {**SMALL, **fields}
    scheduler = make_scheduler(resolve_sampler("Euler", "automatic"), pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(
            values["prompt"], "cpu", 1, True, values["negative_prompt"]
        )
        hidden = torch.cat([negative, embeds])
        generator = torch.Generator().manual_seed(values["seed"])
        latents = torch.randn((1, 4, 8, 8), generator=generator) * scheduler.init_noise_sigma
        for step, timestep in enumerate(scheduler.timesteps):
            model_input = scheduler.scale_model_input(torch.cat([latents] * 2), timestep)
            total: list[torch.Tensor] | None = None
            for model, hint, scales, cond_only, acts in units:
                if not acts(step):
                    continue
                down, mid = model(
                    model_input,
                    timestep,
                    encoder_hidden_states=hidden,
                    controlnet_cond=hint.expand(2, -1, -1, -1),
                    return_dict=False,
                )
                outputs = [o * s for o, s in zip([*down, mid], scales, strict=True)]
                if cond_only:
                    outputs = [torch.cat([torch.zeros_like(o[:1]), o[1:]]) for o in outputs]
                if total is not None:
                    outputs = [a + b for a, b in zip(total, outputs, strict=True)]
                total = outputs
            extra = {}
            if total is not None:
                extra = {
                    "down_block_additional_residuals": total[:-1],
                    "mid_block_additional_residual": total[-1],
                }
            noise = pipe.unet(model_input, timestep, encoder_hidden_states=hidden, **extra).sample
            uncond, cond = noise.chunk(2)
            guided = uncond + CFG * (cond - uncond)
            latents = scheduler.step(guided, timestep, latents).prev_sample
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(decoded, output_type="pil")[0]


def hint_of(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None]


def always(step: int) -> bool:
    return True


def assert_close(made: Any, expected: Image.Image) -> None:
    difference = np.abs(pixels(made) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1, difference.max()


RESIDUALS = 5  # the tiny UNet: conv_in, 2 + 1 down-block outputs, the middle block


# ------------------------------------------------------------------ models and listing


def test_listing_names_usable_and_unusable_models(service: Service, controlnet_dir: Path) -> None:
    listed = {entry.relpath: entry for entry in service.controlnet_models()}
    assert "annotators/midas/model.safetensors" not in listed
    usable = ["tiny-cn", "tiny-cn-ldm.safetensors", "tiny-cn-ldm.pth"]
    usable += ["tiny-cn-diffusers-keys.safetensors", "tiny-cn-two", "tiny-cn-xl"]
    for name in usable:
        assert listed[name].error is None, listed[name].error
    file = controlnet_dir / "tiny-cn-ldm.safetensors"
    digest = hashlib.sha256(file.read_bytes()[0x100000:0x110000]).hexdigest()[:8]
    assert listed["tiny-cn-ldm.safetensors"].title == f"tiny-cn-ldm [{digest}]"
    assert old_model_hash(file) == digest
    assert listed["tiny-cn-xl"].family == "SDXL"
    assert listed["tiny-cn-ldm.safetensors"].layout == "ldm"
    reasons = {
        "control-lora.safetensors": "Control-LoRA",
        "lllite.safetensors": "LLLite",
        "t2i-adapter.safetensors": "T2I-Adapter",
        "union.safetensors": "Union",
        "ip-adapter.safetensors": "IP-Adapter",
        "not-a-controlnet.safetensors": "not a ControlNet",
    }
    for name, reason in reasons.items():
        assert reason in (listed[name].error or ""), (name, listed[name].error)
    with pytest.raises(LorastackError, match="Control-LoRA") as refused:
        service.generate(request(unit(model="control-lora")))
    assert refused.value.field == "controlnet[0].model"


def test_every_layout_loads_the_same_model(service: Service, nets: dict) -> None:
    """Folder, original layout (safetensors and a weights-only pickle with the
    `control_model.` prefix) and diffusers keys in one file: the same image."""
    images = [
        pixels(service.generate(request(unit(model=name))))
        for name in (
            "tiny-cn",
            "tiny-cn-ldm.safetensors",
            "tiny-cn-ldm.pth",
            "tiny-cn-diffusers-keys",
        )
    ]
    for other in images[1:]:
        assert np.array_equal(images[0], other)
    entry = service.folders.resolve("controlnet", "tiny-cn-ldm.pth")
    assert entry.layout == "ldm"  # the pickle's layout was learnt when it loaded


def test_bundled_sd15_config_is_the_published_one() -> None:
    """The config derived from the bundled v1 yaml is lllyasviel/control_v11p_sd15_*'s, and
    a file in the original SD1.5 layout converts into it (checked on the meta device)."""
    unet = read_model_spec(CONFIGS_DIR / "v1-inference.yaml").unet_config
    config = controlnet_config(unet)
    published = {
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "layers_per_block": 2,
        "conditioning_channels": 3,
        "conditioning_embedding_out_channels": [16, 32, 96, 256],
        "use_linear_projection": False,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    }
    assert {key: config[key] for key in published} == published
    with torch.device("meta"):
        model = ControlNetModel(**config)
    original = controlnet_to_ldm(model.state_dict(), dict(model.config), "control_model.")
    assert "control_model.input_hint_block.14.weight" in original
    assert "control_model.zero_convs.11.0.weight" in original
    shapes = {key: tuple(value.shape) for key, value in original.items()}
    derived = controlnet_config(unet, shapes, layout="ldm")
    loaded = controlnet_from_state_dict(original, derived, "ldm", "sd15")
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------ units in the run


def test_unit_weight_scales_the_residuals(
    service: Service, tiny_sd1: LoadedModel, nets: dict
) -> None:
    made = service.generate(request(unit(weight=0.7)))
    hint = hint_of(control_image())
    expected = by_hand(tiny_sd1.pipe, [(nets["one"], hint, [0.7] * RESIDUALS, False, always)])
    assert_close(made, expected)
    alone = service.generate(request())
    assert np.abs(pixels(made) - pixels(alone)).mean() > 2  # the unit did something
    assert len(made.detected_maps) == 1
    assert np.array_equal(np.asarray(made.detected_maps[0]), np.asarray(control_image()))


def test_weight_zero_is_no_unit(service: Service) -> None:
    made = service.generate(request(unit(weight=0.0)))
    alone = service.generate(request())
    assert np.array_equal(pixels(made), pixels(alone))


@pytest.mark.parametrize(
    "mode, cond_only",
    [("My prompt is more important", False), ("ControlNet is more important", True)],
)
def test_control_modes(
    service: Service, tiny_sd1: LoadedModel, nets: dict, mode: str, cond_only: bool
) -> None:
    """Soft weights 0.825 ** (12 - i) (the first of sd-webui-controlnet's 13 for the tiny
    UNet's 5 residuals); "ControlNet is more important" gives the uncond rows none."""
    made = service.generate(request(unit(weight=0.9, control_mode=mode)))
    scales = [0.9 * 0.825 ** (12 - i) for i in range(RESIDUALS)]
    assert soft_scales(0.9, RESIDUALS) == pytest.approx(scales)
    hint = hint_of(control_image())
    expected = by_hand(tiny_sd1.pipe, [(nets["one"], hint, scales, cond_only, always)])
    assert_close(made, expected)


def test_guidance_end_drops_the_unit(service: Service, tiny_sd1: LoadedModel, nets: dict) -> None:
    """sd-webui-controlnet stops a unit once A1111's sampling step / steps passes the end;
    A1111's sampling step lags one step behind (see `a1111_sampling_step`): with 6 steps
    and end 0.5 the unit acts in steps 0 to 4 and not in step 5."""
    acts = [a1111_sampling_step(step) / 6 <= 0.5 for step in range(6)]
    assert acts == [True, True, True, True, True, False]
    made = service.generate(request(unit(guidance_end=0.5), steps=6))
    hint = hint_of(control_image())
    expected = by_hand(
        tiny_sd1.pipe, [(nets["one"], hint, [1.0] * RESIDUALS, False, acts.__getitem__)], steps=6
    )
    assert_close(made, expected)
    whole = service.generate(request(unit(), steps=6))
    assert not np.array_equal(pixels(made), pixels(whole))
    late = service.generate(request(unit(guidance_start=0.5), steps=6))
    starts = [a1111_sampling_step(step) / 6 >= 0.5 for step in range(6)]
    expected = by_hand(
        tiny_sd1.pipe, [(nets["one"], hint, [1.0] * RESIDUALS, False, starts.__getitem__)], steps=6
    )
    assert_close(late, expected)


def test_two_units_add(service: Service, tiny_sd1: LoadedModel, nets: dict) -> None:
    second_image = control_image(seed=7)
    made = service.generate(
        request(unit(weight=0.6), unit(model="tiny-cn-two", image=second_image, weight=0.8))
    )
    expected = by_hand(
        tiny_sd1.pipe,
        [
            (nets["one"], hint_of(control_image()), [0.6] * RESIDUALS, False, always),
            (nets["two"], hint_of(second_image), [0.8] * RESIDUALS, False, always),
        ],
    )
    assert_close(made, expected)
    assert len(made.detected_maps) == 2


def test_sdxl_unit_with_a_batch_and_without_cfg(service: Service) -> None:
    """SDXL's size conditioning reaches the ControlNet; a batch of two and CFG 1 (no uncond
    pass: "ControlNet is more important" then has no uncond rows to spare) run too."""
    xl = {"checkpoint": "xl/tiny-sdxl", "batch_size": 2}
    for mode in CONTROL_MODES:
        made = service.generate(request(unit(model="tiny-cn-xl", control_mode=mode), **xl))
        alone = service.generate(request(**xl))
        assert len(made.images) == 2 and not np.array_equal(pixels(made), pixels(alone))
    flat = service.generate(request(unit(control_mode=CONTROL_MODES[2]), cfg_scale=1.0))
    plain = service.generate(request(unit(), cfg_scale=1.0))
    assert not np.array_equal(pixels(flat), pixels(plain))  # soft weights, all rows


def test_a_unit_for_another_family_is_refused(service: Service) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        service.generate(request(unit(model="tiny-cn-xl")))
    assert refused.value.field == "controlnet[0].model"
    assert "SDXL" in refused.value.message and "SD1" in refused.value.message
    with pytest.raises(NotFoundError) as unknown:
        service.generate(request(unit(model="no-such-controlnet")))
    assert unknown.value.field == "controlnet[0].model"
    with pytest.raises(InvalidRequestError, match="no ControlNet model"):
        service.generate(request(unit(model="None")))
    with pytest.raises(InvalidRequestError, match="unknown preprocessor") as module:
        service.generate(request(unit(module="nonsense")))
    assert module.value.field == "controlnet[0].module"
    with pytest.raises(InvalidRequestError, match="midas") as weighted:
        service.generate(request(unit(module="depth_midas")))
    assert "config.json" in weighted.value.message  # the fixture's folder has no config


@pytest.mark.parametrize(
    "change, field",
    [
        ({"weight": 2.5}, "controlnet[0].weight"),
        ({"guidance_start": 0.8, "guidance_end": 0.2}, "controlnet[0].guidance_start"),
        ({"control_mode": "Loud"}, "controlnet[0].control_mode"),
        ({"resize_mode": "Stretch"}, "controlnet[0].resize_mode"),
        ({"processor_res": 1.5}, "controlnet[0].processor_res"),
        ({"pixel_perfect": "yes"}, "controlnet[0].pixel_perfect"),
        ({"inpaint_crop_input_image": 1}, "controlnet[0].inpaint_crop_input_image"),
    ],
)
def test_bad_unit_fields_are_named(change: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as refused:
        request(unit(**change)).validated(Bounds())
    assert refused.value.field == field


def test_txt2img_unit_needs_an_image(service: Service) -> None:
    with pytest.raises(InvalidRequestError, match="no image") as refused:
        service.generate(request(replace(unit(), image=None)))
    assert refused.value.field == "controlnet[0].image"


def test_img2img_unit_uses_the_init_image(service: Service) -> None:
    """No unit image in img2img: the init image, with img2img's resize mode."""
    init = control_image(seed=3, size=(96, 64))
    img2img = ImageInputs(images=(init,), resize_mode=1)
    made = service.generate(request(replace(unit(), image=None), img2img=img2img))
    plain = service.generate(request(img2img=img2img))
    assert not np.array_equal(pixels(made), pixels(plain))
    expected = fit_map(np.asarray(init), "Crop and Resize", 64, 64)
    assert np.array_equal(np.asarray(made.detected_maps[0]), expected)


def test_only_masked_inpainting_crops_the_unit_image(service: Service) -> None:
    """sd-webui-controlnet: with "only masked", the unit's image is fitted to the init
    image's size (its resize mode), cropped to the mask's box, then fitted to the
    generation size with "Resize and Fill"; `inpaint_crop_input_image` False keeps it."""
    init = control_image(seed=3, size=(96, 64))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (40, 16, 72, 48))  # a 32x32 box: the 64x64 target's aspect, no growth
    img2img = ImageInputs(images=(init,), mask=mask, mask_blur_x=0, mask_blur_y=0)
    picture = control_image(seed=1, size=(128, 128))
    made = service.generate(request(unit(image=picture), img2img=img2img))
    cropped = resize_image(0, picture, 96, 64).crop((40, 16, 72, 48))
    expected = fit_map(np.asarray(resize_image(2, cropped, 64, 64)), "Just Resize", 64, 64)
    assert np.array_equal(np.asarray(made.detected_maps[0]), expected)
    kept = service.generate(
        request(unit(image=picture, inpaint_crop_input_image=False), img2img=img2img)
    )
    whole = fit_map(np.asarray(picture), "Just Resize", 64, 64)
    assert np.array_equal(np.asarray(kept.detected_maps[0]), whole)


def test_hires_fix_makes_a_hint_at_each_size(service: Service) -> None:
    from pipelines.schema import HiresFix

    made = service.generate(request(unit(), hires=HiresFix(scale=1.5, upscaler="Latent")))
    sizes = [image.size for image in made.detected_maps]
    assert sizes == [(96, 96), (64, 64)]  # sd-webui-controlnet: the hires map first


def test_infotext_is_sd_webui_controlnets(service: Service) -> None:
    made = service.generate(request(unit(module="canny", weight=0.5, pixel_perfect=True)))
    entry = service.folders.resolve("controlnet", "tiny-cn")
    text = parse_infotext(made.infotexts[0]).params["ControlNet 0"]
    assert text == (
        f"Module: canny, Model: {entry.title}, Weight: 0.5, Resize Mode: Just Resize, "
        "Processor Res: 64, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, "
        "Guidance End: 1.0, Pixel Perfect: True, Control Mode: Balanced"
    )
    assert f'ControlNet 0: "{text}"' in made.infotexts[0]


def test_pasted_infotext_restores_the_unit_and_says_what_it_cannot(service: Service) -> None:
    """PNG Info's "Send to txt2img": the unit's fields come back, the image (never in an
    infotext), a second unit and unknown fields are reported."""
    made = service.generate(
        request(
            unit(
                module="canny",
                weight=0.5,
                guidance_end=0.5,
                control_mode="My prompt is more important",
            ),
            unit(model="tiny-cn-two", resize_mode="Crop and Resize"),
        )
    )
    entry = service.folders.resolve("controlnet", "tiny-cn")
    found = recall(made.infotexts[0], service)
    cn = {k: v for k, v in found.values.items() if k.startswith("controlnet_")}
    assert cn == {
        "controlnet_enabled": True,
        "controlnet_module": "canny",
        "controlnet_model": entry.title,
        "controlnet_weight": 0.5,
        "controlnet_processor_res": 512.0,
        "controlnet_threshold_a": 100.0,
        "controlnet_threshold_b": 200.0,
        "controlnet_guidance_start": 0.0,
        "controlnet_guidance_end": 0.5,
        "controlnet_control_mode": "My prompt is more important",
        "controlnet_resize_mode": "Just Resize",
        "controlnet_pixel_perfect": False,
    }
    warnings = "\n".join(found.warnings)
    assert "ControlNet 0: the control image is not in the infotext" in warnings
    assert "ControlNet 1: not restored, the page has one ControlNet unit" in warnings
    # another hash of the same file name, an unknown model, a field the page lacks
    pasted = made.infotexts[0].replace(entry.title, "tiny-cn [00000000]")
    pasted = pasted.replace("Control Mode: My", "Hr Option: Both, Control Mode: My")
    again = recall(pasted, service)
    assert again.values["controlnet_model"] == entry.title
    warnings = "\n".join(again.warnings)
    assert f"model tiny-cn [00000000] recalled as {entry.title}" in warnings
    assert "not restored (the page's unit has no such field): Hr Option: Both" in warnings
    gone = recall(made.infotexts[0].replace(entry.title, "elsewhere [12345678]"), service)
    assert gone.values["controlnet_enabled"] is False
    assert "model elsewhere [12345678] is not a usable model" in "\n".join(gone.warnings)
    plain = recall("castle\nSteps: 2, Seed: 1, Size: 64x64", service)
    assert plain.values["controlnet_enabled"] is False  # no unit: the section is turned off


# ------------------------------------------------------------------ preprocessors


def test_module_list_order_is_sd_webui_controlnets() -> None:
    names = [p.name for p in sorted_preprocessors()]
    assert names == [
        "none",
        "tile_resample",
        "lineart_standard",
        "canny",
        "invert",
        "threshold",
        "scribble_xdog",
        "ip-adapter_face_id",
        "ip-adapter_clip_sdxl_plus_vith",
        "ip-adapter_clip_sdxl",
        "ip-adapter_clip_sd15",
        "blur_gaussian",
    ]


def run_module(name: str, image: np.ndarray, res: int = 64, a: float = -1, b: float = -1):
    module = find_preprocessor(name)
    return module(image, res, module.slider_1.effective(a), module.slider_2.effective(b))


def test_each_preprocessor_gives_its_map() -> None:
    image = np.asarray(control_image())
    white = np.all(image == 255, axis=2)
    flat = cv2.erode(white.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)

    assert np.array_equal(run_module("none", image), image)
    assert np.array_equal(run_module("invert", image), 255 - image)
    # canny: binary edges on the shapes' borders, nothing inside flat white
    edges = run_module("canny", image)
    assert set(np.unique(edges)) == {0, 255} and not edges[flat].any()
    assert np.array_equal(edges[:, :, 0], cv2.Canny(image, 100, 200))
    assert edges.shape == image.shape
    assert run_module("canny", image, res=128).shape == (128, 128, 3)  # at the resolution
    # threshold: white where every channel passes the threshold
    for level in (127, 250):
        binary = run_module("threshold", image, a=level)
        assert np.array_equal(binary[:, :, 0] == 255, image.min(axis=2) > level)
    # scribble_xdog: white strokes along the dark shapes, black in flat white
    strokes = run_module("scribble_xdog", image)
    assert set(np.unique(strokes)) <= {0, 255} and strokes.any() and not strokes[flat].any()
    # tile_resample: shrunk by the rate (below 1.1: unchanged)
    assert run_module("tile_resample", image, a=2.0).shape == (32, 32, 3)
    assert np.array_equal(run_module("tile_resample", image, a=1.0), image)
    # blur_gaussian: the image blurred with sigma = threshold a
    blurred = run_module("blur_gaussian", image, a=3.0)
    assert np.array_equal(blurred, cv2.GaussianBlur(image, (0, 0), 3.0))
    assert blurred.std() < image.std()
    # lineart_standard: light lines where the image is darker than around it, black else
    lines = run_module("lineart_standard", image)
    assert lines[flat].max() == 0 and lines[~white].mean() > 30
    assert np.all(lines[:, :, 0] == lines[:, :, 1])


def test_map_fits_the_size_by_resize_mode() -> None:
    wide = np.zeros((32, 64, 3), dtype=np.uint8)
    wide[:, :32] = 200  # left half light, right half dark
    wide[:, 32:] = 40
    cropped = fit_map(wide, "Crop and Resize", 32, 32)  # covers, cuts the centre
    assert cropped.shape == (32, 32, 3) and cropped[:, :15].min() == 200
    assert cropped[:, 17:].max() == 40
    filled = fit_map(wide, "Resize and Fill", 32, 32)  # fits inside, pads with the border
    assert filled.shape == (32, 32, 3) and filled[:8].std() == 0
    stretched = fit_map(wide, "Just Resize", 32, 32)
    assert stretched.shape == (32, 32, 3)
    assert pixel_perfect_resolution(wide, 64, 64, "Crop and Resize") == 64
    assert pixel_perfect_resolution(wide, 64, 64, "Resize and Fill") == 32


# ------------------------------------------------------------------ the live server


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, controlnet_dir: Path
) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("controlnet-api")
    args = ["--api", "--api-auth", f"{API_USER}:{API_PASSWORD}", "--ckpt-dir", str(models_dir)]
    args += ["--controlnet-dir", str(controlnet_dir), "--ckpt", SD1, "--threads", THREADS]
    process, url, log = start_app(args, data)
    try:
        wait_for(url, process)
        port = int(url.rsplit(":", 1)[1].strip("/"))
        yield Server(url, port, data, models_dir, data, log)
    finally:
        stop_app(process)


class ControlNetRoutes(Server):
    @property
    def api(self) -> str:
        return self.url + "controlnet"


def cn_call(server: Server, method: str, path: str, body: Any = None, **kw: Any) -> tuple:
    """A call to sd-webui-controlnet's routes (beside /sdapi/v1)."""
    routes = ControlNetRoutes(**{f: getattr(server, f) for f in server.__dataclass_fields__})
    return call(routes, method, path, body, **kw)


def test_webuiapi_controlnet_unit(server: Server, service: Service) -> None:
    import webuiapi

    client = webuiapi.WebUIApi(
        host="127.0.0.1", port=server.port, sampler="Euler", steps=2, **CREDENTIALS
    )
    try:
        title = service.folders.resolve("controlnet", "tiny-cn").title
        assert title in client.controlnet_model_list()
        assert client.controlnet_module_list()[:2] == ["none", "tile_resample"]
        assert client.controlnet_version() == 2
        made = client.txt2img(
            prompt=SMALL["prompt"],
            negative_prompt=SMALL["negative_prompt"],
            seed=5,
            width=64,
            height=64,
            cfg_scale=CFG,
            controlnet_units=[
                webuiapi.ControlNetUnit(
                    image=control_image(),
                    model=title,
                    weight=0.7,
                    resize_mode="Just Resize",
                    control_mode=1,  # My prompt is more important
                )
            ],
        )
        assert len(made.images) == 2  # the image, then the unit's map
        local = service.generate(
            request(unit(weight=0.7, control_mode="My prompt is more important"))
        )
        assert np.array_equal(np.asarray(made.images[0]), np.asarray(local.images[0]))
        assert np.array_equal(np.asarray(made.images[1]), np.asarray(control_image()))
        infotext = made.info["infotexts"][0]
        assert f'ControlNet 0: "Module: none, Model: {title}, Weight: 0.7' in infotext
        assert "Control Mode: My prompt is more important" in infotext
        detected = client.controlnet_detect([control_image()], module="canny", processor_res=128)
        edges = np.asarray(detected.images[0].convert("RGB"))  # at the processor resolution
        expected = run_module("canny", np.asarray(control_image()), res=128, a=64, b=64)
        assert edges.shape == (128, 128, 3) and np.array_equal(edges, expected)
    finally:
        client.session.close()


def test_controlnet_http_errors_name_the_unit(server: Server) -> None:
    import base64
    import io

    buffer = io.BytesIO()
    control_image().save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    disabled = {"enabled": False, "model": "whatever", "weight": 99}
    body = {**SMALL, "alwayson_scripts": {"ControlNet": {"args": [disabled, {}]}}}
    body["alwayson_scripts"]["ControlNet"]["args"][1] = {
        "image": image,
        "model": "tiny-cn",
        "weight": 2.5,
    }
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 422 and payload["detail"].startswith(
        "alwayson_scripts.controlnet.args[1].weight"
    )
    body["alwayson_scripts"]["ControlNet"]["args"][1] = {"image": image, "model": "nope"}
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 404 and payload["detail"].startswith(
        "alwayson_scripts.controlnet.args[1].model"
    )
    body["alwayson_scripts"]["ControlNet"]["args"][1] = {"image": image, "model": "tiny-cn-xl"}
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 422 and "SDXL" in payload["detail"]
    status, _, payload = call(
        server, "POST", "/txt2img", {**SMALL, "alwayson_scripts": {"adetailer": {"args": [1]}}}
    )
    assert status == 422 and payload["detail"].startswith("alwayson_scripts.adetailer")
    status, _, payload = cn_call(server, "GET", "/version", auth=None)
    assert status == 401
    status, _, payload = cn_call(server, "POST", "/detect", {"controlnet_module": "canny"})
    assert status == 422 and "No image" in payload["detail"]
    status, _, payload = cn_call(server, "GET", "/module_list?alias_names=true")
    assert status == 200 and "invert (from white bg & black line)" in payload["module_list"]
    assert payload["module_detail"]["canny"]["sliders"][1]["name"] == "Low Threshold"
    status, _, payload = cn_call(server, "GET", "/model_list")
    assert "Control-LoRA" in " ".join(payload["unusable"].values())


def test_control_types_are_sd_webui_controlnets(server: Server) -> None:
    entries = [
        SimpleNamespace(title=title, error=error)
        for title, error in (
            ("control_sd15_canny [fef5e48e]", None),
            ("control_v11p_sd15_canny [d14c016b]", None),
            ("ip-adapter_sd15 [6a3f6166]", None),
            ("control_v11f1e_sd15_tile [a371b31b]", "unusable"),
        )
    ]
    types = control_types(sorted_preprocessors(), entries)["control_types"]
    assert types["Canny"] == {
        "module_list": ["none", "canny", "invert (from white bg & black line)"],
        "model_list": [
            "None",
            "control_sd15_canny [fef5e48e]",
            "control_v11p_sd15_canny [d14c016b]",
        ],
        "default_option": "canny",
        "default_model": "control_v11p_sd15_canny [d14c016b]",  # a v1.1 model is preferred
    }
    assert types["IP-Adapter"]["model_list"] == ["None", "ip-adapter_sd15 [6a3f6166]"]
    assert types["IP-Adapter"]["default_option"] == "ip-adapter_face_id"  # the extension's rule
    assert types["Tile"]["model_list"] == ["None"]  # an unusable model is not offered
    assert types["Tile"]["default_model"] == "None"
    assert types["All"]["module_list"][0] == "none" and types["All"]["default_option"] == "none"
    status, _, payload = cn_call(server, "GET", "/control_types")
    assert status == 200 and payload["control_types"]["Tile"]["module_list"] == [
        "none",
        "tile_resample",
        "blur_gaussian",
    ]
