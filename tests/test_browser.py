"""The page in headless Chromium (Debian's `chromium`, driven by Playwright): stack two
LoRAs, generate, read the parameters; pick up a new LoRA file; PNG Info round trip;
inpaint a mask painted with the mouse; send a txt2img image to img2img and inpaint;
upscale in Extras with a tiny model upscaler and send the result back to Extras; Hires fix
with a model upscaler, then recalled through PNG Info; an SD VAE chosen, then recalled;
an embedding added to the prompt from its card; a ControlNet unit with a canny map.

Needs /usr/bin/chromium (the README test command installs it). Screenshots go to
tests/artifacts/.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from playwright import sync_api
from safetensors.torch import save_file

from pipelines.infotext import parse_infotext
from pipelines.loading import LoadedModel
from tests.test_app_http import app_server
from tests.test_controlnet import control_image, tiny_controlnet
from tests.test_embeddings import word_vectors
from tests.test_ui import make_lora_folder
from tests.test_vae import shifted, vae_file_weights
from tests.upscaler_files import write_esrgan

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
TIMEOUT_MS = 60_000  # a wait, not a speed check: the suite runs two workers on 2 cores

if not CHROMIUM.exists():  # the README's test command installs it; never skip silently
    raise RuntimeError(f"{CHROMIUM} is missing: apt-get install -y chromium")


@pytest.fixture(scope="module")
def app(
    tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel, tiny_sdxl: LoadedModel
) -> Iterator[tuple[str, Path]]:
    data = tmp_path_factory.mktemp("browser")
    make_lora_folder(data / "loras", tiny_sd1.pipe, tiny_sdxl.pipe)
    write_esrgan(data / "models" / "ESRGAN" / "2x_tiny.safetensors", scale=2)
    bright = shifted(vae_file_weights(tiny_sd1.pipe.vae), "decoder.conv_out.bias")
    (data / "models" / "VAE").mkdir()
    save_file(bright, data / "models" / "VAE" / "bright.safetensors")  # fits the demo model
    (data / "embeddings").mkdir()
    castle = word_vectors(tiny_sd1.pipe, "castle")  # the demo model is the tiny SD1
    save_file({"emb_params": castle}, data / "embeddings" / "mycastle.safetensors")
    xl = {
        "clip_l": word_vectors(tiny_sdxl.pipe, "castle"),
        "clip_g": word_vectors(tiny_sdxl.pipe, "castle", "text_encoder_2"),
    }
    save_file(xl, data / "embeddings" / "xlcastle.safetensors")  # greyed out: not for SD1
    controlnets = data / "models" / "ControlNet"
    tiny_controlnet(tiny_sd1.pipe.unet, 1).save_pretrained(controlnets / "tiny-canny")
    save_file({"lora_controlnet": torch.zeros(1)}, controlnets / "control-lora.safetensors")
    with app_server(data) as url:
        yield url, data


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: object, app: tuple[str, Path]) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(app[0])
    page.locator("#generate").wait_for()
    page.wait_for_function("() => document.documentElement.dataset.defaultsLoaded === '1'")
    try:
        yield page
    finally:
        context.close()


def set_number(page: object, elem_id: str, value: float) -> None:
    """Type into a slider's or number's box, as a user does, and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def card(page: object, name: str) -> object:
    return page.locator(".lora-card").filter(has=page.locator(".lora-name", has_text=f"{name}"))


def add_lora(page: object, name: str, weight: float) -> None:
    card(page, name).get_by_role("button", name="Add").click()
    row = page.locator(".stack-row").filter(has_text=name)
    row.wait_for()
    box = row.locator("input[type=number]").first
    box.fill(str(weight))
    box.press("Enter")


def infotext(page: object) -> str:
    field = page.locator("#infotext textarea")
    page.wait_for_function(
        "() => document.querySelector('#infotext textarea').value.includes('Steps:')"
    )
    return field.input_value()


