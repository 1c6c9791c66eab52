"""The A1111-compatible API on a live server: raw HTTP for every route and its errors,
the real `webuiapi` client, `gradio_client` on the same server, and the same request
through every front end giving the same pixels.

One server process for the module (tiny models, 64x64, 2 steps, `--threads 2`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from pipelines.imageops import blur_mask
from pipelines.infotext import read_infotext
from pipelines.loading import LoadedModel
from pipelines.schema import GenerationRequest
from tests.test_app_http import PROJECT, free_port, wait_for
from tests.test_engine import make_engine
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write
from tests.test_vae import shifted, vae_file_weights
from tests.upscaler_files import esrgan_forward, esrgan_state_dict, write_esrgan

API_USER, API_PASSWORD = "tester", "s3cret"
UI_USER, UI_PASSWORD = "painter", "brush"
ORIGIN = "http://client.example"
THREADS = "2"
SMALL = {"steps": 2, "width": 64, "height": 64}
SD1 = "tiny-sd1.safetensors"


@dataclass
class Server:
    url: str
    port: int
    data: Path
    models: Path
    loras: Path
    log: Path

    @property
    def api(self) -> str:
        return self.url + "sdapi/v1"


def start_app(args: list[str], data: Path) -> tuple[subprocess.Popen, str, Path]:
    """`python app.py ARGS` on a free 127.0.0.1 port; returns process, base URL and log."""
    port = free_port()
    log = data / f"app-{port}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log.open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--data-dir", str(data), "--port", str(port), *args],
            cwd=PROJECT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return process, f"http://127.0.0.1:{port}/", log


def stop_app(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def loras_dir(tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel) -> Path:
    folder = tmp_path_factory.mktemp("api-loras")
    keys = sd1_keys(SD1_MODULES)
    write(folder / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    write(folder / "glow.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=2))
    return folder


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    loras_dir: Path,
    tiny_sd1: LoadedModel,
) -> Iterator[Server]:
    data = tmp_path_factory.mktemp("api-data")
    upscalers = data / "my-upscalers"
    write_esrgan(upscalers / "2x_tiny.safetensors", scale=2)
    (upscalers / "broken.pth").write_bytes(b"not a checkpoint")
    vaes = data / "my-vaes"
    vaes.mkdir()
    bright = shifted(vae_file_weights(tiny_sd1.pipe.vae), "decoder.conv_out.bias")
    save_file(bright, vaes / "bright.safetensors")
    args = [
        "--vae-dir",
        str(vaes),
        "--esrgan-models-path",
        str(upscalers),
        "--api",
        "--api-auth",
        f"{API_USER}:{API_PASSWORD}",
        "--gradio-auth",
        f"{UI_USER}:{UI_PASSWORD}",
        "--cors-allow-origins",
        ORIGIN,
        "--ckpt-dir",
        str(models_dir),
        "--lora-dir",
        str(loras_dir),
        "--ckpt",
        SD1,
        "--threads",
        THREADS,
    ]
    process, url, log = start_app(args, data)
    try:
        wait_for(url, process)
        yield Server(url, int(url.rsplit(":", 1)[1].strip("/")), data, models_dir, loras_dir, log)
    finally:
        stop_app(process)


def call(
    server: Server,
    method: str,
    path: str,
    body: Any = None,
    *,
    raw: bytes | None = None,
    auth: tuple[str, str] | None = (API_USER, API_PASSWORD),
    headers: dict[str, str] | None = None,
    timeout: float = 120,
) -> tuple[int, Any, Any]:
    """One HTTP request; returns (status, headers, decoded JSON or text)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(server.api + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, reply_headers, payload = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        with error:
            status, reply_headers, payload = error.code, error.headers, error.read()
    try:
        return status, reply_headers, json.loads(payload)
    except ValueError:
        return status, reply_headers, payload.decode()


def pixels_of_b64(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def assert_a1111_error(payload: Any, *words: str) -> None:
    assert set(payload) == {"error", "detail", "body", "errors"}, payload
    for word in words:
        assert word in payload["detail"], payload


# ---------------------------------------------------------------- auth, CORS, probes


def test_every_api_route_needs_credentials(server: Server) -> None:
    for method, path in [
        ("GET", "/options"),
        ("GET", "/sd-models"),
        ("GET", "/loras"),
        ("POST", "/refresh-loras"),
        ("GET", "/progress"),
        ("POST", "/txt2img"),
        ("GET", "/docs"),
    ]:
        for auth in (None, (API_USER, "wrong")):
            status, headers, payload = call(server, method, path, {}, auth=auth)
            assert status == 401, (method, path)
            assert headers["WWW-Authenticate"].startswith("Basic")
            assert_a1111_error(payload, "credentials")


def test_cors_preflight_and_simple_request(server: Server) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST"}
    status, headers, _ = call(server, "OPTIONS", "/txt2img", auth=None, headers=preflight)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    status, headers, _ = call(server, "GET", "/samplers", headers={"Origin": ORIGIN})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == ORIGIN
    _, headers, _ = call(server, "GET", "/samplers", headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in headers


def test_listings_and_neutral_probes(server: Server) -> None:
    shapes = {
        "/samplers": list,
        "/schedulers": list,
        "/upscalers": list,
        "/latent-upscale-modes": list,
        "/sd-vae": list,
        "/hypernetworks": list,
        "/face-restorers": list,
        "/realesrgan-models": list,
        "/prompt-styles": list,
        "/embeddings": dict,
        "/scripts": dict,
        "/cmd-flags": dict,
        "/memory": dict,
    }
    for path, kind in shapes.items():
        status, _, payload = call(server, "GET", path)
        assert status == 200 and isinstance(payload, kind), path
    _, _, samplers = call(server, "GET", "/samplers")
    assert {"name", "aliases", "options"} <= set(samplers[0])
    assert {"Euler", "LCM", "TCD"} <= {s["name"] for s in samplers}
    assert all("Karras" not in s["name"] for s in samplers)
    _, _, schedulers = call(server, "GET", "/schedulers")
    assert {"name", "label", "aliases", "default_rho", "need_inner_model"} <= set(schedulers[0])
    _, _, flags = call(server, "GET", "/cmd-flags")
    assert flags["api"] is True and "api_auth" not in flags and "gradio_auth" not in flags
    _, _, embeddings = call(server, "GET", "/embeddings")
    assert embeddings == {"loaded": {}, "skipped": {}}
    _, _, scripts = call(server, "GET", "/scripts")
    assert scripts["txt2img"] == ["prompts from file or textbox", "x/y/z plot"]
    assert {"sd upscale", "outpainting mk2", "poor man's outpainting"} < set(scripts["img2img"])
    _, _, memory = call(server, "GET", "/memory")
    assert set(memory) == {"ram", "cuda"}


def test_sd_models_and_loras(server: Server) -> None:
    status, _, models = call(server, "GET", "/sd-models")
    assert status == 200
    by_name = {m["model_name"]: m for m in models}
    assert {"tiny-sd1", "xl/tiny-sdxl", "tiny-sd1-diffusers"} <= set(by_name)
    sd1 = by_name["tiny-sd1"]
    assert set(sd1) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert sd1["title"].startswith(SD1)
    assert sd1["filename"] == str(server.models / SD1)
    assert sd1["config"] == str(server.models / "tiny-sd1.yaml")
    if sd1["sha256"]:
        assert sd1["title"] == f"{SD1} [{sd1['sha256'][:10]}]" and sd1["hash"] == sd1["sha256"][:10]
    assert call(server, "POST", "/refresh-checkpoints")[:3:2] == (200, None)
    assert call(server, "POST", "/refresh-loras")[:3:2] == (200, None)
    status, _, loras = call(server, "GET", "/loras")
    assert status == 200
    assert {item["name"] for item in loras} == {"ink", "glow"}
    ink = next(item for item in loras if item["name"] == "ink")
    assert set(ink) == {"name", "alias", "path", "metadata"}
    assert ink["alias"] == "ink" and ink["path"] == str(server.loras / "ink.safetensors")


# ---------------------------------------------------------------- txt2img


def test_txt2img_shape_info_and_png_parameters(server: Server) -> None:
    body = {
        "prompt": "a red house",
        "negative_prompt": "blurry",
        "seed": 11,
        "batch_size": 2,
        "sampler_name": "DPM++ 2M Karras",
        "restore_faces": False,
        "made_up_field": 1,
        "override_settings": {"CLIP_stop_at_last_layers": 2, "sd_vae": "None", "x_opt": 1},
        **SMALL,
    }
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 200, payload
    assert set(payload) == {"images", "parameters", "info"}
    assert len(payload["images"]) == 2
    assert payload["parameters"]["prompt"] == "a red house"
    assert payload["parameters"]["cfg_scale"] == 7.0  # A1111 defaults filled in
    info = json.loads(payload["info"])
    assert info["seed"] == 11 and info["all_seeds"] == [11, 12]
    assert info["sampler_name"] == "DPM++ 2M" and info["scheduler"] == "karras"
    assert info["width"] == info["height"] == 64 and info["steps"] == 2 and info["cfg_scale"] == 7
    assert info["clip_skip"] == 2 and info["batch_size"] == 2
    assert info["sd_model_name"] == "tiny-sd1"
    assert info["prompt"] == "a red house" and info["all_negative_prompts"] == ["blurry"] * 2
    assert info["version"].startswith("lorastack")
    assert len(info["job_timestamp"]) == 14
    assert set(info["ignored"]) == {"made_up_field", "override_settings.x_opt"}
    first = info["infotexts"][0]
    assert "Seed: 11" in first and "Schedule type: Karras" in first and "Clip skip: 2" in first
    png = base64.b64decode(payload["images"][0])
    assert read_infotext(png) == first


def test_txt2img_defaults_and_sizes(server: Server) -> None:
    status, _, payload = call(
        server, "POST", "/txt2img", {"prompt": "x", "width": 70, "height": 64, "steps": 2}
    )
    assert status == 200, payload
    info = json.loads(payload["info"])
    assert info["sampler_name"] == "Euler"  # sampler_name null -> Euler (A1111 API default)
    assert "Schedule type: Automatic" in info["infotexts"][0]
    assert info["width"] == 64  # rounded down to a multiple of 8, as A1111 does
    assert info["seed"] >= 0 and info["ignored"] == []


def test_send_and_save_images(server: Server) -> None:
    saved = server.data / "outputs" / "txt2img-images"
    before = set(saved.rglob("*.png")) if saved.exists() else set()
    body = {"prompt": "x", "seed": 21, "send_images": False, "save_images": True, **SMALL}
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 200 and payload["images"] == []
    new = set(saved.rglob("*.png")) - before
    assert len(new) == 1 and next(iter(new)).name.endswith("-21.png")
    assert "Seed: 21" in read_infotext(next(iter(new)).read_bytes())


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"", ["body", "empty", "{}"]),
        (b" \n", ["body", "empty"]),
        (b'{"prompt": ', ["not valid JSON"]),
        (b"[1, 2]", ["JSON object"]),
        (b'{"steps": "many"}', ["steps", "integer"]),
        (b'{"steps": 2.5}', ["steps"]),
        (b'{"cfg_scale": true}', ["cfg_scale"]),
        (b'{"width": 8, "steps": 2}', ["width", "between"]),
        (b'{"steps": 1000}', ["steps", "150"]),
        (b'{"seed": -7}', ["seed"]),
        (b'{"batch_size": 99}', ["batch_size"]),
        (b'{"sampler_name": "Nope Sampler"}', ["Nope Sampler", "Euler"]),
        (b'{"scheduler": "wobbly"}', ["wobbly", "Karras"]),
        (b'{"override_settings": [1]}', ["override_settings"]),
        (b'{"override_settings": {"CLIP_stop_at_last_layers": 40}}', ["CLIP_stop"]),
        (b'{"prompt": 5}', ["prompt"]),
        (b'{"send_images": "yes"}', ["send_images"]),
        (b'{"refiner_checkpoint": "tiny-sd1", "refiner_switch_at": 1.5}', ["refiner_switch_at"]),
        (b'{"refiner_checkpoint": 5}', ["refiner_checkpoint"]),
    ],
)
def test_txt2img_client_errors_are_422(server: Server, raw: bytes, words: list[str]) -> None:
    status, _, payload = call(server, "POST", "/txt2img", raw=raw)
    assert status == 422, payload
    assert_a1111_error(payload, *words)


