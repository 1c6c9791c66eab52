"""The page as a daily tool (issue "The page as a daily tool"): each defect a new user hit
in a real browser, reproduced in headless Chromium against a live app with two tiny
checkpoints (SD1 and SDXL), one that cannot be used, and LoRAs for SD1 and SDXL.

Needs /usr/bin/chromium (the README test command installs it).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from playwright import sync_api
from safetensors.torch import save_file

from pipelines.infotext import parse_infotext, write_png_with_infotext
from pipelines.loading import LoadedModel
from tests import test_browser
from tests.test_app_http import app_server
from tests.test_browser import TIMEOUT_MS, set_number, shot
from tests.test_ui import make_lora_folder

browser = test_browser.browser  # the same fixtures; `page` opens this module's `app`
page = test_browser.page
sync_api.expect.set_options(timeout=TIMEOUT_MS)  # generations share 2 cores with the app


@pytest.fixture(scope="module")
def app(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    tiny_sd1: LoadedModel,
    tiny_sdxl: LoadedModel,
) -> Iterator[tuple[str, Path]]:
    data = tmp_path_factory.mktemp("daily")
    make_lora_folder(data / "loras", tiny_sd1.pipe, tiny_sdxl.pipe)
    models = data / "models"
    shutil.copytree(models_dir, models)  # tiny SD1 (file and folder), tiny SDXL
    broken = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3, 3)}
    save_file(broken, models / "broken.safetensors")  # an SD1 name with a wrong shape
    Image.new("RGB", (96, 64), (200, 40, 20)).save(models / "xl" / "tiny-sdxl.preview.png")
    with app_server(data) as url:
        yield url, data


def small(page: object, **fields: float) -> None:
    for elem_id, value in {"steps": 1, "width": 64, "height": 64, **fields}.items():
        set_number(page, elem_id, value)


def test_an_error_stays_readable_and_the_previous_images_stay(page: object) -> None:
    """Defect 3: after a refused run the previous image and parameters stay shown (no
    "Error" badges over them) and the message stays in the notes after the toast."""
    page.locator("#prompt textarea").fill("a hill")
    small(page, seed=5)
    page.locator("#generate").click()
    sync_api.expect(page.locator("#notes")).to_contain_text("Time taken")
    made = page.locator("#infotext textarea").input_value()
    page.locator("#prompt textarea").fill("a hill <lora:nosuchlora:1>")
    page.locator("#generate").click()
    notes = page.locator("#notes")
    sync_api.expect(notes).to_contain_text("Error: unknown LoRA 'nosuchlora'")
    page.wait_for_timeout(11_000)  # longer than a toast lives
    sync_api.expect(notes).to_contain_text("Error: unknown LoRA 'nosuchlora'")
    assert "Time taken" not in notes.inner_text()  # not the last run's notes any more
    assert page.locator("#gallery img").first.is_visible()
    assert page.get_by_text("Error", exact=True).count() == 0  # no badges over the results
    assert page.locator("#infotext textarea").input_value() == made
    shot(page, "txt2img-error-kept.png")


def test_the_selected_image_shows_its_parameters_and_its_real_shape(page: object) -> None:
    """Defects 6 and 7: clicking the second image of a batch shows its infotext and seed;
    "Reuse last seed" then takes that seed; thumbnails are not cropped to squares."""
    page.locator("#prompt textarea").fill("a long wall")
    small(page, width=512, height=64, batch_size=2, seed=40)
    page.locator("#generate").click()
    images = page.locator("#gallery .thumbnail-item img, #gallery img")
    sync_api.expect(page.locator("#notes")).to_contain_text("Time taken")
    assert parse_infotext(page.locator("#infotext textarea").input_value()).params["Seed"] == "40"
    page.locator("#gallery img").nth(1).click()
    field = page.locator("#infotext textarea")
    sync_api.expect(field).to_have_value(re.compile(r"Seed: 41,"))
    page.locator("#reuse_seed").click()
    sync_api.expect(page.locator("#seed input").first).to_have_value("41")
    fits = images.first.evaluate("img => getComputedStyle(img).objectFit")
    assert fits == "contain"


def menu_options(page: object) -> list[str]:
    """The checkpoint menu's options as a user sees them (opened, read, closed)."""
    page.locator("#checkpoint input").click()
    options = page.get_by_role("option")
    options.first.wait_for()
    texts = options.all_inner_texts()
    page.locator("h1").first.click()  # closes it
    return texts