def shot(page: object, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    return path


def test_stack_three_loras_generate_and_read_parameters(page: object) -> None:
    xl = card(page, "xl-only")
    assert "lora-incompatible" in (xl.get_attribute("class") or "")
    assert "made for SDXL; the checkpoint is SD1" in xl.inner_text()
    assert xl.get_by_role("button", name="Add").is_disabled()

    page.locator("#prompt textarea").fill("a lighthouse at dusk")
    for elem_id, value in (("steps", 2), ("width", 64), ("height", 64)):
        set_number(page, elem_id, value)
    set_number(page, "seed", 1234)
    add_lora(page, "ink", 0.65)
    add_lora(page, "glow", -0.5)
    add_lora(page, "soft", 1.2)
    card(page, "soft").get_by_role("button", name="Triggers").click()
    page.wait_for_function(
        "() => document.querySelector('#prompt textarea').value.includes('soft light')"
    )
    page.locator("#prompt textarea").press("Control+Enter")
    page.locator("#gallery img").first.wait_for()
    text = infotext(page)
    parsed = parse_infotext(text)
    assert "<lora:ink:0.65>" in parsed.prompt and "<lora:glow:-0.5>" in parsed.prompt
    assert "<lora:soft:1.2>" in parsed.prompt and "soft light" in parsed.prompt
    assert set(parsed.lora_hashes) == {"ink", "glow", "soft"}
    assert parsed.params["Seed"] == "1234"
    shot(page, "txt2img-3-lora-stack.png")

    page.locator("#prompt textarea").fill("a lighthouse <lora:ink:0.3>")
    page.locator("#stack_notes").filter(has_text="replaces the stack weight").wait_for()


def test_a_stack_rows_block_weights_reach_the_image(page: object) -> None:
    """A row's expandable per-block section: a preset, then the in/mid/out sliders, each
    written into the infotext's tag."""
    page.locator("#prompt textarea").fill("a lighthouse")
    for elem_id, value in (("steps", 2), ("width", 64), ("height", 64), ("seed", 5)):
        set_number(page, elem_id, value)
    add_lora(page, "ink", 0.65)
    page.get_by_text("ink: block weights").click()
    page.locator(".stack-block-preset input").click()
    page.get_by_role("option", name="OUTALL", exact=True).click()
    page.locator("#generate").click()
    page.wait_for_function(
        "() => document.querySelector('#infotext textarea').value.includes('lbw=OUTALL')"
    )
    assert "<lora:ink:0.65:lbw=OUTALL>" in parse_infotext(infotext(page)).prompt
    shot(page, "txt2img-lora-block-weights.png")

    page.locator(".stack-block-preset input").click()
    page.get_by_role("option", name="(sliders)").click()
    for key in ("in", "mid"):
        box = page.locator(f".stack-block-{key} input[type=number]").first
        box.fill("0")
        box.press("Enter")
    page.locator("#generate").click()
    page.wait_for_function(
        "() => document.querySelector('#infotext textarea').value.includes('in=0:mid=0')"
    )
    assert "<lora:ink:0.65:in=0:mid=0:out=1>" in parse_infotext(infotext(page)).prompt


def test_new_lora_file_appears_after_refresh(page: object, app: tuple[str, Path]) -> None:
    loras = app[1] / "loras"
    assert card(page, "fresh").count() == 0
    shutil.copy(loras / "glow.safetensors", loras / "fresh.safetensors")
    page.locator("#lora_refresh").click()
    card(page, "fresh").wait_for()
    page.locator("#lora_search input, #lora_search textarea").first.fill("fresh")
    page.wait_for_function("() => document.querySelectorAll('.lora-card').length === 1")


def test_a_few_step_loras_card_suggests_and_applies_its_settings(
    page: object, app: tuple[str, Path]
) -> None:
    """An LCM-LoRA (by its file name) shows the LCM card settings; one click puts sampler,
    schedule type, steps and CFG into the form, and the image is made with them."""
    loras = app[1] / "loras"
    shutil.copy(loras / "glow.safetensors", loras / "lcm-lora-sdv1-5.safetensors")
    page.locator("#lora_refresh").click()
    lcm = card(page, "lcm-lora-sdv1-5")
    lcm.wait_for()
    assert "LCM: LCM · Automatic · 4 steps (2–8) · CFG 1.5 (1–2)" in lcm.inner_text()
    assert card(page, "ink").get_by_role("button", name="Use suggested settings").count() == 0
    lcm.get_by_role("button", name="Use suggested settings").click()
    page.wait_for_function(
        "() => document.querySelector('#steps input[type=number]').value === '4'"
    )
    assert page.get_by_label("Sampling method").input_value() == "LCM"
    assert page.get_by_label("Schedule type").input_value() == "Automatic"
    assert page.locator("#cfg_scale input[type=number]").input_value() == "1.5"
    lcm.scroll_into_view_if_needed()
    ARTIFACTS.mkdir(exist_ok=True)
    lcm.screenshot(path=str(ARTIFACTS / "fewstep-card.png"))
    for elem_id, value in (("width", 64), ("height", 64)):
        set_number(page, elem_id, value)
    page.locator("#prompt textarea").fill("a lighthouse")
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for()
    params = parse_infotext(infotext(page)).params
    assert params["Sampler"] == "LCM" and params["Steps"] == "4" and params["CFG scale"] == "1.5"


def test_png_info_round_trip(page: object, app: tuple[str, Path]) -> None:
    saved = sorted((app[1] / "outputs").rglob("*.png"))
    assert saved, "the generate test saves an image first"
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(saved[0]))
    page.wait_for_function(
        "() => document.querySelector('#pnginfo_text textarea').value.includes('Seed: 1234')"
    )
    shot(page, "png-info.png")
    page.locator("#send_to_txt2img").click()
    made = parse_infotext(parse_and_keep(saved[0])).prompt  # the stack's rows as tags
    assert made.startswith("a lighthouse at dusk, soft light") and "<lora:glow:" in made
    sync_api.expect(page.locator("#prompt textarea")).to_have_value(made)  # as A1111: kept
    assert page.locator("#seed input").first.input_value() == "1234"
    sync_api.expect(page.locator(".stack-row")).to_have_count(0)  # no LoRA twice
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for()
    assert infotext(page) == parse_and_keep(saved[0])