def test_unknown_names_are_404_listing_known(server: Server) -> None:
    body = {"override_settings": {"sd_model_checkpoint": "no-such-model"}, **SMALL}
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 404 and "tiny-sd1" in payload["detail"]
    status, _, payload = call(server, "POST", "/options", {"sd_model_checkpoint": "zzz"})
    assert status == 404
    assert_a1111_error(payload, "zzz", "tiny-sd1")
    status, _, payload = call(server, "POST", "/txt2img", {"prompt": "<lora:nope:1>", **SMALL})
    assert status == 404
    assert_a1111_error(payload, "nope")
    status, _, payload = call(server, "GET", "/no-such-route")
    assert status == 404 and set(payload) == {"error", "detail", "body", "errors"}


def test_block_weights_and_keyframes_through_prompt_tags(server: Server) -> None:
    """The extensions' tag forms work through the API's prompt; a malformed one is a 422
    naming the prompt and the form."""
    for tag, words in (
        ("<lora:ink:1:in=0.5:lbw=ALL>", "in= and lbw="),
        ("<lora:ink:1:lbw=NOPE>", "unknown lbw preset 'NOPE'"),
        ("<lora:ink:1@0.5,0@0.5>", "two keyframes at one position"),
    ):
        status, _, payload = call(server, "POST", "/txt2img", {"prompt": f"a {tag}", **SMALL})
        assert status == 422
        assert_a1111_error(payload, "prompt", words)
    tag = "<lora:ink:0.5:0@0,1@1:hr=0.8:lbw=OUTALL>"
    status, _, payload = call(server, "POST", "/txt2img", {"prompt": f"a cat {tag}", **SMALL})
    assert status == 200
    assert json.loads(payload["info"])["infotexts"][0].startswith(f"a cat {tag}\n")