def test_the_checkpoint_menu_follows_the_folder_and_marks_unusable_files(
    page: object, browser: object, app: tuple[str, Path]
) -> None:
    """Defects 2 and 9: a new checkpoint folder appears in an open page (no Refresh) and in
    a new page; a removed one goes; a file that cannot be used is listed with a short
    reason, and choosing it says why before any Generate."""
    url, data = app
    models = data / "models"
    options = menu_options(page)
    assert any(o.startswith("⚠ broken.safetensors (unusable: ") for o in options), options
    assert not any("broken" in o and "unusable" not in o for o in options)
    page.locator("#checkpoint input").click()
    page.get_by_role("option", name=re.compile(r"^⚠ broken\.safetensors")).click()
    page.get_by_text("broken.safetensors cannot be used:").first.wait_for()

    shutil.copytree(models / "tiny-sd1-diffusers", models / "fresh-sd1")
    shutil.move(models / "xl", data / "xl-away")
    sync_api.expect(page.locator("#checkpoint")).to_be_visible()
    page.wait_for_timeout(7_000)  # the page polls the listings every 5 s, as for LoRAs
    options = menu_options(page)
    assert "fresh-sd1" in options and not any("tiny-sdxl" in o for o in options), options
    library = page.locator("#checkpoint_library").get_by_text("Checkpoints").first
    library.click()  # the cards follow the same poll
    cards = page.locator(".checkpoint-card")
    sync_api.expect(cards.filter(has_text="fresh-sd1")).to_have_count(1)
    sync_api.expect(cards.filter(has_text="tiny-sdxl")).to_have_count(0)
    library.click()  # closed again, as the later tests expect
    context = browser.new_context()
    fresh = context.new_page()
    try:
        fresh.set_default_timeout(TIMEOUT_MS)
        fresh.goto(url)
        fresh.locator("#generate").wait_for()
        fresh.wait_for_timeout(1_000)
        options = menu_options(fresh)
        assert "fresh-sd1" in options and not any("tiny-sdxl" in o for o in options), options
    finally:
        context.close()
        shutil.move(data / "xl-away", models / "xl")
        shutil.rmtree(models / "fresh-sd1")


def test_values_the_page_changes_are_said_and_weights_share_one_range(page: object) -> None:
    """Defect 8: a width typed past the maximum, steps 0 and a stack weight past the LoRA
    weight range are set to the end of their range with a note beside the field; a width
    that is not a multiple of 8 is rounded with a note; a prompt tag past the same range
    is refused naming it."""
    page.locator("#prompt textarea").fill("a field")
    for elem_id, typed, said in (
        ("width", 2049, "2049 is above the maximum 2048: set to 2048"),
        ("steps", 0, "0 is below the minimum 1: set to 1"),
    ):
        box = page.locator(f"#{elem_id} input[type=number]").first
        box.fill(str(typed))
        box.press("Tab")
        sync_api.expect(page.locator(f"#{elem_id} .clamp-note")).to_have_text(said)
        assert box.input_value() == said.rsplit(" ", 1)[1]
    set_number(page, "width", 70)
    sync_api.expect(page.locator("#width .clamp-note")).to_have_count(0)  # in range: gone
    small(page, width=70, height=64)
    page.locator("#generate").click()
    notes = page.locator("#notes")
    sync_api.expect(notes).to_contain_text("size 70x64 rounded down to 64x64")
    assert "Size: 64x64" in page.locator("#infotext textarea").input_value()

    page.locator(".lora-card").filter(has_text="glow").get_by_role("button", name="Add").click()
    row = page.locator(".stack-row").filter(has_text="glow")
    box = row.locator("input[type=number]").first
    box.fill("12")
    box.press("Tab")
    sync_api.expect(row.locator(".clamp-note")).to_have_text(
        "12 is above the maximum 10: set to 10"
    )
    box.fill("3")
    box.press("Tab")
    sync_api.expect(row.locator(".clamp-note")).to_have_count(0)
    sync_api.expect(box).to_have_value("3")  # the old range (−2..2) took 3 for 2
    page.locator("#prompt textarea").fill("a field <lora:ink:12>")
    page.locator("#generate").click()
    sync_api.expect(notes).to_contain_text(
        "prompt tag <lora:ink>.weight must be a finite number between -10 and 10, got 12"
    )