def parse_and_keep(path: Path) -> str:
    from pipelines.infotext import read_infotext

    return read_infotext(path) or ""


def test_upload_in_the_add_files_tab(page: object, app: tuple[str, Path], tmp_path: Path) -> None:
    loras = app[1] / "loras"
    upload = tmp_path / "brush.safetensors"
    shutil.copy(loras / "ink.safetensors", upload)
    page.get_by_role("tab", name="Add files").click()
    page.locator("#upload_files input[type=file]").set_input_files(str(upload))
    page.locator("#upload_files").get_by_text("brush.safetensors").first.wait_for()
    page.locator("#upload_add").click()
    result = page.locator("#upload_result").filter(has_text="brush.safetensors: LoRA")
    result.wait_for()
    assert "added as" in result.inner_text() and str(app[1]) in result.inner_text()
    shot(page, "add-files.png")
    assert (loras / "brush.safetensors").read_bytes() == upload.read_bytes()
    page.get_by_role("tab", name="txt2img").click()
    card(page, "brush").wait_for()  # listed at once, no refresh needed


def test_extra_seed_row_and_tiling(page: object) -> None:
    page.locator("#prompt textarea").fill("a tiled wall")
    for elem_id, value in (("steps", 2), ("width", 64), ("height", 64), ("seed", 5)):
        set_number(page, elem_id, value)
    page.locator("#seed_extras").get_by_text("Extra seed options").click()
    page.locator("#subseed_strength input[type=range]").wait_for(state="visible")
    set_number(page, "subseed_strength", 0.4)
    set_number(page, "subseed", 77)
    page.locator("#tiling input[type=checkbox]").check()
    set_number(page, "eta_noise_seed_delta", 31337)
    sampler = page.locator("#sampler_name input")
    sampler.fill("Euler a")
    sampler.press("Enter")
    # the values the page will send (an accordion still opening may re-render them)
    assert page.locator("#subseed input").first.input_value() == "77"
    assert page.locator("#subseed_strength input[type=number]").first.input_value() == "0.4"
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for()
    params = parse_infotext(infotext(page)).params
    assert params["Variation seed"] == "77" and params["Variation seed strength"] == "0.4"
    assert params["Tiling"] == "True" and params["Seed"] == "5"
    assert params["Sampler"] == "Euler a" and params["ENSD"] == "31337"


def newest_output(data: Path, kind: str) -> Path:
    return max((data / "outputs" / kind).rglob("*.png"), key=lambda path: path.stat().st_mtime_ns)


def gradient(width: int, height: int) -> Image.Image:
    y, x = np.mgrid[0:height, 0:width]
    return Image.fromarray(np.stack([x * 2, y * 2, x + y], -1).astype(np.uint8))