def test_options_switch_checkpoints_and_clip_skip(server: Server) -> None:
    status, _, options = call(server, "GET", "/options")
    assert status == 200 and options["sd_model_checkpoint"].startswith(SD1)
    status, _, changed = call(
        server,
        "POST",
        "/options",
        {"sd_model_checkpoint": "xl/tiny-sdxl", "CLIP_stop_at_last_layers": 2},
    )
    assert status == 200 and changed["CLIP_stop_at_last_layers"] == 2
    _, _, options = call(server, "GET", "/options")
    assert options["sd_model_checkpoint"].startswith("xl/tiny-sdxl.safetensors")
    assert options["CLIP_stop_at_last_layers"] == 2
    status, _, payload = call(server, "POST", "/txt2img", {"prompt": "x", "seed": 1, **SMALL})
    info = json.loads(payload["info"])
    assert info["sd_model_name"] == "tiny-sdxl" and info["clip_skip"] == 2
    # override_settings switches for one request, then restores (A1111's default)
    body = {"prompt": "x", "override_settings": {"sd_model_checkpoint": SD1}, **SMALL}
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 200 and json.loads(payload["info"])["sd_model_name"] == "tiny-sd1"
    _, _, options = call(server, "GET", "/options")
    assert options["sd_model_checkpoint"].startswith("xl/tiny-sdxl")
    status, _, payload = call(
        server, "POST", "/options", {"sd_model_checkpoint": SD1, "CLIP_stop_at_last_layers": 1}
    )
    assert status == 200 and payload["sd_model_checkpoint"].startswith(SD1)
    status, _, payload = call(server, "POST", "/options", {"CLIP_stop_at_last_layers": "two"})
    assert status == 422
    assert_a1111_error(payload, "CLIP_stop_at_last_layers")


def test_png_info(server: Server) -> None:
    _, _, payload = call(server, "POST", "/txt2img", {"prompt": "a (cat:1.2)", "seed": 4, **SMALL})
    image = payload["images"][0]
    status, _, info = call(server, "POST", "/png-info", {"image": "data:image/png;base64," + image})
    assert status == 200 and set(info) == {"info", "items", "parameters"}
    assert info["info"].startswith("a (cat:1.2)")
    parameters = info["parameters"]
    assert parameters["Prompt"] == "a (cat:1.2)" and parameters["Seed"] == "4"
    assert parameters["Size-1"] == "64" and parameters["Steps"] == "2"
    plain = io.BytesIO()
    Image.new("RGB", (8, 8)).save(plain, format="PNG")
    status, _, info = call(
        server, "POST", "/png-info", {"image": base64.b64encode(plain.getvalue()).decode()}
    )
    assert status == 200 and info == {"info": "", "items": {}, "parameters": {}}
    for bad in ({"image": "%%%"}, {"image": base64.b64encode(b"not an image").decode()}, {}):
        status, _, payload = call(server, "POST", "/png-info", bad)
        assert status == 422
        assert_a1111_error(payload, "image")


def test_prompt_styles_listing_styles_field_and_png_info(server: Server) -> None:
    """An A1111 styles.csv dropped into the data dir is listed, applied by `styles` (the
    styled prompt in `info` and the PNG), and found again by png-info (`Styles array`)."""
    path = server.data / "styles.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as stream:
        stream.write(
            "name,prompt,negative_prompt\r\n"
            'frame,"masterpiece, {prompt}","{prompt}, lowres"\r\n'
            "tail,film grain,blurry\r\n"
        )
    try:
        status, _, styles = call(server, "GET", "/prompt-styles")
        assert status == 200 and styles == [
            {
                "name": "frame",
                "prompt": "masterpiece, {prompt}",
                "negative_prompt": "{prompt}, lowres",
            },
            {"name": "tail", "prompt": "film grain", "negative_prompt": "blurry"},
        ]
        body = {"prompt": "a cat", "negative_prompt": "ugly", "styles": ["frame", "tail"]}
        status, _, payload = call(server, "POST", "/txt2img", {**body, "seed": 2, **SMALL})
        assert status == 200, payload
        info = json.loads(payload["info"])
        assert info["prompt"] == "masterpiece, a cat, film grain" and info["styles"] == [
            "frame",
            "tail",
        ]
        assert info["negative_prompt"] == "ugly, lowres, blurry"
        assert info["infotexts"][0].startswith(
            "masterpiece, a cat, film grain\nNegative prompt: ugly, lowres, blurry\n"
        )
        status, _, found = call(server, "POST", "/png-info", {"image": payload["images"][0]})
        assert found["parameters"]["Styles array"] == ["frame", "tail"]
        assert found["parameters"]["Prompt"] == "a cat"
        status, _, payload = call(server, "POST", "/txt2img", {"styles": ["nope"], **SMALL})
        assert status == 422
        assert_a1111_error(payload, "styles", "nope", "frame")
    finally:
        path.unlink()
    status, _, styles = call(server, "GET", "/prompt-styles")
    assert status == 200 and styles == []


