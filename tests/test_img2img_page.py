"""The img2img tab's page logic: the sub-tabs' values become the request's ImageInputs
with A1111's page defaults, missing images are named, sizes follow the upload, and each
sub-tab's request runs on the tiny engine."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from frontends.page.img2img_tab import (
    build_images,
    build_options,
    fit_size,
    image_request,
    load_image,
    painted_mask,
    stack_text,
)
from frontends.page.recall import recall
from frontends.page.ui import selected_path
from pipelines.errors import InvalidRequestError
from pipelines.outpainting import outpaint_size
from pipelines.schema import Bounds, ImageInputs, Outpaint, SdUpscale, request_from_dict
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_image_bombs import bomb


@pytest.fixture(scope="module")
def page_values() -> dict[str, Any]:
    """What the tab sends before the user changes anything (preprocessed like an event's
    inputs: radios as indices). Built in an event loop, as Gradio wants (test_files_tab)."""

    async def build() -> dict[str, Any]:
        with gr.Blocks():
            panel = build_images(["None", "Lanczos", "Nearest"])
            build_options(panel)
        return {name: c.preprocess(c.value) for name, c in panel.values.items()}

    return asyncio.run(build())


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), np.uint8))
    mask = Image.new("L", (96, 64))
    mask.paste(255, (24, 16, 40, 32))
    painted = Image.new("RGBA", (96, 64))
    painted.paste((255, 255, 255, 255), (24, 16, 40, 32))
    paths = {"image": tmp_path / "image.png", "mask": tmp_path / "mask.png"}
    image.save(paths["image"])
    mask.save(paths["mask"])
    painted.save(tmp_path / "layer.png")
    return {**{k: str(v) for k, v in paths.items()}, "layer": str(tmp_path / "layer.png")}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Service:
    data = tmp_path_factory.mktemp("img2img-page")
    (data / "models").mkdir()
    service = build_service(Settings(data_dir=data, threads=2))
    service.select_checkpoint(None)
    return service


def with_mode(values: dict[str, Any], mode: str, files: dict[str, str]) -> dict[str, Any]:
    editor = {"background": files["image"], "layers": [files["layer"]], "composite": None}
    return {
        **values,
        "mode": mode,
        "image": files["image"],
        "editor": editor,
        "upload_image": files["image"],
        "upload_mask": files["mask"],
        "outpaint_image": files["image"],
    }


def test_page_defaults_are_a1111s(page_values: dict[str, Any], files: dict[str, str]) -> None:
    inputs, size = image_request(with_mode(page_values, "inpaint", files))
    assert size is None and inputs.images[0].size == (96, 64)
    assert (inputs.mask_blur_x, inputs.mask_blur_y, inputs.inpainting_fill) == (4, 4, 1)
    assert not inputs.inpaint_full_res and inputs.inpaint_full_res_padding == 32
    assert not inputs.inpainting_mask_invert and inputs.resize_mode == 0
    assert inputs.mask.getchannel("A").getbbox() == (24, 16, 40, 32)
    inputs, _ = image_request(with_mode(page_values, "img2img", files))
    assert inputs.mask is None and inputs.outpaint is None and inputs.resize_mode == 0
    assert page_values["script"] == "None" and inputs.sd_upscale is None
    # SD upscale's page defaults, as A1111's script: overlap 64, scale 2, the first upscaler
    script = {**page_values, "script": "SD upscale"}
    inputs, _ = image_request(with_mode(script, "img2img", files))
    assert inputs.sd_upscale == SdUpscale(scale=2.0, upscaler="None", overlap=64)


def test_inpaint_options_and_outpaint_canvas(
    page_values: dict[str, Any], files: dict[str, str]
) -> None:
    chosen = {"mask_mode": 1, "inpaint_area": 1, "inpaint_padding": 8, "inpainting_fill": 2}
    values = with_mode({**page_values, **chosen, "resize_mode": 1}, "inpaint_upload", files)
    inputs, _ = image_request(values)
    assert inputs.inpainting_mask_invert and inputs.inpaint_full_res
    assert inputs.inpaint_full_res_padding == 8 and inputs.inpainting_fill == 2
    assert inputs.resize_mode == 1
    assert inputs.mask.convert("L").getbbox() == (24, 16, 40, 32)

    values = with_mode({**page_values, "outpaint_directions": ["down", "left"]}, "outpaint", files)
    inputs, size = image_request(values)
    assert inputs.outpaint == Outpaint(directions=("left", "down"))  # mk2, 128 px, blur 8
    assert inputs.mask is None and size == outpaint_size(96, 64, inputs.outpaint)
    poor = {"outpaint_method": "poor man's outpainting", "outpaint_pixels": 64}
    inputs, _ = image_request(with_mode({**page_values, **poor}, "outpaint", files))
    assert inputs.outpaint.pixels == 64 and inputs.inpainting_fill == 0  # poor man's: fill


@pytest.mark.parametrize(
    ("mode", "missing", "message"),
    [
        ("img2img", "image", "img2img: upload an image first"),
        ("inpaint", "editor", "Inpaint: upload an image first"),
        ("inpaint_upload", "upload_image", "Inpaint upload: upload an image first"),
        ("inpaint_upload", "upload_mask", "Inpaint upload: upload a mask (white = repaint)"),
        ("outpaint", "outpaint_image", "Outpaint: upload an image first"),
    ],
)
def test_a_missing_image_is_named(
    page_values: dict[str, Any], files: dict[str, str], mode: str, missing: str, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        image_request({**with_mode(page_values, mode, files), missing: None})


def test_inpaint_without_a_painted_stroke_is_refused(
    page_values: dict[str, Any], files: dict[str, str], tmp_path: Path
) -> None:
    Image.new("RGBA", (96, 64)).save(tmp_path / "blank.png")
    values = with_mode(page_values, "inpaint", files)
    for layers in ([], [str(tmp_path / "blank.png")]):
        values["editor"] = {**values["editor"], "layers": layers}
        with pytest.raises(InvalidRequestError, match="paint over the part of the image"):
            image_request(values)


def test_painted_layers_merge_into_one_mask() -> None:
    first = Image.new("RGBA", (32, 16))
    first.putpixel((3, 4), (255, 255, 255, 200))
    second = Image.new("RGBA", (16, 8), (255, 255, 255, 0))
    second.putpixel((15, 7), (255, 255, 255, 255))  # half size: scaled to the image
    mask = painted_mask([first, second], (32, 16))
    assert mask.size == (32, 16) and mask.getpixel((3, 4))[3] == 200
    assert mask.getchannel("A").getbbox()[2:] == (32, 16)
    assert painted_mask([Image.new("RGBA", (32, 16))], (32, 16)) is None


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((128, 96), (128, 96)),
        ((100, 70), (96, 64)),
        ((50, 40), (64, 64)),
        ((3000, 100), (2048, 64)),
    ],
)
def test_upload_size_is_rounded_down_to_8_within_bounds(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert fit_size(*size, Bounds(max_pixels=4096 * 4096)) == expected


def test_upload_size_keeps_under_the_pixel_limit() -> None:
    width, height = fit_size(4000, 3000, Bounds())
    assert width * height <= Bounds().max_pixels and width % 8 == height % 8 == 0
    assert abs(width / height - 4 / 3) < 0.02


def test_a_bomb_is_refused_before_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb())
    with pytest.raises(InvalidRequestError, match="67,108,864 pixels"):
        load_image(str(path), "init_images", "")


def test_gallery_selection_and_stack_line() -> None:
    gallery = [("/a.png", "seed 1"), ("/b.png", "seed 2")]
    assert selected_path(gallery, 1) == "/b.png" and selected_path(gallery, 5) == "/b.png"
    assert selected_path(None, 0) is None and selected_path([], 0) is None
    rows = [{"name": "ink", "weight": 0.8}, {"name": "glow", "weight": -1}]
    assert "ink 0.8, glow -1" in stack_text(rows)
    assert "empty" in stack_text("not json")


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "inpaint_upload", "outpaint"])
def test_each_sub_tab_runs_on_the_engine(
    service: Service, page_values: dict[str, Any], files: dict[str, str], mode: str
) -> None:
    inputs, size = image_request(with_mode(page_values, mode, files))
    width, height = size or (96, 64)
    request = request_from_dict(
        {"prompt": "x", "steps": 2, "seed": 1, "width": width, "height": height, "img2img": inputs}
    )
    result = service.generate(request)
    image = result.images[0]
    assert image.size == (width // 8 * 8, height // 8 * 8)
    if mode in ("inpaint", "inpaint_upload"):  # far from the mask: the original's pixels
        original = np.asarray(Image.open(files["image"]).convert("RGB"))
        assert np.array_equal(np.asarray(image)[:4], original[:4])


def test_sd_upscale_from_the_page_tiles_the_upscaled_image(
    service: Service, page_values: dict[str, Any], files: dict[str, str]
) -> None:
    chosen = {
        "script": "SD upscale",
        "sd_upscale_scale": 1.5,
        "sd_upscale_upscaler": "Lanczos",
        "sd_upscale_overlap": 16,
    }
    inputs, size = image_request(with_mode({**page_values, **chosen}, "img2img", files))
    assert size is None
    tiles = {"prompt": "x", "steps": 2, "seed": 3, "width": 64, "height": 64}
    result = service.generate(request_from_dict({**tiles, "img2img": inputs}))
    assert result.images[0].size == (144, 96)  # 96x64 x 1.5, tiled at 64x64
    # the page's request is the API's: the same script values give the same pixels
    api = SdUpscale(scale=1.5, upscaler="Lanczos", overlap=16)
    image = load_image(files["image"], "init_images", "")
    same = service.generate(
        request_from_dict({**tiles, "img2img": ImageInputs((image,), sd_upscale=api)})
    )
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(same.images[0]))


def test_sending_an_img2img_image_recalls_its_denoising_strength(service: Service) -> None:
    text = "a cat\nSteps: 4, Seed: 5, Size: 96x64, Denoising strength: 0.4, Mask blur: 4"
    assert recall(text, service).values["denoising_strength"] == 0.4


def test_sending_an_image_recalls_the_styles_its_prompts_carry(
    service: Service, tmp_path: Path
) -> None:
    """Send to img2img/inpaint selects the styles in the tab's Styles box and removes their
    text from the prompts, as PNG Info's Send to txt2img does."""
    from frontends.page.img2img_tab import SendTargets
    from pipelines.infotext import write_png_with_infotext
    from pipelines.styles import PromptStyle

    service.save_style(PromptStyle("frame", "masterpiece, {prompt}", "{prompt}, lowres"))
    try:
        text = "masterpiece, a cat\nNegative prompt: fog, lowres\nSteps: 4, Seed: 5, Size: 96x64"
        path = tmp_path / "styled.png"
        path.write_bytes(write_png_with_infotext(Image.new("RGB", (96, 64)), text))
        targets = SendTargets(service, Bounds(), *[None] * 7)  # type: ignore[arg-type]
        fields = targets.recalled(str(path))[0]
        assert fields["styles"] == ["frame"]
        assert (fields["prompt"], fields["negative_prompt"]) == ("a cat", "fog")
    finally:
        service.delete_style("frame")


def test_send_seed_and_send_size_off_leave_the_tabs_seed_and_size(
    service: Service, tmp_path: Path
) -> None:
    """A1111's `send_seed` / `send_size` options (on by default) for Send to img2img."""
    from frontends.page.img2img_tab import SendTargets
    from pipelines.infotext import write_png_with_infotext
    from pipelines.interface import PasteOptions

    text = "a cat\nSteps: 4, Seed: 5, Size: 96x64"
    path = tmp_path / "sent.png"
    path.write_bytes(write_png_with_infotext(Image.new("RGB", (96, 64)), text))
    targets = SendTargets(service, Bounds(), *[None] * 7)  # type: ignore[arg-type]
    fields = targets.recalled(str(path))[0]
    assert (fields["seed"], fields["width"], fields["height"]) == (5, 96, 64)
    try:
        service.set_paste_options(PasteOptions(send_seed=False, send_size=False))
        fields = targets.recalled(str(path))[0]
        assert not {"seed", "width", "height"} & set(fields) and fields["steps"] == 4
    finally:
        service.set_paste_options(PasteOptions())