def test_inpaint_a_mask_painted_with_the_mouse(
    page: object, app: tuple[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / "gradient.png"
    gradient(128, 96).save(source)
    page.set_viewport_size({"width": 1280, "height": 1000})
    page.get_by_role("tab", name="img2img", exact=True).click()
    page.get_by_role("tab", name="Inpaint", exact=True).click()
    editor = page.locator("#inpaint_editor")
    canvas = editor.locator("canvas").first
    canvas.wait_for()  # the editor is ready for files
    editor.locator("input[type=file]").set_input_files(str(source))
    for elem_id, value in (("img2img_width", "128"), ("img2img_height", "96")):
        box = page.locator(f"#{elem_id} input[type=number]")
        sync_api.expect(box).to_have_value(value, timeout=TIMEOUT_MS)  # from the upload
    # a stroke across the middle (the image is drawn centred in the canvas), in view: mouse
    # events outside the viewport paint nothing
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x - 100, y)
    page.mouse.down()
    for step in (-30, 40, 100):
        page.mouse.move(x + step, y)
    page.mouse.up()
    page.locator("#img2img_prompt textarea").fill("a red ball")
    set_number(page, "img2img_steps", 2)
    set_number(page, "img2img_seed", 7)
    page.locator("#img2img_generate").click()
    page.locator("#img2img_gallery img").first.wait_for()
    page.wait_for_function(
        "() => document.querySelector('#img2img_infotext textarea').value.includes('Steps:')"
    )
    params = parse_infotext(page.locator("#img2img_infotext textarea").input_value()).params
    assert params["Denoising strength"] == "0.75" and params["Mask blur"] == "4"
    assert params["Seed"] == "7" and params["Size"] == "128x96"
    saved = newest_output(app[1], "img2img-images")
    with Image.open(saved) as result:
        assert result.size == (128, 96)
        pixels = np.asarray(result.convert("RGB")).astype(int)
    original = np.asarray(Image.open(source).convert("RGB")).astype(int)
    far = np.r_[0:8, 88:96]  # rows far above and below the stroke (brush, blur, overlay)
    assert np.array_equal(pixels[far], original[far])
    assert np.abs(pixels[44:52, 56:72] - original[44:52, 56:72]).mean() > 5  # repainted
    page.evaluate("window.scrollTo(0, 0)")  # README's docs/ui-inpaint.png: from the tab bar
    top = page.get_by_role("tab", name="txt2img").bounding_box()["y"] - 12
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(
        path=str(ARTIFACTS / "inpaint.png"),
        clip={"x": 0, "y": top, "width": 1280, "height": 1222},
        full_page=True,
    )


def test_send_to_img2img_and_inpaint(page: object) -> None:
    page.get_by_role("tab", name="img2img", exact=True).click()
    page.locator("#img2img_generate").click()  # no image yet: an error, nothing breaks
    page.get_by_text("img2img: upload an image first").first.wait_for()

    page.get_by_role("tab", name="txt2img").click()
    page.locator("#prompt textarea").fill("a blue boat")
    for elem_id, value in (("steps", 2), ("width", 64), ("height", 72), ("seed", 99)):
        set_number(page, elem_id, value)
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for()
    infotext(page)
    page.locator("#txt2img_send_to_img2img").click()
    page.locator("#img2img_image img").wait_for()
    assert page.locator("#img2img_prompt textarea").input_value() == "a blue boat"
    assert page.locator("#img2img_seed input").first.input_value() == "99"
    assert page.locator("#img2img_width input[type=number]").input_value() == "64"
    assert page.locator("#img2img_height input[type=number]").input_value() == "72"
    set_number(page, "img2img_denoising_strength", 0.5)
    page.locator("#img2img_generate").click()
    page.wait_for_function(
        "() => document.querySelector('#img2img_infotext textarea').value.includes('Steps:')"
    )
    params = parse_infotext(page.locator("#img2img_infotext textarea").input_value()).params
    assert params["Denoising strength"] == "0.5" and params["Size"] == "64x72"

    page.get_by_role("tab", name="txt2img").click()
    page.locator("#txt2img_send_to_inpaint").click()
    inpaint = page.get_by_role("tab", name="Inpaint", exact=True)
    sync_api.expect(inpaint).to_have_attribute("aria-selected", "true", timeout=TIMEOUT_MS)
    page.locator("#img2img_generate").click()  # the image came, the mask is not painted
    page.get_by_text("Inpaint: paint over the part of the image to repaint").first.wait_for()


def test_extras_upscales_with_a_model_and_saves(
    page: object, app: tuple[str, Path], tmp_path: Path
) -> None:
    source = tmp_path / "small.png"
    gradient(48, 40).save(source)
    page.get_by_role("tab", name="Extras", exact=True).click()
    page.locator("#extras_image input[type=file]").set_input_files(str(source))
    page.locator("#extras_image img").wait_for()
    page.locator("#extras_upscaler_1 input").click()
    page.get_by_role("option", name="2x_tiny").click()
    set_number(page, "extras_upscaling_resize", 2)
    page.locator("#extras_generate").click()
    page.locator("#extras_gallery img").first.wait_for()
    text = page.locator("#extras_infotext textarea")
    sync_api.expect(text).to_have_value(
        "Postprocess upscale by: 2, Postprocess upscaler: 2x_tiny", timeout=TIMEOUT_MS
    )
    saved = newest_output(app[1], "extras-images")
    assert re.fullmatch(r"\d{5}\.png", saved.name) and saved.parent.parent.name == "extras-images"
    with Image.open(saved) as result:
        assert result.size == (96, 80)
        assert result.info["postprocessing"] == text.input_value()
    shot(page, "extras.png")

    page.get_by_role("tab", name="PNG Info").click()  # send the result back: doubled again
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(saved))
    page.locator("#pnginfo_image img").wait_for()
    page.locator("#pnginfo_send_to_extras").click()
    extras = page.get_by_role("tab", name="Extras", exact=True)
    sync_api.expect(extras).to_have_attribute("aria-selected", "true", timeout=TIMEOUT_MS)
    page.locator("#extras_generate").click()
    folder = app[1] / "outputs" / "extras-images"
    for _ in range(TIMEOUT_MS // 100):  # the second result lands beside the first
        files = list(folder.rglob("*.png"))
        if len(files) == 2 and all(path.stat().st_size for path in files):
            break
        page.wait_for_timeout(100)
    with Image.open(newest_output(app[1], "extras-images")) as again:
        assert again.size == (192, 160)


def test_hires_fix_from_the_page_and_back_through_png_info(
    page: object, app: tuple[str, Path]
) -> None:
    page.locator("#prompt textarea").fill("a harbour")
    section = page.locator("#txt2img_hires_fix").first  # Gradio nests two divs with the id
    assert not section.is_visible()
    page.locator("#txt2img_hr input[type=checkbox]").check()
    section.wait_for(state="visible")
    final = page.locator("#txt2img_hr_final_resolution")
    for elem_id, value in (("steps", 2), ("width", 64), ("height", 80), ("seed", 21)):
        set_number(page, elem_id, value)
    sync_api.expect(final).to_have_text("from 64x80 to 128x160", timeout=TIMEOUT_MS)
    page.locator("#txt2img_hr_upscaler input").click()
    page.get_by_role("option", name="2x_tiny").click()
    set_number(page, "txt2img_hires_steps", 1)
    set_number(page, "txt2img_denoising_strength", 0.5)
    set_number(page, "txt2img_hr_scale", 1.5)
    sync_api.expect(final).to_have_text("from 64x80 to 96x120", timeout=TIMEOUT_MS)
    shot(page, "txt2img-hires-fix.png")
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for()
    page.wait_for_function(
        "() => document.querySelector('#infotext textarea').value.includes('Hires upscale')"
    )
    params = parse_infotext(infotext(page)).params
    assert (params["Hires upscale"], params["Hires upscaler"]) == ("1.5", "2x_tiny")
    assert (params["Hires steps"], params["Denoising strength"]) == ("1", "0.5")
    saved = newest_output(app[1], "txt2img-images")
    with Image.open(saved) as image:
        assert image.size == (96, 120) and image.info["parameters"] == infotext(page)

    page.reload()  # a new page: Hires fix off; PNG Info turns it back on with the values
    page.locator("#generate").wait_for()
    page.wait_for_function("() => document.documentElement.dataset.defaultsLoaded === '1'")
    assert not page.locator("#txt2img_hr input[type=checkbox]").is_checked()
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(saved))
    page.wait_for_function(
        "() => document.querySelector('#pnginfo_text textarea').value.includes('Hires upscale')"
    )
    page.locator("#send_to_txt2img").click()
    section.wait_for(state="visible")
    assert page.locator("#txt2img_hr input[type=checkbox]").is_checked()
    assert page.locator("#txt2img_hr_upscaler input").input_value() == "2x_tiny"
    assert page.locator("#txt2img_hr_scale input[type=number]").first.input_value() == "1.5"