def test_progress_and_interrupt_during_a_generation(server: Server) -> None:
    status, _, idle = call(server, "GET", "/progress")
    assert status == 200
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0
    assert idle["current_image"] is None
    assert {"skipped", "interrupted", "job", "job_count", "job_timestamp", "job_no"} <= set(
        idle["state"]
    )
    answer: dict[str, Any] = {}

    def long_job() -> None:
        body = {"prompt": "long", "seed": 3, "n_iter": 100, "steps": 150, "width": 64, "height": 64}
        answer["reply"] = call(server, "POST", "/txt2img", body, timeout=300)

    worker = threading.Thread(target=long_job, daemon=True)
    worker.start()
    deadline = time.monotonic() + 60
    running = None
    while time.monotonic() < deadline:
        _, _, state = call(server, "GET", "/progress")
        if state["state"]["sampling_step"] > 0 and state["current_image"]:
            running = state
            break
        time.sleep(0.05)
    assert running is not None, "no progress seen within 60 s"
    assert 0 < running["progress"] < 1 and running["state"]["job_count"] == 100
    assert running["state"]["sampling_steps"] == 150 and running["eta_relative"] > 0
    assert running["textinfo"]
    preview = Image.open(io.BytesIO(base64.b64decode(running["current_image"])))
    assert preview.size == (64, 64)
    _, _, skipped = call(server, "GET", "/progress?skip_current_image=true")
    assert skipped["current_image"] is None
    assert call(server, "POST", "/skip")[0] == 200
    assert call(server, "POST", "/interrupt")[0] == 200
    worker.join(timeout=120)
    assert not worker.is_alive(), "the interrupted job did not finish within 120 s"
    status, _, payload = answer["reply"]
    assert status == 200
    info = json.loads(payload["info"])
    assert info["interrupted"] is True
    assert 1 <= len(payload["images"]) < 100


def test_progress_rejects_bad_query(server: Server) -> None:
    status, _, payload = call(server, "GET", "/progress?skip_current_image=maybe")
    assert status == 422
    assert_a1111_error(payload, "skip_current_image")


# ---------------------------------------------------------------- clients


def test_webuiapi_client(server: Server) -> None:
    import webuiapi

    client = webuiapi.WebUIApi(
        host="127.0.0.1",
        port=server.port,
        sampler="Euler",
        steps=2,
        username=API_USER,
        password=API_PASSWORD,
    )
    try:
        _use_webuiapi(client)
    finally:
        client.session.close()


def _use_webuiapi(client: Any) -> None:
    client.util_set_model("xl/tiny-sdxl")
    assert client.util_get_current_model().startswith("xl/tiny-sdxl")
    client.util_set_model(SD1)
    assert client.util_get_current_model().startswith(SD1)
    plain = client.txt2img(prompt="a cat", seed=5, width=64, height=64)
    stacked = client.txt2img(
        prompt="a cat <lora:ink:0.8> <lora:glow:-0.3>", seed=5, width=64, height=64
    )
    assert len(stacked.images) == 1 and stacked.info["seed"] == 5
    infotext = stacked.info["infotexts"][0]
    assert "<lora:ink:0.8>" in infotext and "<lora:glow:-0.3>" in infotext
    assert not np.array_equal(np.asarray(plain.image), np.asarray(stacked.image))
    assert stacked.image.info["parameters"] == infotext
    assert client.get_progress()["state"]["job_count"] == 0
    assert "Euler" in client.util_get_sampler_names()
    assert "automatic" in client.util_get_scheduler_names()
    assert {lora["name"] for lora in client.get_loras()} == {"ink", "glow"}


def test_sd_vae_from_webuiapi(server: Server) -> None:
    import webuiapi

    client = webuiapi.WebUIApi(
        host="127.0.0.1",
        port=server.port,
        sampler="Euler",
        steps=2,
        username=API_USER,
        password=API_PASSWORD,
    )
    same = {"prompt": "a cat", "seed": 5, "width": 64, "height": 64}
    try:
        client.util_set_model(SD1)
        assert [vae["model_name"] for vae in client.get_sd_vae()] == ["bright.safetensors"]
        plain = client.txt2img(**same)
        bright = client.txt2img(**same, override_settings={"sd_vae": "bright.safetensors"})
        assert "VAE: bright.safetensors" in bright.info["infotexts"][0]
        assert bright.info["sd_vae_name"] == "bright.safetensors"
        assert len(bright.info["sd_vae_hash"]) == 10
        lighter = np.asarray(bright.image, np.int16) - np.asarray(plain.image, np.int16)
        assert lighter.mean() > 20
        assert client.get_options()["sd_vae"] == "Automatic"  # restored afterwards
        again = client.txt2img(**same)
        assert np.array_equal(np.asarray(again.image), np.asarray(plain.image))
        client.set_options({"sd_vae": "bright.safetensors"})
        kept = client.txt2img(**same)
        assert np.array_equal(np.asarray(kept.image), np.asarray(bright.image))
        # the page's SD VAE dropdown, on the same server
        page_values = {"sampler_name": "Euler", "scheduler": "Automatic", "steps": 2, **same}
        gallery, infotext = _gradio_txt2img(server, SD1, sd_vae="bright.safetensors", **page_values)
        assert "VAE: bright.safetensors" in infotext
        assert np.array_equal(_gallery_pixels(gallery)[0], np.asarray(bright.image))
    finally:
        client.set_options({"sd_vae": "Automatic"})
        client.session.close()
    status, _, payload = call(
        server, "POST", "/options", {"sd_vae": "nope.pt", "CLIP_stop_at_last_layers": 2}
    )
    assert status == 404
    assert_a1111_error(payload, "nope.pt", "bright.safetensors")
    status, _, options = call(server, "GET", "/options")
    assert options["sd_vae"] == "Automatic" and options["CLIP_stop_at_last_layers"] == 1
    body = {"override_settings": {"sd_vae": "nope.pt"}, **SMALL}
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 404 and "nope.pt" in payload["detail"]


