"""`frontends.api.a1111`: the pure A1111 JSON <-> request translation, without a server."""

from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

from frontends.api import a1111
from pipelines.errors import InvalidRequestError, NotFoundError
from pipelines.infotext import write_png_with_infotext
from pipelines.schema import GenerationRequest, GenerationResult
from pipelines.styles import PromptStyle


def parse(body: dict) -> a1111.Txt2ImgCall:
    return a1111.parse_txt2img(body, a1111.ApiOptions())


def test_a1111_defaults() -> None:
    call = parse({})
    request = call.request
    assert (request.steps, request.cfg_scale, request.width, request.height) == (50, 7.0, 512, 512)
    assert (request.seed, request.batch_size, request.n_iter) == (-1, 1, 1)
    assert (request.sampler_name, request.scheduler) == ("Euler", "automatic")
    assert request.checkpoint is None and request.clip_skip == 1
    assert call.send_images and not call.save_images and call.restore_checkpoint
    assert call.parameters == a1111.TXT2IMG_DEFAULTS and call.ignored == []


@pytest.mark.parametrize(
    ("body", "sampler", "scheduler"),
    [
        ({"sampler_name": None, "scheduler": None}, "Euler", "automatic"),
        ({"sampler_name": "DPM++ 2M Karras"}, "DPM++ 2M", "karras"),
        ({"sampler_name": "dpm++ 2m", "scheduler": "Karras"}, "DPM++ 2M", "karras"),
        ({"sampler_name": "Euler a", "scheduler": "automatic"}, "Euler a", "automatic"),
        ({"sampler_name": "DPM++ 2S a", "scheduler": "SGM Uniform"}, "DPM++ 2S a", "sgm_uniform"),
        ({"sampler_name": "k_dpmpp_2s_a", "scheduler": "ddim"}, "DPM++ 2S a", "ddim"),
        ({"sampler_index": "DDIM"}, "DDIM", "automatic"),
        ({"sampler_name": "", "sampler_index": "Euler a"}, "Euler a", "automatic"),
    ],
)
def test_sampler_names(body: dict, sampler: str, scheduler: str) -> None:
    request = parse(body).request
    assert (request.sampler_name, request.scheduler) == (sampler, scheduler)


def test_override_settings_and_options() -> None:
    options = a1111.ApiOptions(clip_skip=2)
    call = a1111.parse_txt2img({"override_settings": {"sd_vae": "x", "eta_noise": 1}}, options)
    assert call.request.clip_skip == 2 and call.ignored == ["override_settings.eta_noise"]
    assert call.request.vae == "x" and call.vae_override == "x"
    assert a1111.parse_txt2img({}, a1111.ApiOptions(sd_vae="kept.pt")).request.vae == "kept.pt"
    body = {
        "override_settings": {"sd_model_checkpoint": "xl/a", "CLIP_stop_at_last_layers": 3},
        "override_settings_restore_afterwards": False,
    }
    call = a1111.parse_txt2img(body, options)
    assert call.request.checkpoint == "xl/a" and call.request.clip_skip == 3
    assert not call.restore_checkpoint
    change = a1111.parse_options({"sd_model_checkpoint": "m", "CLIP_stop_at_last_layers": 2})
    assert (change.checkpoint, change.clip_skip) == ("m", 2)
    assert a1111.parse_options({"samples_format": "jpg"}).saving == {"samples_format": "jpg"}
    assert a1111.parse_options({"send_seed": False}).paste == {"send_seed": False}
    assert a1111.parse_options({"eta_noise_seed_delta": 31337}).eta_noise_seed_delta == 31337
    shown = a1111.current_options("m", None, options, "Approx cheap")
    assert a1111.parse_options(shown, shown).checkpoint == "m"  # GET posted back: accepted
    for bad, field in (
        ({"enable_pnginfo": False}, "enable_pnginfo"),  # shown, but fixed here
        ({"eta_noise_seed_delta": -1}, "eta_noise_seed_delta"),  # ENSD: an integer >= 0
        ({"sd_vea": "x"}, "sd_vea"),  # unknown: named, with the close match
        ({"send_size": "yes"}, "send_size"),
    ):
        with pytest.raises(InvalidRequestError) as caught:
            a1111.parse_options(bad, shown)
        assert caught.value.field == field
    assert "sd_vae" in str(caught.value.message) or field == "send_size"


def test_unimplemented_fields_pass_only_when_they_ask_for_nothing() -> None:
    neutral = {"restore_faces": False, "styles": [], "eta": None, "hr_scale": 2.0, "tiling": None}
    assert parse(neutral).ignored == []
    assert parse({"brand_new": 0}).ignored == ["brand_new"]  # not an A1111 field: reported