def test_sd_vae_from_the_page_and_back_through_png_info(
    page: object, app: tuple[str, Path]
) -> None:
    page.locator("#prompt textarea").fill("a lantern")
    for elem_id, value in (("steps", 2), ("width", 64), ("height", 64), ("seed", 8)):
        set_number(page, elem_id, value)
    page.locator("#sd_vae input").click()
    page.get_by_role("option", name="bright.safetensors").click()
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for()
    params = parse_infotext(infotext(page)).params
    assert params["VAE"] == "bright.safetensors" and len(params["VAE hash"]) == 10
    shot(page, "txt2img-sd-vae.png")
    saved = newest_output(app[1], "txt2img-images")

    page.reload()  # a new page starts on Automatic; PNG Info brings the VAE back
    page.locator("#generate").wait_for()
    page.wait_for_function("() => document.documentElement.dataset.defaultsLoaded === '1'")
    assert page.locator("#sd_vae input").input_value() == "Automatic"
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(saved))
    page.wait_for_function(
        "() => document.querySelector('#pnginfo_text textarea').value.includes('VAE hash')"
    )
    page.locator("#send_to_txt2img").click()
    sync_api.expect(page.locator("#sd_vae input")).to_have_value(
        "bright.safetensors", timeout=TIMEOUT_MS
    )