def test_samples_format_and_pattern_from_the_options(server: Server) -> None:
    saving = {"samples_format": "webp", "samples_filename_pattern": "[seed]-[prompt_words]"}
    status, _, options = call(server, "POST", "/options", saving)
    assert status == 200 and options["samples_format"] == "webp"
    try:
        body = {"prompt": "a quiet harbour", "seed": 31, "save_images": True, **SMALL}
        _, _, payload = call(server, "POST", "/txt2img", body)
        data = base64.b64decode(payload["images"][0])
        assert Image.open(io.BytesIO(data)).format == "WEBP"  # A1111 sends samples_format
        status, _, info = call(server, "POST", "/png-info", {"image": payload["images"][0]})
        assert status == 200 and info["parameters"]["Seed"] == "31"
        assert info["info"] == json.loads(payload["info"])["infotexts"][0]
        saved = list(
            (server.data / "outputs" / "txt2img-images").rglob("*-31-a quiet harbour.webp")
        )
        assert len(saved) == 1 and read_infotext(saved[0]) == info["info"]
        status, _, payload = call(server, "POST", "/options", {"samples_format": "tiff"})
        assert status == 422
        assert_a1111_error(payload, "samples_format", "tiff")
    finally:
        reset = {"samples_format": "png", "samples_filename_pattern": ""}
        status, _, options = call(server, "POST", "/options", reset)
    assert status == 200 and options["samples_format"] == "png"


def test_options_round_trip_as_a1111s_own_api_test(server: Server) -> None:
    """A1111's test_options_write toggles send_seed; every option GET shows can be posted
    back as it is; an unknown key is refused by name and changes nothing."""
    _, _, before = call(server, "GET", "/options")
    for key in ("send_seed", "send_size"):
        status, _, _ = call(server, "POST", "/options", {key: not before[key]})
        assert status == 200
        _, _, after = call(server, "GET", "/options")
        assert after[key] is (not before[key])
        call(server, "POST", "/options", {key: before[key]})
    status, _, echoed = call(server, "POST", "/options", before)
    assert status == 200 and echoed == before
    status, _, payload = call(server, "POST", "/options", {"send_seed": False, "nope_opt": 1})
    assert status == 422
    assert_a1111_error(payload, "nope_opt")
    _, _, after = call(server, "GET", "/options")
    assert after == before


def test_live_preview_method_is_an_option(server: Server) -> None:
    status, _, options = call(server, "POST", "/options", {"show_progress_type": "TAESD"})
    assert status == 200 and options["show_progress_type"] == "TAESD"
    try:
        bad = {"show_progress_type": "Approx NN", "CLIP_stop_at_last_layers": 2}
        status, _, payload = call(server, "POST", "/options", bad)
        assert status == 422
        assert_a1111_error(payload, "show_progress_type", "Approx NN", "TAESD")
        status, _, options = call(server, "GET", "/options")
        assert options["show_progress_type"] == "TAESD"
        assert options["CLIP_stop_at_last_layers"] == 1  # nothing changed
    finally:
        call(server, "POST", "/options", {"show_progress_type": "Approx cheap"})


def _gradio_txt2img(server: Server, checkpoint: str, **values: Any) -> tuple[list, str]:
    from gradio_client import Client

    client = Client(server.url, auth=(UI_USER, UI_PASSWORD), verbose=False)
    try:
        result = client.predict(
            api_name="/txt2img",
            negative_prompt="",
            cfg_scale=7.0,
            batch_size=1,
            n_iter=1,
            clip_skip=1,
            checkpoint=checkpoint,
            **values,
        )
    finally:
        client.close()
    return result[0], result[1]


def _gallery_pixels(gallery: list) -> list[np.ndarray]:
    paths = [item["image"] if isinstance(item, dict) else item[0] for item in gallery]
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def test_gradio_ui_needs_its_own_login(server: Server) -> None:
    from gradio_client import Client

    with pytest.raises(Exception, match="(?i)login|auth|401|credentials"):
        Client(server.url, verbose=False)


# ---------------------------------------------------------------- identity across front ends


def test_same_request_same_pixels_in_every_front_end(
    server: Server, tmp_path: Path, models_dir: Path
) -> None:
    prompt, seed = "a lighthouse at dusk", 77
    # 1. A1111 API
    body = {
        "prompt": prompt,
        "seed": seed,
        "sampler_name": "Euler",
        "scheduler": "automatic",
        "override_settings": {"sd_model_checkpoint": SD1},
        **SMALL,
    }
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 200, payload
    api_pixels = pixels_of_b64(payload["images"][0])
    api_infotext = json.loads(payload["info"])["infotexts"][0]
    # 2. Gradio endpoint on the same server
    gallery, ui_infotext = _gradio_txt2img(
        server,
        SD1,
        prompt=prompt,
        seed=seed,
        sampler_name="Euler",
        scheduler="Automatic",
        **SMALL,
    )
    ui_pixels = _gallery_pixels(gallery)[0]
    # 3. CLI in its own process
    out = tmp_path / "cli"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "frontends.cli",
            "generate",
            "--prompt",
            prompt,
            "--seed",
            str(seed),
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--sampler",
            "Euler",
            "--scheduler",
            "automatic",
            "--ckpt",
            SD1,
            "--ckpt-dir",
            str(models_dir),
            "--data-dir",
            str(tmp_path),
            "--threads",
            THREADS,
            "--out",
            str(out),
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    (cli_file,) = out.glob("*.png")
    cli_pixels = np.asarray(Image.open(cli_file).convert("RGB"))
    # 4. the engine in this process
    engine = make_engine(tmp_path / "engine", models_dir)
    result = engine.generate(
        GenerationRequest(
            prompt=prompt,
            seed=seed,
            sampler_name="Euler",
            scheduler="automatic",
            checkpoint=SD1,
            **SMALL,
        )
    )
    engine_pixels = np.asarray(result.images[0].convert("RGB"))
    for name, other in (("gradio", ui_pixels), ("cli", cli_pixels), ("api", api_pixels)):
        assert np.array_equal(engine_pixels, other), f"{name} pixels differ from the engine's"
    texts = {api_infotext, ui_infotext, read_infotext(cli_file.read_bytes())}
    texts.add(result.infotexts[0])
    assert len(texts) == 1, texts