def test_webuiapi_full_default_payload_is_accepted() -> None:
    """webuiapi sends every field, with A1111's option defaults (eta 1, s_noise 1) and
    hires settings that A1111 ignores while enable_hr is false."""
    body = {
        "enable_hr": False,
        "hr_scale": 2,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 0,
        "firstphase_width": 0,
        "styles": [],
        "subseed_strength": 0.0,
        "seed_resize_from_h": 0,
        "seed_resize_from_w": 0,
        "restore_faces": False,
        "tiling": False,
        "eta": 1.0,
        "s_churn": 0,
        "s_tmax": 0,
        "s_tmin": 0,
        "s_noise": 1,
        "script_args": [],
        "alwayson_scripts": {},
    }
    assert parse(body).ignored == []


@pytest.mark.parametrize(
    "body",
    [
        {"restore_faces": True},
        {"script_name": "prompt matrix"},
        {"alwayson_scripts": {"adetailer": {"args": [True]}}},
        {"s_noise": 0.9},
        {"eta": 0.5},
        {"eta": 1.0, "sampler_name": "DDIM"},
        {"disable_extra_networks": True},
    ],
)
def test_unimplemented_fields_asking_for_something_are_422(body: dict[str, object]) -> None:
    key = next(k for k in body if k not in ("sampler_name", "enable_hr"))
    with pytest.raises(InvalidRequestError, match="does not implement") as error:
        parse(body)
    assert error.value.field == key


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"steps": "20"}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"seed": True}, "seed"),
        ({"cfg_scale": "7"}, "cfg_scale"),
        ({"prompt": ["a"]}, "prompt"),
        ({"sampler_name": "Nope"}, "sampler_name"),
        ({"sampler_index": "Nope"}, "sampler_index"),
        ({"scheduler": "nope"}, "scheduler"),
        ({"override_settings": "x"}, "override_settings"),
        ({"override_settings": {"CLIP_stop_at_last_layers": 0}}, "override_settings."),
        ({"override_settings": {"sd_model_checkpoint": 5}}, "override_settings."),
        ({"save_images": 1}, "save_images"),
        ({"styles": "not a list"}, "styles"),
        ({"styles": ["a", 1]}, "styles"),
    ],
)
def test_errors_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        parse(body)
    assert error.value.field is not None and error.value.field.startswith(field)
    assert error.value.status == 422


def test_integral_floats_are_integers() -> None:
    assert parse({"steps": 20.0}).request.steps == 20


def test_info_and_response_shape() -> None:
    call = parse({"prompt": "cat", "seed": 3, "batch_size": 2, "send_images": True})
    used = GenerationRequest(prompt="cat", seed=3, batch_size=2, width=64, height=64)
    images = [Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64), "red")]
    result = GenerationResult(images, [3, 4], ["cat\nSeed: 3", "cat\nSeed: 4"], used, "m", "abc")
    pngs = [write_png_with_infotext(i, t) for i, t in zip(images, result.infotexts, strict=True)]
    response = a1111.txt2img_response(call, result, pngs, started=0.0)
    assert set(response) == {"images", "parameters", "info"}
    assert base64.b64decode(response["images"][1]) == pngs[1]
    info = json.loads(response["info"])
    assert info["all_seeds"] == [3, 4] and info["seed"] == 3 and info["all_prompts"] == ["cat"] * 2
    assert info["sd_model_hash"] == "abc" and info["infotexts"][1] == "cat\nSeed: 4"
    call.send_images = False
    assert a1111.txt2img_response(call, result, pngs, started=0.0)["images"] == []


def test_png_info_reads_parameters_and_other_chunks() -> None:
    from PIL.PngImagePlugin import PngInfo

    chunks = PngInfo()
    chunks.add_text("parameters", "a cat\nSteps: 2, Seed: 5, Size: 64x32")
    chunks.add_text("Software", "paint")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32)).save(buffer, format="PNG", pnginfo=chunks)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    info = a1111.png_info({"image": encoded})
    assert info["info"].startswith("a cat") and info["items"] == {"Software": "paint"}
    assert info["parameters"]["Size-2"] == "32" and info["parameters"]["Prompt"] == "a cat"


def test_error_body_is_a1111_shaped() -> None:
    body = a1111.error_body(NotFoundError("unknown checkpoint 'x'; known: a, b"), 404)
    assert body == {
        "error": "NotFoundError",
        "detail": "unknown checkpoint 'x'; known: a, b",
        "body": "",
        "errors": "unknown checkpoint 'x'; known: a, b",
    }


