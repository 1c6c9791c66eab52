"""The page's logic against the real engine and tiny models: stack rules, PNG Info recall,
admin defaults, live previews, per-session Interrupt, and the `/txt2img` Gradio endpoint."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from frontends.page import stack as st
from frontends.page.defaults import load_defaults, save_defaults, settings_file
from frontends.page.recall import read_image_info, recall
from frontends.page.ui import follow_job, interrupt_jobs
from pipelines.errors import InvalidRequestError, LorastackError
from pipelines.infotext import parse_infotext, read_infotext, write_png_with_infotext
from pipelines.interface import DEMO_MODEL_NAME, ProgressSnapshot
from pipelines.loading import LoadedModel
from pipelines.preview import latents_to_images
from pipelines.schema import GenerationRequest, GenerationResult, LoraSpec
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from pipelines.styles import PromptStyle
from tests.test_app_http import app_server
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

SMALL = {"width": 64, "height": 64, "steps": 2}


def make_lora_folder(folder: Path, pipe: object, sdxl_pipe: object) -> Path:
    """LoRAs for the tiny SD1/demo model: ink (alias, sidecar, preview), glow, soft in a
    subfolder, and an SDXL-only one (greyed out on SD1)."""
    keys = sd1_keys(SD1_MODULES)
    tags = json.dumps({"set": {"ink wash": 12, "monochrome": 7}})
    write(
        folder / "ink.safetensors",
        make_kohya(pipe, SD1_MODULES, keys, seed=1),
        {"ss_output_name": "ink_style", "ss_tag_frequency": tags},
    )
    (folder / "ink.json").write_text(json.dumps({"preferred weight": 0.8}))
    Image.new("RGB", (96, 64), (20, 40, 200)).save(folder / "ink.preview.png")
    write(folder / "glow.safetensors", make_kohya(pipe, SD1_MODULES, keys, seed=2))
    write(folder / "styles" / "soft.safetensors", make_kohya(pipe, SD1_MODULES, keys, seed=3))
    (folder / "styles" / "soft.json").write_text(json.dumps({"activation text": "soft light"}))
    xl_modules = [
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "linear"),
        ("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj", "linear"),
    ]
    prefixes = {"unet": "lora_unet_", "text_encoder_2": "lora_te2_"}
    xl_keys = {(c, n): prefixes[c] + n.replace(".", "_") for c, n, _ in xl_modules}
    xl_state = make_kohya(sdxl_pipe, xl_modules, xl_keys, seed=4)
    write(folder / "xl-only.safetensors", xl_state, {"ss_base_model_version": "sdxl_base_v1-0"})
    return folder


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel, tiny_sdxl: LoadedModel
) -> Service:
    data = tmp_path_factory.mktemp("ui-data")
    make_lora_folder(data / "loras", tiny_sd1.pipe, tiny_sdxl.pipe)
    (data / "models").mkdir()
    engine = build_service(Settings(data_dir=data, threads=2))
    engine.folders.hash_missing()
    engine.select_checkpoint(None)
    return engine


# --------------------------------------------------------------------------- previews


def test_preview_uses_a1111_cheap_factors() -> None:
    zero = latents_to_images(torch.zeros(2, 4, 3, 5), "SD1", scale=1)
    assert len(zero) == 2 and zero[0].size == (5, 3)
    assert np.all(np.asarray(zero[0]) == 128)  # 0 maps to mid grey
    unit = torch.zeros(1, 4, 1, 1)
    unit[0, 0] = 1.0
    sd1 = np.asarray(latents_to_images(unit, "SD1", scale=1)[0])[0, 0]
    xl = np.asarray(latents_to_images(unit, "SDXL", scale=1)[0])[0, 0]
    assert sd1.tolist() == [round((1 + f) / 2 * 255) for f in (0.298, 0.207, 0.208)]
    assert xl.tolist() == [round((1 + f) / 2 * 255) for f in (0.3448, 0.4168, 0.4395)]
    assert latents_to_images(torch.zeros(1, 4, 2, 2), "SD1")[0].size == (16, 16)
    assert latents_to_images(torch.zeros(1, 16, 2, 2), "SD1") == []
    assert latents_to_images(torch.zeros(1, 4, 2, 2), "Flux") == []


# --------------------------------------------------------------------------- stack rules


def test_rows_from_the_api_value() -> None:
    assert st.rows_from_value(None) == [] and st.rows_from_value("") == []
    rows = st.rows_from_value('[{"name": "ink", "weight": 0.5}]')
    assert rows == [{"name": "ink", "weight": 0.5, "te_weight": None}]
    assert st.specs_from_rows(st.rows_from_value([{"name": "a", "te_weight": 0}])) == (
        LoraSpec("a", 1.0, 0.0),
    )
    for bad in ("{", {"name": "x"}, [{"weight": 1}], [{"name": "x", "weight": "high"}]):
        with pytest.raises(InvalidRequestError):
            st.rows_from_value(bad)


def test_add_set_remove_rows(engine: Service) -> None:
    ink = engine.resolve_lora("ink")
    rows = st.add_row([], ink)
    assert rows == [{"name": "ink", "weight": 0.8, "te_weight": None}]  # sidecar weight
    assert st.add_row(rows, ink) == rows  # a second click adds nothing
    rows = st.add_row(rows, engine.resolve_lora("glow"))
    rows = st.set_row(rows, "glow", "weight", -1.25)
    rows = st.set_row(rows, "ink", "te_weight", 0.3)
    assert st.specs_from_rows(rows) == (LoraSpec("ink", 0.8, 0.3), LoraSpec("glow", -1.25))
    assert [r["name"] for r in st.remove_row(rows, "ink")] == ["glow"]


def test_tag_and_row_rule_is_announced_before_generating() -> None:
    rows = [{"name": "ink", "weight": 1.0, "te_weight": None}]
    notes = st.conflict_notes("castle <lora:INK:0.5>", rows)
    assert notes == ["LoRA 'ink': the prompt tag's weight replaces the stack weight 1"]
    assert st.conflict_notes("castle <lora:glow:0.5>", rows) == []
    assert "multiplier" in st.conflict_notes("castle <lora:ink:abc>", rows)[0]


def test_move_tags_into_the_stack() -> None:
    rows = [{"name": "ink", "weight": 1.0, "te_weight": None}]
    text, moved = st.move_tags_to_stack("castle, <lora:ink:0.5> <lora:glow:0.2:0.7> sky", rows)
    assert text == "castle, sky"
    assert st.specs_from_rows(moved) == (LoraSpec("ink", 0.5), LoraSpec("glow", 0.7, 0.2))
    assert st.move_tags_to_stack("plain", rows) == ("plain", rows)


@pytest.mark.parametrize(
    ("prompt", "left"),
    [
        ("a house <lora:ink:0.5>, red", "a house, red"),  # was "a house , red"
        ("a house, <lora:ink:0.5>, red", "a house, red"),  # was "a house, , red"
        ("a house, <lora:ink:1><lora:glow:1>, red", "a house, red"),
        ("<lora:ink:0.5> a house", "a house"),
        ("a <lora:ink:1> house", "a house"),
        ("a  house, (red:1.2)  <lora:ink:1>", "a  house, (red:1.2)"),  # the user's text kept
    ],
)
def test_moved_tags_leave_no_stray_commas_or_spaces(prompt: str, left: str) -> None:
    assert st.move_tags_to_stack(prompt, [])[0] == left


def test_trigger_words_and_filters(engine: Service) -> None:
    ink, soft, xl = (engine.resolve_lora(n) for n in ("ink", "soft", "xl-only"))
    assert st.trigger_text(ink) == "ink wash, monochrome"
    assert st.trigger_text(soft) == "soft light"  # the sidecar's activation text wins
    assert st.insert_text("castle", "soft light") == "castle, soft light"
    assert st.insert_text("castle, soft light", "soft light") == "castle, soft light"
    assert st.insert_text("", "soft light") == "soft light"
    assert st.incompatibility(ink, "SD1") is None
    assert st.incompatibility(xl, "SD1") == "made for SDXL; the checkpoint is SD1"
    assert st.matches(ink, "wash", "All", "SD1") and st.matches(ink, "INK_style", "SD1", "SD1")
    assert not st.matches(xl, "", "Compatible", "SD1") and st.matches(xl, "", "SDXL", "SD1")
    assert not st.matches(ink, "glow", "All", "SD1")


def test_card_shows_preview_facts_and_reason(engine: Service) -> None:
    card = st.card_html(engine.resolve_lora("ink"), None)
    assert 'src="data:image/jpeg;base64,' in card and "rank 4" in card
    assert "alias ink_style" in card and "ink wash" in card
    xl = engine.resolve_lora("xl-only")
    card = st.card_html(xl, st.incompatibility(xl, "SD1"))
    assert "no preview" in card and "made for SDXL" in card
    assert "<script>" not in st.card_html(
        engine.resolve_lora("glow").__class__(
            **{**engine.resolve_lora("glow").__dict__, "name": "<script>x"}
        ),
        None,
    )


# --------------------------------------------------------------------------- PNG Info


def test_recall_fills_fields_keeps_tags_and_renames_a_lora_found_by_hash(engine: Service) -> None:
    """As A1111's paste the prompt keeps its tags (no stack rows: the image replays with
    exactly its LoRAs); a tag whose file is here under another name is renamed; a tag
    whose file is not here stays, with a warning; keys the page has no use for are
    listed."""
    glow_hash = engine.resolve_lora("glow").short_hash
    text = (
        "castle <lora:ink_style:0.8> <lora:old-glow:-0.5> <lora:gone:1>\n"
        "Negative prompt: blurry\n"
        "Steps: 7, Sampler: DPM++ 2M Karras, CFG scale: 4.5, Seed: 42, Size: 96x64, "
        f'Model hash: 0123456789, Model: elsewhere, Clip skip: 2, Lora hashes: "old-glow: '
        f'{glow_hash}, gone: abcdefabcdef", Version: v1.10.1, Face restoration: CodeFormer'
    )
    found = recall(text, engine)
    assert found.values == {
        "prompt": "castle <lora:ink_style:0.8> <lora:glow:-0.5> <lora:gone:1>",
        "negative_prompt": "blurry",
        "steps": 7,
        "sampler_name": "DPM++ 2M",
        "scheduler": "Karras",
        "cfg_scale": 4.5,
        "seed": 42,
        "clip_skip": 2,
        "width": 96,
        "height": 64,
        # what an infotext without these keys means (so the page replays it exactly)
        "subseed_strength": 0.0,
        "seed_resize_from_w": 0,
        "seed_resize_from_h": 0,
        "tiling": False,
        "eta_noise_seed_delta": 0,
        "enable_hr": False,  # no Hires keys: the pasted image was made without it
        "refiner_checkpoint": "None",  # no Refiner keys: made without one
        "controlnet_enabled": False,  # no ControlNet unit: made without one
        "randn_source": "NV",  # an A1111 infotext without RNG, recalled on a CPU
    }
    assert found.not_applied == ["Face restoration"]
    assert found.checkpoint is None
    warnings = "\n".join(found.warnings)
    assert "'old-glow' is here as 'glow'" in warnings
    assert "'gone' (hash abcdefabcdef) is not in the LoRA folders; its tag stays" in warnings
    assert "checkpoint elsewhere [0123456789]" in warnings
    assert "made on an NVIDIA GPU, so its noise source NV was chosen" in warnings


def test_recall_fills_variation_seed_resize_and_tiling(engine: Service) -> None:
    text = (
        "castle\nSteps: 7, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 96x64, "
        "Variation seed: 77, Variation seed strength: 0.3, Seed resize from: 64x48, "
        "Tiling: True, Version: lorastack 0.1.0"
    )
    values = recall(text, engine).values
    assert (values["subseed"], values["subseed_strength"]) == (77, 0.3)
    assert (values["seed_resize_from_w"], values["seed_resize_from_h"]) == (64, 48)
    assert values["tiling"] is True
    assert values["randn_source"] == "CPU"  # a lorastack image from before RNG was written
    assert recall(text.replace("Tiling", "RNG: NV, Tiling"), engine).values["randn_source"] == "NV"


def test_image_info_png_jpeg_and_raw_other_metadata(tmp_path: Path) -> None:
    image = Image.new("RGB", (8, 8))
    text = "a cat\nSteps: 3, Seed: 1, Size: 8x8"
    assert read_image_info(write_png_with_infotext(image, text)).infotext == text
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + text.encode("utf-16-be")
    jpeg = tmp_path / "a.jpg"
    image.save(jpeg, exif=exif)
    assert read_image_info(jpeg).infotext == text
    from PIL.PngImagePlugin import PngInfo

    comfy = PngInfo()
    comfy.add_text("prompt", '{"3": {"class_type": "KSampler"}}')
    png = tmp_path / "comfy.png"
    image.save(png, pnginfo=comfy)
    info = read_image_info(png)
    assert info.infotext is None and "KSampler" in info.other["prompt"]


# --------------------------------------------------------------------------- defaults


def test_admin_defaults_persist_and_bad_values_are_ignored(engine: Service, tmp_path: Path) -> None:
    bounds = engine.bounds()
    assert load_defaults(tmp_path, bounds)["steps"] == 20
    settings_file(tmp_path).write_text(json.dumps({"other": {"kept": True}}))
    values = {**load_defaults(tmp_path, bounds), "steps": 30, "sampler_name": "Euler a"}
    save_defaults(tmp_path, values, bounds)
    stored = json.loads(settings_file(tmp_path).read_text())
    assert stored["other"] == {"kept": True}
    assert load_defaults(tmp_path, bounds)["steps"] == 30
    with pytest.raises(ValueError, match="steps must be between 1 and 150"):
        save_defaults(tmp_path, {**values, "steps": 999}, bounds)
    stored["txt2img_defaults"].update(width=-5, scheduler="nonsense", cfg_scale="x")
    settings_file(tmp_path).write_text(json.dumps(stored))
    loaded = load_defaults(tmp_path, bounds)
    assert (loaded["width"], loaded["scheduler"], loaded["cfg_scale"]) == (512, "automatic", 7.0)
    assert loaded["sampler_name"] == "Euler a"


# --------------------------------------------------------------------------- jobs


def run_all(
    engine: Service, user: str, request: GenerationRequest, preview_every: int = 0
) -> list[object]:
    return list(follow_job(engine, request, user, preview_every))


def test_job_streams_progress_and_previews(engine: Service) -> None:
    items = run_all(engine, "a", GenerationRequest(prompt="x", seed=3, **{**SMALL, "steps": 5}), 2)
    assert isinstance(items[0], str)  # the job id, first (the page keeps it for Interrupt)
    updates = [i for i in items if isinstance(i, ProgressSnapshot) and i.sampling_step]
    assert [u.sampling_step for u in updates] == [1, 2, 3, 4, 5]
    assert [bool(u.preview) for u in updates] == [False, True, False, True, False]
    assert updates[1].preview[0].size == (64, 64)
    assert isinstance(items[-1], GenerationResult) and not items[-1].interrupted


def _run_in_thread(engine: Service, user: str, request: GenerationRequest) -> tuple:
    items: list[object] = []
    started = threading.Event()

    def run() -> None:
        for item in follow_job(engine, request, user, 0):
            items.append(item)
            if isinstance(item, ProgressSnapshot) and item.sampling_step:
                started.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, items, started


def test_interrupt_acts_only_on_the_users_own_job(engine: Service) -> None:
    request = GenerationRequest(prompt="x", seed=3, **{**SMALL, "steps": 6, "n_iter": 2})
    thread, items, started = _run_in_thread(engine, "alice", request)
    assert started.wait(60)
    assert interrupt_jobs(engine, "", "bob") == "Nothing of yours is running"
    thread.join(120)
    assert items[-1].interrupted is False and len(items[-1].images) == 2

    thread, items, started = _run_in_thread(engine, "alice", request)
    assert started.wait(60)
    assert interrupt_jobs(engine, items[0], "alice").startswith("Interrupting")
    thread.join(120)
    result = items[-1]
    assert result.interrupted and len(result.images) < 2


def test_a_new_tab_interrupts_the_users_job_by_listing_it(engine: Service) -> None:
    """The tab that started it is gone (no job id known): the user's jobs are found by
    user and stopped; a queued one leaves the queue at once."""
    blocker = engine.submit(GenerationRequest(prompt="x", seed=1, **{**SMALL, "steps": 8}))
    thread, items, _ = _run_in_thread(engine, "carol", GenerationRequest(prompt="y", **SMALL))
    deadline = threading.Event()
    while not any(info.user == "carol" for info in engine.jobs()):
        assert not deadline.wait(0.01) and thread.is_alive()
    assert interrupt_jobs(engine, "", "carol") == "Interrupting 1 job(s) of yours"
    thread.join(60)
    assert items[-1] is None  # taken out of the queue before it started
    assert engine.result(blocker).images
    assert isinstance(
        run_all(engine, "carol", GenerationRequest(prompt="y", **SMALL))[-1], GenerationResult
    )


# --------------------------------------------------------------------------- the endpoint


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel, tiny_sdxl: LoadedModel
) -> Iterator[tuple[str, Path]]:
    """The real app (`python app.py`, demo model) with the test LoRAs in its folder."""
    data = tmp_path_factory.mktemp("served")
    make_lora_folder(data / "loras", tiny_sd1.pipe, tiny_sdxl.pipe)
    with app_server(data) as url:
        yield url, data


def call(url: str, **fields: object) -> tuple:
    from gradio_client import Client

    values = {
        "prompt": "a tower",
        "negative_prompt": "",
        "steps": 2,
        "cfg_scale": 7,
        "sampler_name": "Euler",
        "scheduler": "Automatic",
        "seed": 9,
        "width": 64,
        "height": 64,
        "batch_size": 1,
        "n_iter": 1,
        "clip_skip": 1,
        "checkpoint": DEMO_MODEL_NAME,
        "loras": [],
        **fields,
    }
    client = Client(url, verbose=False)
    try:
        return client.predict(**values, api_name="/txt2img")
    finally:
        client.close()


def test_endpoint_named_parameters_stack_and_saved_png(served: tuple[str, Path]) -> None:
    url, data = served
    loras = [{"name": "ink", "weight": 0.8}, {"name": "glow", "weight": -0.5, "te_weight": 0.25}]
    images, infotext, seeds = call(url, loras=loras, batch_size=2)
    assert seeds == [9, 10] and len(images) == 2
    parsed = parse_infotext(infotext)
    assert parsed.prompt == "a tower <lora:ink:0.8> <lora:glow:0.25:-0.5>"
    assert set(parsed.lora_hashes) == {"ink", "glow"}
    saved = sorted((data / "outputs" / "txt2img-images").rglob("*-9.png"))
    assert saved and read_infotext(saved[-1]) == infotext
    # the gallery serves the saved PNG itself, parameters included
    assert Path(images[0]["image"]).read_bytes() == saved[-1].read_bytes()


def test_endpoint_takes_the_extra_seed_row_and_tiling(served: tuple[str, Path]) -> None:
    fields = {"subseed": 5, "subseed_strength": 0.5, "seed_resize_from_w": 48}
    _, infotext, _ = call(url=served[0], **fields, seed_resize_from_h=48, tiling=True)
    params = parse_infotext(infotext).params
    assert (params["Variation seed"], params["Variation seed strength"]) == ("5", "0.5")
    assert params["Seed resize from"] == "48x48" and params["Tiling"] == "True"
    ensd = {"sampler_name": "Euler a", "eta_noise_seed_delta": 31337}
    assert parse_infotext(call(url=served[0], **ensd)[1]).params["ENSD"] == "31337"


def test_endpoint_streams_previews_before_the_result(served: tuple[str, Path]) -> None:
    from gradio_client import Client

    client = Client(served[0], verbose=False)
    job = client.submit(
        "a tower",
        "",
        7,
        7,
        "Euler",
        "Automatic",
        1,
        64,
        64,
        1,
        1,
        1,
        DEMO_MODEL_NAME,
        [],
        api_name="/txt2img",
    )
    final = job.result(timeout=120)
    outputs = job.outputs()
    client.close()
    # the job id (kept by the page for Interrupt), previews after steps 3 and 6, the result
    assert len(outputs) == 4
    assert "Seed: 1" in final[1]


def test_engine_errors_are_readable_and_the_page_keeps_serving(served: tuple[str, Path]) -> None:
    from gradio_client.exceptions import AppError

    url = served[0]
    with pytest.raises(AppError, match="unknown LoRA 'inc'; close matches: ink"):
        call(url, loras=[{"name": "inc", "weight": 1}])
    with pytest.raises(AppError, match="SDXL"):
        call(url, prompt="a tower <lora:xl-only:1>")
    with pytest.raises(AppError, match="exceeds the limit"):
        call(url, width=2048, height=2048)
    with pytest.raises(AppError, match="loras"):
        call(url, loras=[{"weight": 1}])
    with pytest.raises(AppError, match="no-such-refiner"):  # the Refiner section's value
        call(url, refiner_checkpoint="no-such-refiner", refiner_switch_at=0.5)
    assert call(url)[2] == [9]


def test_endpoint_hires_fix_and_its_recalled_values_replay(
    served: tuple[str, Path], engine: Service
) -> None:
    hires = {
        "enable_hr": True,
        "hr_upscaler": "Latent (bicubic)",
        "hr_second_pass_steps": 1,
        "denoising_strength": 0.6,
        "hr_scale": 1.5,
        "hr_sampler_name": "DPM++ 2M",
        "hr_scheduler": "Karras",
        "hr_prompt": "a tall tower",
    }
    images, infotext, _ = call(served[0], **hires)
    with Image.open(images[0]["image"]) as image:
        assert image.size == (96, 96)
        first = np.asarray(image.convert("RGB"))
    params = parse_infotext(infotext).params
    assert params["Hires upscale"] == "1.5" and params["Hires upscaler"] == "Latent (bicubic)"
    assert (params["Hires steps"], params["Denoising strength"]) == ("1", "0.6")
    assert (params["Hires sampler"], params["Hires schedule type"]) == ("DPM++ 2M", "Karras")
    assert params["Hires prompt"] == "a tall tower"

    found = recall(infotext, engine)  # "Send to txt2img" fills the section back
    assert {name: found.values[name] for name in hires} == hires
    assert found.values["hr_checkpoint_name"] == "Use same checkpoint"
    again, _, _ = call(served[0], **{**found.values, "checkpoint": DEMO_MODEL_NAME, "loras": []})
    with Image.open(again[0]["image"]) as image:
        assert np.array_equal(np.asarray(image.convert("RGB")), first)
    images, _, _ = call(served[0], **{**hires, "enable_hr": False})  # off: the first pass only
    with Image.open(images[0]["image"]) as image:
        assert image.size == (64, 64)


def test_endpoint_xyz_plot_shows_and_saves_the_grid(served: tuple[str, Path]) -> None:
    url, data = served
    plot = {
        "script_name": "X/Y/Z plot",
        "xyz_x_type": "LoRA weight",
        "xyz_x_values": "ink: 0, 1",
        "xyz_y_type": "Steps",
        "xyz_y_values": "1,2",
        "xyz_draw_legend": False,
        "xyz_include_lone_images": True,
    }
    images, infotext, seeds = call(url, **plot)
    assert len(images) == 1 + 4 and seeds[0] == 9
    with Image.open(images[0]["image"]) as grid:
        assert grid.size == (128, 128)
        pixels = np.asarray(grid.convert("RGB"))
    with Image.open(images[4]["image"]) as cell:  # x = ink 1, y = 2 steps
        assert np.array_equal(pixels[64:, 64:], np.asarray(cell.convert("RGB")))
    params = parse_infotext(infotext).params
    assert (params["Script"], params["X Type"], params["X Values"]) == (
        "X/Y/Z plot",
        "LoRA weight",
        "ink: 0, 1",
    )
    assert sorted((data / "outputs" / "txt2img-grids").rglob("*.png"))
    assert "<lora:ink:1>" in parse_infotext(read_infotext(images[4]["image"]) or "").prompt
    cells = data / "outputs" / "txt2img-images"
    before = len(list(cells.rglob("*.png")))
    shown, _, _ = call(url, **{**plot, "xyz_include_lone_images": False})
    assert len(shown) == 1  # the grid only; its 4 cells are saved with their parameters
    assert len(list(cells.rglob("*.png"))) == before + 4


def test_tag_beats_row_with_a_note(served: tuple[str, Path]) -> None:
    _, infotext, _ = call(
        served[0], prompt="a tower <lora:ink:0.5>", loras=[{"name": "ink", "weight": 1.0}]
    )
    assert "<lora:ink:0.5>" in infotext and "<lora:ink:1>" not in infotext


def test_admin_actions_need_the_admin_credential_not_an_address(tmp_path: Path) -> None:
    """Behind a proxy every client can claim loopback; only --admin-auth counts."""
    from frontends.page.tabs import admin_refusal

    closed = Settings(data_dir=tmp_path)
    assert "--admin-auth" in (admin_refusal(closed, "", "") or "")
    admin = Settings(data_dir=tmp_path, admin_auth="boss:s3cret:x")
    assert admin_refusal(admin, "boss", "s3cret:x") is None
    for user, password in (("boss", "s3cret"), ("Boss", "s3cret:x"), ("", ""), ("x", "s3cret:x")):
        assert admin_refusal(admin, user, password) == "wrong admin user or password"
    with pytest.raises(ValueError, match="--admin-auth must look like user:pass"):
        Settings(data_dir=tmp_path, admin_auth="boss")


def test_adding_files_is_an_admin_action_only_on_a_shared_server(tmp_path: Path) -> None:
    from frontends.page.ui import files_admin_check

    assert files_admin_check(Settings(data_dir=tmp_path)) is None  # this machine only
    shared = files_admin_check(Settings(data_dir=tmp_path, listen=True))
    assert shared is not None and "--admin-auth" in (shared("", "") or "")
    admin = files_admin_check(Settings(data_dir=tmp_path, share=True, admin_auth="boss:pw"))
    assert admin is not None and admin("boss", "pw") is None
    assert admin("boss", "nope") == "wrong admin user or password"


def test_endpoint_prompts_from_file_script(served: tuple[str, Path]) -> None:
    url, data = served
    text = 'a cat\n--prompt "a dog" --steps 3 --batch_size 2'
    images, infotext, seeds = call(
        url,
        prompt="",
        script_name="Prompts from file or textbox",
        prompts_iterate_seed=True,
        prompts_text=text,
    )
    assert len(images) == 3 and seeds == [9, 10, 11]
    assert parse_infotext(infotext).prompt == "a cat"
    saved = sorted((data / "outputs" / "txt2img-images").rglob("*-11.png"))
    assert saved and parse_infotext(read_infotext(saved[-1])).params["Steps"] == "3"


# --------------------------------------------------------------------------- styles


def test_styles_apply_save_delete_and_admin_on_a_shared_server(
    engine: Service, tmp_path: Path
) -> None:
    """📋 merges the selected styles into the prompts as A1111 does; saving the prompts as
    a style and deleting one are admin actions only on a shared server."""
    from frontends.page.styles_panel import apply_selected, delete_named, save_from_prompts
    from frontends.page.ui import files_admin_check

    local = files_admin_check(Settings(data_dir=tmp_path))
    shared = files_admin_check(Settings(data_dir=tmp_path, listen=True, admin_auth="boss:pw"))
    assert local is None and shared is not None
    with pytest.raises(LorastackError, match="admin action; wrong admin user or password"):
        save_from_prompts(engine, shared, "frame", "masterpiece, {prompt}", "{prompt}, lowres")
    assert engine.styles().get("frame") is None
    sheet = save_from_prompts(
        engine, shared, "frame", "masterpiece, {prompt}", "{prompt}, lowres", "boss", "pw"
    )
    assert sheet.get("frame") == PromptStyle("frame", "masterpiece, {prompt}", "{prompt}, lowres")
    save_from_prompts(engine, local, "tail", "film grain", "")
    styled = apply_selected(engine, "a cat", "ugly", ["frame", "tail"])
    assert styled == ("masterpiece, a cat, film grain", "ugly, lowres")
    assert apply_selected(engine, "a cat", "", []) == ("a cat", "")
    with pytest.raises(LorastackError, match="admin action"):
        delete_named(engine, shared, "tail", "boss", "nope")
    assert delete_named(engine, shared, "tail", "boss", "pw").names == ["frame"]
    with pytest.raises(LorastackError, match="'tail' is no longer in styles.csv"):
        apply_selected(engine, "a cat", "", ["tail"])
    delete_named(engine, local, "frame")
    assert engine.styles().styles == ()


def test_recall_takes_styles_out_of_the_prompts(engine: Service) -> None:
    """As A1111's paste ("Apply if any"): styles found at the prompts' ends are selected and
    removed; the page's stack tags after the styled prompt do not hide them."""
    engine.save_style(PromptStyle("frame", "masterpiece, {prompt}", "{prompt}, lowres"))
    engine.save_style(PromptStyle("tail", "film grain", "blurry"))
    try:
        text = (
            "masterpiece, castle, film grain <lora:glow:0.5>\n"
            "Negative prompt: fog, lowres, blurry\n"
            "Steps: 7, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 64x64"
        )
        found = recall(text, engine)
        assert found.styles == ["frame", "tail"]
        assert found.values["prompt"] == "castle <lora:glow:0.5>"
        assert found.values["negative_prompt"] == "fog"
        plain = recall(text.replace("film grain", "oil"), engine)
        assert plain.styles == []
        assert plain.values["prompt"] == "masterpiece, castle, oil <lora:glow:0.5>"
    finally:
        engine.delete_style("frame")
        engine.delete_style("tail")