def test_nowebui_serves_the_api_alone(tmp_path: Path, models_dir: Path) -> None:
    process, url, log = start_app(
        ["--nowebui", "--ckpt-dir", str(models_dir), "--ckpt", SD1, "--threads", THREADS],
        tmp_path,
    )
    try:
        wait_for(url + "sdapi/v1/options", process)
        server = Server(url, 0, tmp_path, models_dir, tmp_path, log)
        status, _, options = call(server, "GET", "/options", auth=None)
        assert status == 200 and options["sd_model_checkpoint"].startswith(SD1)
        deadline = time.monotonic() + 120
        while True:  # the start-up checkpoint preloads in the background: 503 until ready
            status, _, payload = call(
                server, "POST", "/txt2img", {"prompt": "x", **SMALL}, auth=None
            )
            if status != 503 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert status == 200 and len(payload["images"]) == 1
        with pytest.raises(urllib.error.HTTPError) as page:
            urllib.request.urlopen(url, timeout=10)
        with page.value as error:
            assert error.code == 404
    finally:
        stop_app(process)


# ---------------------------------------------------------------- img2img


def _png_b64(image: Image.Image, prefix: bool = False) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"data:image/png;base64,{data}" if prefix else data


def _init_and_mask() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(4)
    init = Image.fromarray(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8))
    mask = Image.new("L", init.size, 0)
    mask.paste(255, (28, 16, 60, 44))
    return init, mask


def test_webuiapi_img2img_and_inpainting(server: Server) -> None:
    import webuiapi

    client = webuiapi.WebUIApi(
        host="127.0.0.1",
        port=server.port,
        sampler="Euler",
        steps=4,
        username=API_USER,
        password=API_PASSWORD,
    )
    init, mask = _init_and_mask()
    try:
        client.util_set_model(SD1)
        plain = client.img2img(
            images=[init], prompt="a cat", seed=3, width=96, height=64, denoising_strength=0.5
        )
        inpainted = client.img2img(
            images=[init],
            mask_image=mask,
            inpaint_full_res=False,
            inpainting_fill=1,
            prompt="a cat <lora:ink:0.5>",
            seed=3,
            width=96,
            height=64,
            denoising_strength=0.9,
        )
    finally:
        client.session.close()
    assert plain.image.size == (96, 64) and plain.info["denoising_strength"] == 0.5
    assert "Denoising strength: 0.5" in plain.info["infotexts"][0]
    assert inpainted.image.size == (96, 64)
    outside = np.asarray(blur_mask(mask, 4, 4)) == 0
    original = np.asarray(init)
    assert np.array_equal(np.asarray(inpainted.image.convert("RGB"))[outside], original[outside])
    assert "<lora:ink:0.5>" in inpainted.info["infotexts"][0]
    assert inpainted.image.info["parameters"] == inpainted.info["infotexts"][0]
    # A1111 echoes the request without the images unless include_init_images is true
    assert inpainted.parameters["init_images"] is None and inpainted.parameters["mask"] is None


def test_img2img_raw_json_sizes_saving_and_options(server: Server) -> None:
    init, mask = _init_and_mask()
    body = {
        "init_images": [_png_b64(init, prefix=True)],
        "mask": _png_b64(mask),
        "steps": 4,
        "seed": 9,
        "sampler_name": "Euler",
        "include_init_images": True,
        "save_images": True,
        "inpaint_full_res_padding": 4,
        "override_settings": {"sd_model_checkpoint": SD1, "img2img_fix_steps": True},
    }
    status, _, payload = call(server, "POST", "/img2img", body)
    assert status == 200, payload
    info = json.loads(payload["info"])
    # no width/height: the init image's; "only masked" (A1111's API default) returns it too
    assert (info["width"], info["height"]) == (96, 64)
    assert pixels_of_b64(payload["images"][0]).shape == (64, 96, 3)
    assert payload["parameters"]["init_images"] == body["init_images"]
    assert "Inpaint area: Only masked" in info["infotexts"][0]
    saved = list((server.data / "outputs" / "img2img-images").rglob("*.png"))
    assert saved and read_infotext(saved[0].read_bytes()) == info["infotexts"][0]


def test_img2img_outpainting_script(server: Server) -> None:
    init, _ = _init_and_mask()
    body = {
        "init_images": [_png_b64(init)],
        "steps": 2,
        "seed": 1,
        "script_name": "outpainting mk2",
        "script_args": ["", 16, 4, ["left", "up"], 1.0, 0.05],
        "override_settings": {"sd_model_checkpoint": SD1},
    }
    status, _, payload = call(server, "POST", "/img2img", body)
    assert status == 200, payload
    info = json.loads(payload["info"])
    out = pixels_of_b64(payload["images"][0])
    assert out.shape[:2] == (info["height"], info["width"])
    assert info["width"] > 96 and info["height"] > 64  # the canvas grew left and up
    # the original sits in the bottom-right corner, untouched far from the seam (mk2's
    # mask reaches 4 * mask_blur + its Gaussian's half width into the original)
    corner = out[-16:, -40:]
    assert np.array_equal(corner, np.asarray(init)[-16:, -40:])


def _bomb_png() -> bytes:
    """A PNG header claiming 50000 x 50000 pixels (no real pixel data)."""
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + header
    ihdr = struct.pack(">I", len(header)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + ihdr


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"init_images": []}, "init_images"),
        ({"init_images": ["bm90IGFuIGltYWdl"]}, "init_images[0]"),
        ({"init_images": [base64.b64encode(_bomb_png()).decode()]}, "init_images[0]"),
        ({"denoising_strength": 1.5}, "denoising_strength"),
        ({"resize_mode": 9}, "resize_mode"),
        ({"mask": "%%%"}, "mask"),
        ({"script_name": "loopback"}, "script_name"),
        (
            {"script_name": "outpainting mk2", "script_args": ["", 16, 4, ["sideways"]]},
            "script_args",
        ),
        ({"latent_mask": "abc"}, "latent_mask"),
    ],
)
def test_img2img_client_errors_are_422_naming_the_field(
    server: Server, change: dict[str, Any], field: str
) -> None:
    init, _ = _init_and_mask()
    body = {"init_images": [_png_b64(init)], "steps": 2, **change}
    status, _, payload = call(server, "POST", "/img2img", body)
    assert status == 422, payload
    assert_a1111_error(payload, field)
    # the server keeps serving
    assert call(server, "GET", "/sd-models")[0] == 200


# ---------------------------------------------------------------- hires fix