def test_randn_source_per_request_and_as_an_option() -> None:
    call = parse({"override_settings": {"randn_source": "NV"}})
    assert call.request.randn_source == "NV" and call.ignored == []
    assert parse({}).request.randn_source == "CPU"  # ours; A1111's default is GPU
    kept = a1111.ApiOptions(randn_source="GPU")
    assert a1111.parse_txt2img({"prompt": "x"}, kept).request.randn_source == "GPU"
    assert a1111.parse_options({"randn_source": "NV"}).randn_source == "NV"
    assert a1111.current_options("m", None, kept, "Approx cheap")["randn_source"] == "GPU"
    with pytest.raises(InvalidRequestError) as error:
        parse({"override_settings": {"randn_source": "cuda"}})
    assert error.value.field == "override_settings.randn_source"


def _b64_png(size: tuple[int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 80, 120)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize(
    "extra",
    [
        # A1111's own test/test_extras.py payloads: full, image only, and image + "model"
        {
            "resize_mode": 0,
            "show_extras_results": True,
            "gfpgan_visibility": 0,
            "codeformer_visibility": 0,
            "codeformer_weight": 0,
            "upscaling_resize": 2,
            "upscaling_resize_w": 128,
            "upscaling_resize_h": 128,
            "upscaling_crop": True,
            "upscaler_1": "Lanczos",
            "upscaler_2": "None",
            "extras_upscaler_2_visibility": 0,
        },
        {},
        {"model": "clip"},
    ],
)
def test_a1111_extras_test_payloads_parse(extra: dict) -> None:
    request = a1111.parse_extras({"image": _b64_png((32, 16)), **extra}, batch=False)
    assert request.images[0].size == (32, 16)
    assert request.upscaler_1 == extra.get("upscaler_1", "None")
    assert request.upscaling_resize == 2 and request.resize_mode == 0


def test_extras_batch_and_response_shapes() -> None:
    from pipelines.extras import ExtrasResult

    body = {"imageList": [{"data": _b64_png((8, 8)), "name": "a"}], "upscaler_1": "Nearest"}
    request = a1111.parse_extras(body, batch=True)
    result = ExtrasResult(
        [Image.new("RGB", (16, 16))], ["Postprocess upscaler: Nearest"], request, parameters=[None]
    )
    reply = a1111.extras_response(result, batch=True)
    assert set(reply) == {"html_info", "images"} and len(reply["images"]) == 1
    assert reply["html_info"] == "<p>Postprocess upscaler: Nearest</p>"
    with pytest.raises(InvalidRequestError) as raised:
        a1111.parse_extras({"imageList": []}, batch=True)
    assert raised.value.field == "imageList"


def test_hr_checkpoint_name_is_parsed_and_same_means_none() -> None:
    hires = parse({"enable_hr": True, "hr_checkpoint_name": "other"}).request.hires
    assert hires is not None and hires.checkpoint == "other"
    for same in ("Use same checkpoint", "", None):
        hires = parse({"enable_hr": True, "hr_checkpoint_name": same}).request.hires
        assert hires is not None and hires.checkpoint is None


def test_prompts_from_file_script_makes_one_request_per_line() -> None:
    body = {
        "prompt": "photo",
        "seed": 7,
        "steps": 4,
        "script_name": "Prompts From File or Textbox",
        "script_args": [True, False, "end", 'a cat\n\n--prompt "a dog" --steps 3'],
    }
    call = parse(body)
    assert call.series is not None and call.request.prompt == "photo"
    assert [(r.prompt, r.steps, r.seed) for r in call.series] == [
        ("photo a cat", 4, 7),
        ("photo a dog", 3, 8),
    ]
    assert call.parameters["script_name"] == body["script_name"]
    assert parse({}).series is None


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"script_args": [False, False, "start", "--prompt x --stepz 3"]}, ["line 1", "--stepz"]),
        ({"script_args": [False, False, "up", "a"]}, ["prompt_position"]),
        ({"script_args": [False, False, "start", ""]}, ["no line"]),
        ({"script_args": "a cat"}, ["list"]),
    ],
)
def test_prompts_from_file_bad_args_are_422(body: dict, words: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse({"script_name": "prompts from file or textbox", **body})
    assert caught.value.field == "script_args"
    for word in words:
        assert word in caught.value.message


def test_other_txt2img_scripts_are_still_refused() -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse({"script_name": "prompt matrix", "script_args": [1]})
    assert caught.value.field == "script_name"


def test_series_info_covers_every_image_of_every_line() -> None:
    call = parse(
        {
            "prompt": "base",
            "script_name": "prompts from file or textbox",
            "script_args": [False, False, "start", "a\nb"],
        }
    )
    assert call.series is not None
    red = Image.new("RGB", (8, 8), "red")
    results = [
        GenerationResult([red], [3], ["a base\nSteps: 2"], call.series[0], "m", None),
        GenerationResult([red, red], [4, 5], ["b1", "b2"], call.series[1], "m", None),
    ]
    info = a1111.series_info(call, results, 0.0)
    assert info["all_prompts"] == ["a base", "b base", "b base"]
    assert info["all_seeds"] == [3, 4, 5] and info["seed"] == 3
    assert info["infotexts"] == ["a base\nSteps: 2", "b1", "b2"]
    assert info["prompt"] == "base" and not info["interrupted"]
    assert a1111.series_info(call, results[:1], 0.0)["interrupted"]
    reply = a1111.series_response(call, results, [b"x", b"y", b"z"], 0.0)
    assert len(reply["images"]) == 3 and json.loads(reply["info"])["all_seeds"] == [3, 4, 5]


def test_prompts_from_file_script_on_img2img() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (72, 40), "red").save(buffer, format="PNG")
    body = {
        "init_images": [base64.b64encode(buffer.getvalue()).decode()],
        "script_name": "prompts from file or textbox",
        "script_args": [False, True, "start", "a cat\n--prompt dog --denoising_strength 0.5"],
    }
    with pytest.raises(InvalidRequestError, match="line 2"):
        a1111.parse_img2img(body, a1111.ApiOptions())
    body["script_args"][3] = "a cat\n--prompt dog --seed 4"
    call = a1111.parse_img2img(body, a1111.ApiOptions())
    assert call.series is not None and len(call.series) == 2
    assert all(r.img2img is not None and (r.width, r.height) == (72, 40) for r in call.series)
    assert call.series[0].seed >= 0 and call.series[1].seed == 4  # drawn once; its own