def test_endpoint_applies_styles(served: tuple[str, Path]) -> None:
    url, data = served
    (data / "styles.csv").write_text(
        'name,prompt,negative_prompt\r\nframe,"masterpiece, {prompt}",lowres\r\n',
        encoding="utf-8-sig",
    )
    try:
        _, infotext, _ = call(url, styles=["frame"])
        parsed = parse_infotext(infotext)
        assert parsed.prompt == "masterpiece, a tower" and parsed.negative_prompt == "lowres"
        _, plain, _ = call(url)
        assert parse_infotext(plain).prompt == "a tower"  # no styles: the prompt as typed
    finally:
        (data / "styles.csv").unlink()


def test_send_to_txt2img_lists_denoising_without_hires_as_not_applied(engine: Service) -> None:
    """An img2img image's `Denoising strength` has no place in txt2img without Hires. fix:
    listed, not silently set; with Hires keys it turns Hires. fix on and is applied."""
    from frontends.page.tabs import txt2img_unused

    base = "castle\nSteps: 7, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 64x64"
    alone = recall(f"{base}, Denoising strength: 0.4", engine)
    assert txt2img_unused(alone) == ["Denoising strength (txt2img uses it only with Hires. fix)"]
    assert "denoising_strength" not in alone.values
    hires = recall(f"{base}, Denoising strength: 0.4, Hires upscale: 2", engine)
    assert txt2img_unused(hires) == [] and hires.values["denoising_strength"] == 0.4
    dropped = recall(f"{base}, Hires upscale: 2, Hires upscaler: Latent", engine)
    assert txt2img_unused(dropped) == ["Hires upscale", "Hires upscaler"]


def test_recalled_controlnet_units_are_not_listed_as_not_applied(engine: Service) -> None:
    """A `ControlNet 0` unit is recalled into the ControlNet section (which reports what
    it could not restore), so it is not also listed as not applied."""
    text = (
        'castle\nSteps: 7, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 64x64, ControlNet 0: "'
        'Module: canny, Model: gone [0123abcd], Weight: 1", Face restoration: CodeFormer'
    )
    assert recall(text, engine).not_applied == ["Face restoration"]