def test_rows_and_tags_that_stop_fitting_the_checkpoint_are_flagged(page: object) -> None:
    """Defect 4: an SD1 LoRA row is flagged as soon as the checkpoint becomes SDXL, an
    SDXL-only tag on SD1 and an unknown tag as soon as they are typed, each with why."""
    notes = page.locator("#stack_notes")
    page.locator(".lora-card").filter(has_text="glow").get_by_role("button", name="Add").click()
    page.locator(".stack-row").filter(has_text="glow").wait_for()
    page.locator("#prompt textarea").fill("a tower <lora:xl-only:1> <lora:nosuch:1>")
    sync_api.expect(notes).to_contain_text(
        "prompt tag <lora:xl-only> does not fit: made for SDXL; the checkpoint is SD1"
    )
    sync_api.expect(notes).to_contain_text("prompt tag <lora:nosuch> does not fit: unknown LoRA")
    assert "stack row glow" not in notes.inner_text()
    page.locator("#checkpoint input").click()
    page.get_by_role("option", name=re.compile(r"^xl\/tiny-sdxl")).click()
    sync_api.expect(notes).to_contain_text(
        "stack row glow does not fit: made for SD1/SD2; the checkpoint is SDXL"
    )
    assert "<lora:xl-only>" not in notes.inner_text()  # fits SDXL
    shot(page, "txt2img-stack-flags.png")


def test_send_to_txt2img_keeps_batch_size_and_tags_and_lists_what_it_did_not_apply(
    page: object, tmp_path: Path
) -> None:
    """Defect 13: PNG Info → Send to txt2img leaves the batch size (A1111 does), keeps the
    prompt's tags as written (no rows: the stack is emptied, with a word, so no LoRA
    applies twice) and lists the parameters it did not apply."""
    text = (
        "a house <lora:ink:0.6>, red\n"
        "Steps: 3, Sampler: Euler, CFG scale: 6, Seed: 9, Size: 64x64, Hires upscale: 2, "
        "Face restoration: CodeFormer, Version: v1.10.1"
    )
    source = tmp_path / "made-elsewhere.png"
    source.write_bytes(write_png_with_infotext(Image.new("RGB", (64, 64)), text))
    set_number(page, "batch_size", 3)
    page.locator(".lora-card").filter(has_text="glow").get_by_role("button", name="Add").click()
    page.locator(".stack-row").filter(has_text="glow").wait_for()
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(source))
    sync_api.expect(page.locator("#pnginfo_text textarea")).to_have_value(re.compile("Seed: 9"))
    page.locator("#send_to_txt2img").click()
    sync_api.expect(page.locator("#prompt textarea")).to_have_value("a house <lora:ink:0.6>, red")
    sync_api.expect(page.locator(".stack-row")).to_have_count(0)
    assert page.locator("#batch_size input[type=number]").first.input_value() == "3"
    assert page.locator("#seed input").first.input_value() == "9"
    notes = page.locator("#notes")
    sync_api.expect(notes).to_contain_text("not applied here: Hires upscale, Face restoration")
    sync_api.expect(notes).to_contain_text("the LoRA stack was emptied")