def test_an_unknown_img2img_script_lists_the_ones_we_run() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(buffer, format="PNG")
    body = {
        "init_images": [base64.b64encode(buffer.getvalue()).decode()],
        "script_name": "Prompt matrix",
    }
    with pytest.raises(InvalidRequestError) as caught:
        a1111.parse_img2img(body, a1111.ApiOptions())
    assert caught.value.field == "script_name"
    for name in a1111.scripts_listing()["img2img"]:
        assert name in caught.value.message


def test_styles_field_is_the_requests_and_info_lists_it() -> None:
    """`styles` names styles (applied by the service); null and [] mean none."""
    assert parse({"styles": ["frame", "tail"]}).request.styles == ("frame", "tail")
    assert parse({"styles": None}).request.styles == () == parse({}).request.styles
    img2img = a1111.parse_img2img(
        {"init_images": [_png_b64()], "styles": ["frame"]}, a1111.ApiOptions()
    )
    assert img2img.request.styles == ("frame",)
    call = parse({"prompt": "cat", "styles": ["frame"]})
    used = GenerationRequest(prompt="masterpiece, cat", styles=("frame",))
    result = GenerationResult(
        [Image.new("RGB", (8, 8))], [1], ["masterpiece, cat"], used, "m", None
    )
    info = a1111.txt2img_info(call, result, started=0.0)
    assert info["prompt"] == "masterpiece, cat" and info["styles"] == ["frame"]


def _png_b64(infotext: str | None = None) -> str:
    image = Image.new("RGB", (16, 16))
    data = write_png_with_infotext(image, infotext) if infotext else None
    if data is None:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
    return base64.b64encode(data).decode()


def test_png_info_finds_styles_as_a1111_apply_if_any() -> None:
    styles = (
        PromptStyle("frame", "masterpiece, {prompt}", "{prompt}, lowres"),
        PromptStyle("tail", "film grain", "blurry"),
    )
    params = "Steps: 2, Seed: 5, Size: 8x8"
    text = f"masterpiece, a cat, film grain\nNegative prompt: ugly, lowres, blurry\n{params}"
    parameters = a1111.png_info({"image": _png_b64(text)}, styles)["parameters"]
    assert parameters["Prompt"] == "a cat" and parameters["Negative prompt"] == "ugly"
    assert parameters["Styles array"] == ["frame", "tail"]
    plain = a1111.png_info({"image": _png_b64(text)})["parameters"]
    assert "Styles array" not in plain and plain["Prompt"] == "masterpiece, a cat, film grain"
