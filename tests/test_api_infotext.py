"""The A1111 API's `infotext` request field (A1111 >= 1.8 `apply_infotext`): every field
the body leaves out takes the infotext's value, explicit fields win, and what cannot be
applied is a note, an `ignored` entry or an error naming `infotext`.

In process, through the API's FastAPI app (`build_api`) on a service of its own: tiny SD1,
a tiny ControlNet, 72x64 images, 1-2 steps. Each expected image comes from the equivalent
request written out field by field, never from the infotext code.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from frontends.api.routes import build_api
from pipelines.loading import LoadedModel
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_controlnet import control_image, tiny_controlnet

FOX = (
    "a red fox, <lora:none-here:0.5>\n"
    "Negative prompt: blurry\n"
    "Steps: 2, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5, Seed: 7, "
    "Size: 72x64, Model: tiny-sd1, Clip skip: 2, RNG: CPU, Version: v1.10.1"
)
"""An A1111 infotext written by hand (its LoRA tag is removed before use below)."""
FOX_TEXT = FOX.replace(", <lora:none-here:0.5>", "")
FOX_FIELDS: dict[str, Any] = {
    "prompt": "a red fox",
    "negative_prompt": "blurry",
    "steps": 2,
    "sampler_name": "DPM++ 2M",
    "scheduler": "karras",
    "cfg_scale": 5,
    "seed": 7,
    "width": 72,
    "height": 64,
    "override_settings": {
        "sd_model_checkpoint": "tiny-sd1",
        "CLIP_stop_at_last_layers": 2,
        "randn_source": "CPU",
    },
}
"""The same request, field by field."""


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Service:
    controlnets = tmp_path_factory.mktemp("infotext-ControlNet")
    tiny_controlnet(tiny_sd1.pipe.unet, 1).save_pretrained(controlnets / "tiny-cn")
    data = tmp_path_factory.mktemp("infotext-data")
    settings = Settings(
        data_dir=data, ckpt_dirs=(models_dir,), controlnet_dir=controlnets, threads=2
    )
    made = build_service(settings)
    made.folders.hash_missing()
    return made


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(build_api(service, service.settings)) as made:
        yield made


def generate(client: TestClient, route: str, body: dict[str, Any]) -> tuple[np.ndarray, dict]:
    """The first image's pixels and the parsed `info` of a 200 answer."""
    answer = client.post(f"/{route}", json=body)
    assert answer.status_code == 200, answer.text
    payload = answer.json()
    image = Image.open(io.BytesIO(base64.b64decode(payload["images"][0])))
    return np.asarray(image.convert("RGB")), json.loads(payload["info"])


def refused(client: TestClient, route: str, body: dict[str, Any], status: int) -> str:
    answer = client.post(f"/{route}", json=body)
    assert answer.status_code == status, answer.text
    return answer.json()["detail"]


def test_infotext_alone_makes_the_image_of_the_explicit_request(client: TestClient) -> None:
    expected, _ = generate(client, "txt2img", FOX_FIELDS)
    made, info = generate(client, "txt2img", {"infotext": FOX_TEXT})
    assert made.shape == (64, 72, 3)
    assert np.array_equal(made, expected)
    assert (info["steps"], info["seed"], info["cfg_scale"], info["clip_skip"]) == (2, 7, 5, 2)
    assert (info["sampler_name"], info["scheduler"]) == ("DPM++ 2M", "karras")
    assert info["prompt"] == "a red fox" and info["negative_prompt"] == "blurry"
    assert info["sd_model_name"] == "tiny-sd1"
    # a different request makes a different image: the comparison can fail
    other, _ = generate(client, "txt2img", {**FOX_FIELDS, "seed": 8})
    assert not np.array_equal(other, expected)


def test_explicit_fields_win_over_the_infotext(client: TestClient) -> None:
    expected, _ = generate(client, "txt2img", {**FOX_FIELDS, "seed": 8, "steps": 1})
    made, info = generate(client, "txt2img", {"infotext": FOX_TEXT, "seed": 8, "steps": 1})
    assert (info["seed"], info["steps"], info["width"]) == (8, 1, 72)
    assert np.array_equal(made, expected)
    # an option the body's override_settings sets wins over the infotext's
    body = {"infotext": FOX_TEXT, "steps": 1, "override_settings": {"CLIP_stop_at_last_layers": 1}}
    assert generate(client, "txt2img", body)[1]["clip_skip"] == 1
    # a key sent as null is set too (A1111's pydantic `exclude_unset`)
    assert generate(client, "txt2img", {"infotext": FOX_TEXT, "steps": 1, "seed": None})[1][
        "seed"
    ] not in (7,)


def test_what_is_not_applied_is_reported(client: TestClient) -> None:
    text = FOX_TEXT.replace(
        "Version: v1.10.1",
        "Face restoration: CodeFormer, ENSD: 31337, Model hash: 0123456789, "
        "Hires upscale: 2, Version: v1.10.1",
    ).replace("Model: tiny-sd1", "Model: elsewhere")
    made, info = generate(client, "txt2img", {"infotext": text, "steps": 1})
    assert made.shape == (64, 72, 3)
    for key in ("Face restoration", "Hires upscale"):  # hires: no Denoising strength
        assert f"infotext.{key}" in info["ignored"], info["ignored"]
    assert "infotext.Version" not in info["ignored"]
    assert any("elsewhere [0123456789] is not in the models folders" in n for n in info["notes"])