def test_each_batch_of_a_batch_count_shows_and_saves_as_it_finishes(
    page: object, app: tuple[str, Path]
) -> None:
    """Defect 10: with batch count 3 the first batch's image is in the gallery and on disk
    while the job still runs; the progress bar stays in its own place above the gallery
    (it is not replaced by the previews and batches that stream into the gallery)."""
    saved = app[1] / "outputs"
    before = len(list(saved.rglob("*.png")))
    page.locator("#prompt textarea").fill("three towers")
    small(page, steps=24, width=256, height=256, n_iter=3, seed=70)
    page.locator("#generate").click()
    bar = page.locator("#progress .job-progress")
    sync_api.expect(bar).to_contain_text("batch 1/3")
    seen = []  # the bar, sampled while previews stream in: never gone, time never back
    while "batch 2/3" not in (text := bar.inner_text() if bar.count() else "gone"):
        seen.append(text)
        page.wait_for_timeout(150)
    assert "gone" not in seen, seen
    elapsed = [int(m[1]) for t in seen if (m := re.search(r"(\d+)s elapsed", t))]
    assert elapsed == sorted(elapsed), seen
    # the first batch, finished: in the gallery with its parameters while the job runs on
    sync_api.expect(page.locator("#infotext textarea")).to_have_value(re.compile("Seed: 70,"))
    assert "Time taken" not in page.locator("#notes").inner_text()
    assert page.locator("#gallery img").count() >= 1
    assert len(list(saved.rglob("*.png"))) > before  # saved before the job ended
    sync_api.expect(page.locator("#notes")).to_contain_text("Time taken")
    seeds = set()
    for path in saved.rglob("*.png"):
        with Image.open(path) as image:
            seeds.add(parse_infotext(image.info["parameters"]).params["Seed"])
    assert {"70", "71", "72"} <= seeds  # each batch saved once, with its own seed
    assert len(list(saved.rglob("*.png"))) == before + 3


def test_checkpoint_cards_show_each_checkpoint_and_use_one(page: object) -> None:
    """A1111's checkpoint cards: each checkpoint with its family and preview, an unusable
    one greyed out with why; **Use** makes a card's checkpoint the session's."""
    page.locator("#checkpoint_library").get_by_text("Checkpoints").first.click()
    cards = page.locator(".checkpoint-card")
    xl = cards.filter(has_text="xl/tiny-sdxl.safetensors")
    sync_api.expect(xl).to_contain_text("SDXL")
    sync_api.expect(xl.locator("img.lora-thumb")).to_have_count(1)  # its preview
    broken = cards.filter(has_text="broken.safetensors")
    sync_api.expect(broken).to_contain_text("cannot tell the model family")
    sync_api.expect(broken.get_by_role("button", name="Use")).to_be_disabled()
    shot(page, "checkpoint-cards.png")
    page.locator("#checkpoint_search input, #checkpoint_search textarea").first.fill("sdxl")
    sync_api.expect(cards).to_have_count(1)
    xl.get_by_role("button", name="Use").click()
    sync_api.expect(page.locator("#checkpoint input")).to_have_value(
        re.compile(r"^xl/tiny-sdxl\.safetensors")
    )


def test_the_schedule_menu_offers_only_what_the_sampler_runs(page: object) -> None:
    """Defect 11's last part: a sampler × schedule that cannot exist is not offered (DDIM
    has its own schedule; Euler a runs every schedule, A1111's loop where diffusers has
    none); a schedule the new sampler cannot run becomes Automatic, with a word."""
    sampler = page.locator("#sampler_name input")
    schedule = page.locator("#scheduler input")
    schedule.click()
    page.locator("#scheduler").get_by_role("option", name="Karras", exact=True).click()
    sampler.click()
    page.locator("#sampler_name").get_by_role("option", name="DDIM", exact=True).click()
    page.get_by_text("DDIM runs with its own schedule: Karras became Automatic").first.wait_for()
    sync_api.expect(schedule).to_have_value("Automatic")
    schedule.click()
    offered = page.locator("#scheduler").get_by_role("option").all_inner_texts()
    assert "Karras" not in offered and "Uniform" in offered, offered
    page.locator("h1").first.click()
    sampler.click()
    page.locator("#sampler_name").get_by_role("option", name="Euler a", exact=True).click()
    schedule.click()
    karras = page.locator("#scheduler").get_by_role("option", name="Karras", exact=True)
    sync_api.expect(karras).to_be_visible()