def test_a_lora_cards_coverage_report_names_what_would_be_skipped(
    page: object, app: tuple[str, Path]
) -> None:
    """Before generating with it: the card's Coverage shows the modules matched by region
    against the loaded checkpoint and lists the key that matches no layer."""
    from safetensors.torch import load_file

    loras = app[1] / "loras"
    state = load_file(loras / "ink.safetensors")
    stray = "lora_unet_up_blocks_9_attentions_0_proj_in"
    state.update(
        {f"{stray}.lora_down.weight": torch.zeros(4, 32), f"{stray}.alpha": torch.tensor(4.0)}
    )
    state[f"{stray}.lora_up.weight"] = torch.zeros(32, 4)
    save_file(state, loras / "inkpartial.safetensors")
    page.locator("#lora_refresh").click()
    partial = card(page, "inkpartial")
    partial.wait_for()
    for elem_id, value in (("steps", 1), ("width", 64), ("height", 64)):
        set_number(page, elem_id, value)
    page.locator("#prompt textarea").fill("a hill")
    page.locator("#generate").click()  # the checkpoint is loaded once something ran on it
    page.locator("#gallery img").first.wait_for()
    partial.get_by_role("button", name="Coverage").click()
    report = partial.locator(".lora-coverage")
    sync_api.expect(report).to_contain_text("modules match", timeout=TIMEOUT_MS)
    text = report.inner_text()
    matched, total = map(int, re.search(r"(\d+) of (\d+) modules match", text).groups())
    assert text.startswith("⚠") and total == matched + 1 and "UNet up" in text
    report.get_by_text("1 skipped (no such layer)").click()
    sync_api.expect(report).to_contain_text(stray, timeout=TIMEOUT_MS)
    partial.scroll_into_view_if_needed()
    ARTIFACTS.mkdir(exist_ok=True)
    partial.screenshot(path=str(ARTIFACTS / "lora-coverage-card.png"))
    card(page, "glow").get_by_role("button", name="Coverage").click()
    sync_api.expect(card(page, "glow").locator(".lora-coverage")).to_contain_text(
        f"✓ {matched} of {matched} modules match", timeout=TIMEOUT_MS
    )
    (loras / "inkpartial.safetensors").unlink()


def test_token_counter_time_taken_and_skip(page: object) -> None:
    """A1111's conveniences: the n/75 counter follows the prompt (LoRA tags not counted),
    the notes end with "Time taken", and Skip answers."""
    counter = page.locator("#prompt_tokens .token-counter")
    page.locator("#prompt textarea").fill("a lighthouse <lora:ink:0.5>")
    sync_api.expect(counter).to_have_text("2/75", timeout=TIMEOUT_MS)
    page.locator("#prompt textarea").fill(", ".join(["tower"] * 40))
    sync_api.expect(counter).to_have_text(re.compile(r"^\d+/150$"), timeout=TIMEOUT_MS)
    sync_api.expect(page.locator("#negative_prompt_tokens .token-counter")).to_contain_text("/75")
    page.locator("#prompt textarea").fill("a lighthouse")
    for elem_id, value in (("steps", 1), ("width", 64), ("height", 64)):
        set_number(page, elem_id, value)
    page.locator("#generate").click()
    sync_api.expect(page.locator("#notes")).to_contain_text(
        re.compile(r"Time taken: \d+\.\d sec\."), timeout=TIMEOUT_MS
    )
    page.locator("#skip").click()
    page.get_by_text("Nothing of this page is running").first.wait_for()


def test_a_user_mistake_is_one_log_line_and_polling_is_quiet(
    page: object, app: tuple[str, Path]
) -> None:
    """An unknown LoRA is shown to the user and logged once, without a traceback; the
    page's polling and assets write no access-log lines (off unless --access-log)."""
    page.locator("#prompt textarea").fill("a hill <lora:nosuchlora:1>")
    page.locator("#generate").click()
    page.get_by_text("unknown LoRA 'nosuchlora'").first.wait_for()
    page.wait_for_timeout(6000)  # an idle tab polls the LoRA listing every few seconds
    log = (app[1] / "app.log").read_text()
    assert log.count("refused: unknown LoRA 'nosuchlora'") == 1
    assert "Traceback" not in log
    assert "GET /gradio_api" not in log and "POST /gradio_api" not in log