def test_an_infotexts_ensd_applies_as_a1111s_option(client: TestClient) -> None:
    """`ENSD: 31337` (shared NovelAI-style PNGs) goes to `override_settings`, as A1111's
    `apply_infotext` puts it: the image of the explicit override, not of ENSD 0."""
    ancestral = FOX_TEXT.replace("Sampler: DPM++ 2M", "Sampler: Euler a")
    fields = {**FOX_FIELDS, "sampler_name": "Euler a", "steps": 2}
    overrides = {**FOX_FIELDS["override_settings"], "eta_noise_seed_delta": 31337}
    expected, _ = generate(client, "txt2img", {**fields, "override_settings": overrides})
    plain, _ = generate(client, "txt2img", fields)
    text = ancestral.replace("Version: v1.10.1", "ENSD: 31337, Version: v1.10.1")
    made, info = generate(client, "txt2img", {"infotext": text})
    assert "infotext.ENSD" not in info["ignored"]
    assert np.array_equal(made, expected) and not np.array_equal(made, plain)


def test_lora_tags_stay_in_the_prompt(client: TestClient) -> None:
    # the tag reaches the request: its LoRA is not here, so the request is a 404 naming it
    detail = refused(client, "txt2img", {"infotext": FOX, "steps": 1}, 404)
    assert "none-here" in detail


def test_hires_fields_come_from_the_infotext(client: TestClient) -> None:
    hires = ", Denoising strength: 0.6, Hires upscale: 2, Hires steps: 1, Hires upscaler: Latent"
    text = FOX_TEXT.replace(", Version", hires + ", Version")
    made, info = generate(client, "txt2img", {"infotext": text})
    explicit = {
        **FOX_FIELDS,
        "denoising_strength": 0.6,
        "enable_hr": True,
        "hr_scale": 2,
        "hr_second_pass_steps": 1,
        "hr_upscaler": "Latent",
    }
    expected, _ = generate(client, "txt2img", explicit)
    assert made.shape == (128, 144, 3) and np.array_equal(made, expected)
    assert "Hires upscale: 2" in info["infotexts"][0]


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"infotext": 5}, ["infotext must be a string"]),
        ({"infotext": FOX_TEXT.replace("Steps: 2", "Steps: many")}, ["infotext", "Steps"]),
        ({"infotext": FOX_TEXT.replace("Size: 72x64", "Size: big")}, ["infotext", "Size"]),
        ({"infotext": FOX_TEXT.replace("RNG: CPU", "RNG: dice")}, ["infotext", "RNG"]),
        ({"infotext": FOX_TEXT.replace("Steps: 2", "Steps: 999")}, ["infotext (Steps", "150"]),
        ({"infotext": FOX_TEXT.replace("DPM++ 2M", "Nope")}, ["infotext (Sampler", "Nope"]),
    ],
)
def test_a_malformed_infotext_is_422_naming_it(
    client: TestClient, change: dict[str, Any], words: list[str]
) -> None:
    detail = refused(client, "txt2img", change, 422)
    for word in words:
        assert word in detail


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_controlnet_units_from_the_infotext(client: TestClient, service: Service) -> None:
    title = service.folders.resolve("controlnet", "tiny-cn").title
    unit = (
        f'ControlNet 0: "Module: none, Model: {title}, Weight: 0.7, Resize Mode: Just Resize, '
        "Processor Res: 512, Threshold A: -1.0, Threshold B: -1.0, Guidance Start: 0.0, "
        'Guidance End: 1.0, Pixel Perfect: False, Control Mode: My prompt is more important"'
    )
    text = FOX_TEXT.replace(", Version", f", Denoising strength: 0.5, {unit}, Version")
    init = _png_b64(control_image(size=(72, 64)))
    made, info = generate(client, "img2img", {"infotext": text, "init_images": [init]})
    explicit_unit = {
        "module": "none",
        "model": title,
        "weight": 0.7,
        "resize_mode": "Just Resize",
        "control_mode": "My prompt is more important",
    }
    explicit = {
        **FOX_FIELDS,
        "denoising_strength": 0.5,
        "init_images": [init],
        "alwayson_scripts": {"controlnet": {"args": [explicit_unit]}},
    }
    expected, _ = generate(client, "img2img", explicit)
    assert np.array_equal(made, expected)
    assert f'ControlNet 0: "Module: none, Model: {title}, Weight: 0.7' in info["infotexts"][0]
    without, _ = generate(client, "img2img", {**explicit, "alwayson_scripts": {}})
    assert not np.array_equal(without, expected)  # the unit changes the image
    # the request's unit 0 replaces the infotext's (here: weight 0, so no control)
    zero = {"controlnet": {"args": [{**explicit_unit, "weight": 0.0}]}}
    body = {"infotext": text, "init_images": [init], "alwayson_scripts": zero}
    assert np.array_equal(generate(client, "img2img", body)[0], without)
    # txt2img: an infotext never holds the control image
    detail = refused(client, "txt2img", {"infotext": text}, 422)
    assert "infotext" in detail and "alwayson_scripts.controlnet.args[0]" in detail
    missing = text.replace(f"Model: {title}", "Model: gone [12345678]")
    detail = refused(client, "img2img", {"infotext": missing, "init_images": [init]}, 404)
    assert "gone [12345678]" in detail and "infotext" in detail