def test_webuiapi_hires_fix(server: Server) -> None:
    import webuiapi

    client = webuiapi.WebUIApi(
        host="127.0.0.1",
        port=server.port,
        sampler="Euler",
        steps=2,
        username=API_USER,
        password=API_PASSWORD,
    )
    try:
        client.util_set_model(SD1)
        result = client.txt2img(
            prompt="a cat <lora:ink:0.5>",
            seed=5,
            width=64,
            height=64,
            enable_hr=True,
            hr_scale=2,
            hr_second_pass_steps=2,
            denoising_strength=0.5,
        )
        resized = client.txt2img(
            prompt="a cat",
            seed=5,
            width=64,
            height=64,
            enable_hr=True,
            hr_resize_x=160,
            hr_resize_y=96,
            hr_upscaler=webuiapi.HiResUpscaler.Lanczos,
        )
    finally:
        client.session.close()
    assert result.image.size == (128, 128)
    infotext = result.info["infotexts"][0]
    for key in ("Hires upscale: 2", "Hires steps: 2", "Hires upscaler: Latent", "Size: 64x64"):
        assert key in infotext, infotext
    assert resized.image.size == (160, 96)
    assert "Hires resize: 160x96" in resized.info["infotexts"][0]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hr_scale": 40}, "hr_scale"),
        ({"hr_sampler_name": "Bogus"}, "hr_sampler_name"),
        ({"hr_upscaler": "Nope"}, "hr_upscaler"),
        ({"hr_checkpoint_name": "xl/tiny-sdxl"}, "hr_checkpoint_name"),  # another family
    ],
)
def test_hires_errors_name_the_field(server: Server, change: dict[str, Any], field: str) -> None:
    body = {"enable_hr": True, "prompt": "x", **SMALL, **change}
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 422, payload
    assert_a1111_error(payload, field)
    # without enable_hr A1111 ignores every hr_ field
    status, _, payload = call(server, "POST", "/txt2img", {**body, "enable_hr": False})
    assert status == 200, payload


def test_upscaler_listings(server: Server) -> None:
    status, _, upscalers = call(server, "GET", "/upscalers")
    assert status == 200
    assert [u["name"] for u in upscalers] == ["None", "Lanczos", "Nearest", "2x_tiny"]
    tiny = upscalers[-1]
    assert (tiny["model_name"], tiny["scale"]) == ("ESRGAN", 2)
    assert set(tiny) == {"name", "model_name", "model_path", "model_url", "scale"}
    _, _, modes = call(server, "GET", "/latent-upscale-modes")
    assert [m["name"] for m in modes][:2] == ["Latent", "Latent (antialiased)"]
    assert len(modes) == 6


def test_webuiapi_extras_with_a_model_upscaler(server: Server) -> None:
    import webuiapi

    client = webuiapi.WebUIApi(
        host="127.0.0.1", port=server.port, username=API_USER, password=API_PASSWORD
    )
    pixels = np.random.default_rng(4).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    outputs_before = sorted((server.data / "outputs").rglob("*.png"))
    try:
        single = client.extra_single_image(image, upscaler_1="2x_tiny", upscaling_resize=2)
        batch = client.extra_batch_images(
            [image, image],
            upscaler_1="Lanczos",
            resize_mode=1,
            upscaling_resize_w=64,
            upscaling_resize_h=64,
        )
    finally:
        client.session.close()
    assert single.image.size == (80, 48)
    tensor = torch_image(pixels)
    expected = np.round(
        esrgan_forward(esrgan_state_dict(scale=2), tensor)[0].permute(1, 2, 0).numpy() * 255
    ).astype(np.uint8)
    assert np.abs(np.asarray(single.image.convert("RGB")).astype(int) - expected).max() <= 1
    assert "Postprocess upscaler: 2x_tiny" in single.info  # webuiapi: the html_info
    assert [im.size for im in batch.images] == [(64, 64), (64, 64)]
    # as A1111, the API never saves Extras results
    assert sorted((server.data / "outputs").rglob("*.png")) == outputs_before


def torch_image(pixels: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(pixels.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"gfpgan_visibility": 0.5}, "gfpgan_visibility"),
        ({"codeformer_visibility": 1}, "codeformer_visibility"),
        ({"upscaler_1": "4x-UltraSharp"}, "upscaler_1"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 9}, "upscaling_resize"),
        ({"upscaler_1": "Lanczos", "image": "bm90IGFuIGltYWdl"}, "image"),
        ({"upscaler_1": "broken"}, "broken"),
    ],
)
def test_extras_errors_name_the_field(server: Server, change: dict[str, Any], field: str) -> None:
    image = Image.new("RGB", (16, 16), (10, 20, 30))
    body = {"image": _png_b64(image), **change}
    status, _, payload = call(server, "POST", "/extra-single-image", body)
    assert status in (400, 422), payload
    assert field in json.dumps(payload)


def test_hires_fix_with_a_model_upscaler_over_http(server: Server) -> None:
    body = {
        "prompt": "a cat",
        **SMALL,
        "seed": 2,
        "enable_hr": True,
        "hr_scale": 2,
        "hr_upscaler": "2x_tiny",
        "hr_second_pass_steps": 1,
        "denoising_strength": 0.4,
        "override_settings": {"sd_model_checkpoint": SD1},
    }
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 200, payload
    image = Image.open(io.BytesIO(base64.b64decode(payload["images"][0])))
    assert image.size == (128, 128)
    assert "Hires upscaler: 2x_tiny" in json.loads(payload["info"])["infotexts"][0]


def test_img2img_sd_upscale_script(server: Server) -> None:
    init, _ = _init_and_mask()
    body = {
        "init_images": [_png_b64(init)],
        "steps": 2,
        "width": 64,
        "height": 64,
        "denoising_strength": 0.2,
        "script_name": "SD upscale",
        "script_args": ["", 16, 1, 1.5],  # overlap 16, Lanczos (index 1), x1.5
        "override_settings": {"sd_model_checkpoint": SD1},
    }
    status, _, payload = call(server, "POST", "/img2img", body)
    assert status == 200, payload
    assert pixels_of_b64(payload["images"][0]).shape == (96, 144, 3)
    status, _, payload = call(server, "POST", "/img2img", {**body, "script_args": ["", 16, 99]})
    assert status == 422 and "script_args" in payload["detail"]