def test_phone_width_puts_generate_first_and_keeps_stack_rows_on_one_line(
    browser: object, app: tuple[str, Path]
) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844})
    phone = context.new_page()
    phone.set_default_timeout(TIMEOUT_MS)
    try:
        phone.goto(app[0])
        phone.locator("#generate").wait_for()
        phone.wait_for_function("() => document.documentElement.dataset.defaultsLoaded === '1'")
        generate = phone.locator("#generate").bounding_box()
        prompt = phone.locator("#prompt textarea").bounding_box()
        assert generate["y"] + generate["height"] < prompt["y"]
        assert generate["y"] < 844  # on the first screen
        card(phone, "glow").get_by_role("button", name="Add").click()
        row = phone.locator(".stack-row").filter(has_text="glow")
        row.wait_for()
        ARTIFACTS.mkdir(exist_ok=True)
        phone.evaluate("window.scrollTo(0, 0)")
        phone.screenshot(path=str(ARTIFACTS / "phone-txt2img.png"))
        assert phone.get_by_text("dictionary changed size").count() == 0  # renders one at a time
        row.screenshot(path=str(ARTIFACTS / "phone-stack-row.png"))
        remove = row.get_by_role("button", name="✕").bounding_box()
        name = row.locator(".stack-name").first.bounding_box()
        assert remove["x"] > name["x"] + name["width"]  # beside the row's parts
        assert remove["y"] < name["y"] + name["height"]  # not on a line of its own
    finally:
        context.close()


def test_a_bad_default_is_refused_naming_the_field_and_sliders_have_no_reset(
    page: object,
) -> None:
    """Settings: steps 0 is refused naming the field (not Gradio's nameless "Value 0 is
    less than minimum value 1"); the page's sliders have no ↺, which went back to the
    start-up value rather than the saved default."""
    assert page.locator("#steps button").count() == 0
    page.get_by_role("tab", name="Settings").click()
    box = page.locator("#default_steps input")
    box.wait_for()
    box.fill("0")
    page.locator("#save_defaults").click()
    page.get_by_text("steps must be between").first.wait_for()
    assert page.get_by_text("less than minimum value").count() == 0


def test_an_embedding_card_adds_its_word_and_the_image_names_it(page: object) -> None:
    page.locator("#prompt textarea").fill("a hill")
    for elem_id, value in (("steps", 2), ("width", 64), ("height", 64), ("seed", 4)):
        set_number(page, elem_id, value)
    page.locator("#embedding_library").get_by_text("Embeddings").first.click()
    cards = page.locator(".embedding-card")
    mycastle = cards.filter(has=page.locator(".embedding-name", has_text="mycastle"))
    mycastle.get_by_role("button", name="Prompt").click()
    sync_api.expect(page.locator("#prompt textarea")).to_have_value(
        "a hill mycastle", timeout=TIMEOUT_MS
    )
    mycastle.get_by_role("button", name="Negative").click()
    sync_api.expect(page.locator("#negative_prompt textarea")).to_have_value(
        re.compile(r"(^|.* )mycastle$"), timeout=TIMEOUT_MS
    )
    mycastle.get_by_role("button", name="Negative").click()  # a second click takes it out
    sync_api.expect(page.locator("#negative_prompt textarea")).not_to_have_value(
        re.compile("mycastle"), timeout=TIMEOUT_MS
    )
    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#embedding_library").screenshot(path=str(ARTIFACTS / "embedding-cards.png"))
    shot(page, "txt2img-embeddings.png")
    page.locator("#generate").click()
    page.wait_for_function(
        "() => document.querySelector('#infotext textarea').value.includes('TI hashes')"
    )
    assert 'TI hashes: "mycastle: ' in infotext(page)