def xyz_args(**changes: Any) -> list[Any]:
    """A1111 1.10's 18 x/y/z plot script_args, X = Steps 1,2 and Y = Seed 5,6."""
    args = {
        "x_type": 4,
        "x_values": "1,2",
        "x_values_dropdown": [],
        "y_type": 1,
        "y_values": "5,6",
        "y_values_dropdown": [],
        "z_type": 0,
        "z_values": "",
        "z_values_dropdown": [],
        "draw_legend": False,
        "include_lone_images": False,
        "include_sub_grids": False,
        "no_fixed_seeds": False,
        "vary_seeds_x": False,
        "vary_seeds_y": False,
        "vary_seeds_z": False,
        "margin_size": 0,
        "csv_mode": False,
    }
    return list({**args, **changes}.values())


def test_webuiapi_xyz_plot_grid_equals_its_cells(server: Server) -> None:
    import webuiapi

    client = webuiapi.WebUIApi(
        host="127.0.0.1", port=server.port, username=API_USER, password=API_PASSWORD
    )
    try:
        client.util_set_model(SD1)
        grid = client.txt2img(
            prompt="a boat <lora:ink:0.5>",
            sampler_name="Euler",
            width=64,
            height=64,
            script_name="X/Y/Z plot",
            script_args=xyz_args(),
        )
        cell = client.txt2img(
            prompt="a boat <lora:ink:0.5>",
            sampler_name="Euler",
            steps=2,
            seed=6,
            width=64,
            height=64,
        )
    finally:
        client.session.close()
    assert len(grid.images) == 1 and grid.image.size == (128, 128)
    bottom_right = np.asarray(grid.image)[64:, 64:]  # x = 2 steps, y = seed 6
    assert np.array_equal(bottom_right, np.asarray(cell.image.convert("RGB")))
    params = grid.info["infotexts"][0]
    assert "Script: X/Y/Z plot" in params and 'X Values: "1,2"' in params
    assert "Fixed Y Values" in params


def test_xyz_plot_raw_json_saves_grids_and_refuses_lacking_axes(server: Server) -> None:
    body = {
        "prompt": "a boat",
        "seed": 3,
        **SMALL,
        "save_images": True,
        "script_name": "x/y/z plot",
        "script_args": xyz_args(draw_legend=True, include_lone_images=True, y_type=0),
        "override_settings": {"sd_model_checkpoint": SD1},
    }
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 200, payload
    assert len(payload["images"]) == 3  # the grid, then its two cells
    legend = pixels_of_b64(payload["images"][0])
    assert legend.shape[1] == 128 and legend.shape[0] > 64  # the labels sit on top
    grids = list((server.data / "outputs" / "txt2img-grids").rglob("*.png"))
    assert grids and read_infotext(max(grids, key=os.path.getmtime)).count("X/Y/Z plot") == 1
    for index, name in ((23, "'Eta' axis is not implemented"), (99, "axis index 99")):
        status, _, payload = call(
            server, "POST", "/txt2img", {**body, "script_args": xyz_args(x_type=index)}
        )
        assert status == 422 and name in payload["detail"], payload


def test_img2img_xyz_plot_uses_the_img2img_axis_list(server: Server) -> None:
    init, _ = _init_and_mask()
    body = {
        "init_images": [_png_b64(init)],
        "prompt": "a door",
        "seed": 2,
        **SMALL,
        "script_name": "X/Y/Z plot",
        # img2img's list: 24 is Denoising (txt2img's 24 is Clip skip), 25 noise multiplier
        "script_args": xyz_args(x_type=24, x_values="0.3, 0.6", y_type=25, y_values="1, 0.9"),
        "override_settings": {"sd_model_checkpoint": SD1},
    }
    status, _, payload = call(server, "POST", "/img2img", body)
    assert status == 200, payload
    assert pixels_of_b64(payload["images"][0]).shape == (128, 128, 3)
    info = json.loads(payload["info"])
    assert "X Type: Denoising" in info["infotexts"][0]
    assert "Y Type: Initial noise multiplier" in info["infotexts"][0]


PROMPTS_SCRIPT = "prompts from file or textbox"


def test_prompts_from_file_script_raw_json_and_webuiapi(server: Server) -> None:
    text = 'a cat\n--prompt "a dog" --steps 3 --batch_size 2'
    body = {
        "prompt": "",
        "seed": 11,
        "steps": 2,
        "width": 64,
        "height": 64,
        "sampler_name": "Euler",
        "override_settings": {"sd_model_checkpoint": SD1},
        "script_name": "Prompts from file or textbox",
        "script_args": [True, False, "start", text],
    }
    status, _, payload = call(server, "POST", "/txt2img", body)
    assert status == 200, payload
    info = json.loads(payload["info"])
    assert len(payload["images"]) == 3
    assert info["all_prompts"] == ["a cat", "a dog", "a dog"]
    assert info["all_seeds"] == [11, 12, 13] and len(info["infotexts"]) == 3
    assert "Steps: 2," in info["infotexts"][0] and "Steps: 3," in info["infotexts"][1]
    # each line's image is that line's request sent alone
    alone = {**body, "prompt": "a dog", "steps": 3, "seed": 12, "batch_size": 2}
    del alone["script_name"], alone["script_args"]
    status, _, single = call(server, "POST", "/txt2img", alone)
    assert status == 200, single
    assert np.array_equal(pixels_of_b64(single["images"][1]), pixels_of_b64(payload["images"][2]))

    bad = {**body, "script_args": [False, False, "start", "a\n--prompt x --stepz 3"]}
    status, _, payload = call(server, "POST", "/txt2img", bad)
    assert status == 422
    assert_a1111_error(payload, "script_args", "line 2", "--stepz")

    import webuiapi

    client = webuiapi.WebUIApi(
        host="127.0.0.1", port=server.port, username=API_USER, password=API_PASSWORD
    )
    try:
        result = client.txt2img(
            prompt="",
            seed=5,
            steps=2,
            width=64,
            height=64,
            sampler_name="Euler",
            override_settings={"sd_model_checkpoint": SD1},
            script_name=PROMPTS_SCRIPT,
            script_args=[False, False, "start", 'a cat\n--prompt "a dog" --steps 3'],
        )
    finally:
        client.session.close()
    assert len(result.images) == 2 and result.info["all_prompts"] == ["a cat", "a dog"]
    assert result.info["all_seeds"] == [5, 5]
    assert result.images[1].info["parameters"] == result.info["infotexts"][1]