def test_find_an_image_in_the_gallery_by_lora_send_it_back_delete_and_restore(
    page: object,
) -> None:
    page.locator("#prompt textarea").fill("a harbour at noon <lora:glow:0.4>")
    for elem_id, value in (("steps", 2), ("width", 64), ("height", 96), ("seed", 777)):
        set_number(page, elem_id, value)
    page.locator("#generate").click()
    page.wait_for_function(
        "() => document.querySelector('#infotext textarea').value.includes('Seed: 777')"
    )
    made = infotext(page)
    page.reload()  # a new page: fields back to the defaults
    page.locator("#generate").wait_for()
    page.wait_for_function("() => document.documentElement.dataset.defaultsLoaded === '1'")
    page.get_by_role("tab", name="Gallery").click()
    page.locator("#gallery_lora input, #gallery_lora textarea").first.fill("glow")
    page.locator("#gallery_text input, #gallery_text textarea").first.fill("harbour at noon")
    page.locator("#gallery_search").click()
    sync_api.expect(page.locator("#gallery_page")).to_contain_text("1 image(s)")
    page.locator("#gallery_browser img").first.click()
    sync_api.expect(page.locator("#gallery_infotext textarea")).to_have_value(made)
    shot(page, "gallery.png")
    page.locator("#gallery_send_txt2img").click()
    prompt = page.locator("#prompt textarea")
    sync_api.expect(prompt).to_have_value("a harbour at noon <lora:glow:0.4>", timeout=TIMEOUT_MS)
    assert page.locator("#seed input").first.input_value() == "777"
    assert page.locator("#height input[type=number]").first.input_value() == "96"

    page.get_by_role("tab", name="Gallery").click()
    page.locator("#gallery_browser img").first.click()
    page.locator("#gallery_delete").click()
    sync_api.expect(page.locator("#gallery_page")).to_contain_text("0 image(s)")
    page.locator("#gallery_trash").get_by_text("Trash").first.click()
    page.locator("#gallery_trashed input").click()
    page.get_by_role("option").first.click()
    page.locator("#gallery_restore").click()
    sync_api.expect(page.locator("#gallery_page")).to_contain_text("1 image(s)")


def test_a_controlnet_unit_from_the_page(page: object, tmp_path: Path) -> None:
    source = tmp_path / "shapes.png"
    control_image(size=(96, 64)).save(source)
    page.locator("#prompt textarea").fill("a robot")
    for elem_id, value in (("steps", 2), ("width", 64), ("height", 64), ("seed", 11)):
        set_number(page, elem_id, value)
    page.locator("#controlnet").first.get_by_text("ControlNet").first.click()
    page.locator("#controlnet_image input[type=file]").set_input_files(str(source))
    page.locator("#controlnet_enabled input[type=checkbox]").check()
    page.locator("#controlnet_module input").click()
    page.get_by_role("option", name="canny", exact=True).click()
    sync_api.expect(page.locator("#controlnet_threshold_a")).to_contain_text("Low Threshold")
    page.locator("#controlnet_model input").click()
    page.get_by_role("option", name=re.compile(r"^tiny-canny \[")).click()
    set_number(page, "controlnet_weight", 0.8)
    page.get_by_text("My prompt is more important").click()
    notes = page.locator("#controlnet_notes")
    assert "Control-LoRA" in notes.inner_text() and "depth_midas" in notes.inner_text()
    page.locator("#controlnet_run_preview").click()
    page.locator("#controlnet_preview img").wait_for()
    shot(page, "txt2img-controlnet.png")
    page.locator("#generate").click()
    page.locator("#gallery img").first.wait_for()
    page.wait_for_function(
        "() => document.querySelector('#infotext textarea').value.includes('ControlNet 0')"
    )
    unit = parse_infotext(infotext(page)).params["ControlNet 0"]
    assert unit.startswith("Module: canny, Model: tiny-canny [")
    assert "Weight: 0.8" in unit and "Control Mode: My prompt is more important" in unit


def test_make_preview_turns_the_chosen_image_into_the_cards_preview(
    page: object, app: tuple[str, Path]
) -> None:
    """A1111's "replace preview": the gallery's image, with its parameters, becomes the
    card's NAME.png, and the card shows it."""
    loras, outputs = app[1] / "loras", app[1] / "outputs" / "txt2img-images"
    page.locator("#prompt textarea").fill("a red barn for the card")
    for elem_id, value in (("steps", 2), ("width", 64), ("height", 64), ("seed", 77)):
        set_number(page, elem_id, value)
    page.locator("#generate").click()
    page.wait_for_function(
        "() => document.querySelector('#infotext textarea').value.includes('red barn for')"
    )
    text = infotext(page)
    glow = card(page, "glow")
    assert glow.locator("img").count() == 0  # no preview yet
    glow.get_by_role("button", name="Make preview").click()
    glow.locator("img").first.wait_for()
    newest = max(outputs.rglob("*.png"), key=lambda p: p.stat().st_mtime_ns)
    with Image.open(loras / "glow.png") as preview, Image.open(newest) as made:
        assert preview.info["parameters"] == text == made.info["parameters"]
        assert np.array_equal(np.asarray(preview.convert("RGB")), np.asarray(made.convert("RGB")))
    shot(page, "lora-card-make-preview.png")
