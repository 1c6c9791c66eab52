"""A1111's eta noise seed delta (ENSD): the per-item generators the ancestral samplers draw
from are re-seeded with seed + ENSD after the initial noise (A1111's `ImageRNG.first`); it
changes only samplers that use it, is written as `ENSD: N`, and is an API option and a
per-request override."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from frontends.api import a1111
from frontends.api.routes import build_api
from frontends.page.defaults import load_defaults, save_defaults
from frontends.page.recall import recall
from pipelines.errors import InvalidRequestError
from pipelines.generation.noise import SeedPlan, initial_noise
from pipelines.infotext import parse_infotext, write_png_with_infotext
from pipelines.samplers import uses_ensd
from pipelines.schema import Bounds, GenerationRequest, ImageInputs
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_fewstep_samplers import _model, _request
from tests.test_kdiffusion_samplers import a1111_sample_euler_ancestral


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Service:
    data = tmp_path_factory.mktemp("ensd")
    return build_service(Settings(data_dir=data, ckpt_dirs=(models_dir,), threads=2))


def _pixels(service: Service, request: GenerationRequest) -> tuple[np.ndarray, str]:
    made = service.generate(request)
    return np.asarray(made.images[0]).astype(int), made.infotexts[0]


@pytest.mark.parametrize("source", ["CPU", "NV"])
def test_generators_reseeded_after_the_initial_noise(source: str) -> None:
    shape = (4, 8, 8)
    plain = SeedPlan(seeds=[5, 6], subseeds=[0, 0], source=source)
    delta = SeedPlan(seeds=[5, 6], subseeds=[0, 0], source=source, eta_noise_seed_delta=31337)
    noise, kept = initial_noise(plain, shape)
    same, reseeded = initial_noise(delta, shape)
    assert torch.equal(noise, same)  # the initial noise is the seed's either way
    for seed, before, after in zip((5, 6), kept, reseeded, strict=True):
        expected = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + 31337))
        assert torch.equal(torch.randn((1, *shape), generator=after), expected)
        assert not torch.equal(torch.randn((1, *shape), generator=before), expected)


def test_samplers_that_draw_from_the_generators() -> None:
    assert uses_ensd("Euler a") and uses_ensd("DPM2 a") and uses_ensd("DPM++ 2S a")
    assert uses_ensd("LCM") and uses_ensd("TCD")  # their noise is the generators' too
    assert not uses_ensd("Euler") and not uses_ensd("DPM++ 2M SDE") and not uses_ensd("DDIM")


@pytest.mark.parametrize(("sampler", "changes"), [("LCM", True), ("DPM++ 2M SDE", False)])
def test_lcm_changes_and_brownian_sde_does_not(
    service: Service, sampler: str, changes: bool
) -> None:
    """LCM draws from the generators (A1111's `sample_lcm`); A1111's DPM++ 2M SDE draws
    from a Brownian tree seeded by the seeds, so ENSD leaves it alone here too."""
    torch.set_num_threads(2)
    base = {"sampler_name": sampler, "steps": 3}
    zero, _ = _pixels(service, _request(**base))
    delta, info = _pixels(service, _request(**base, eta_noise_seed_delta=31337))
    assert (not np.array_equal(zero, delta)) is changes
    assert ("ENSD: 31337" in info) is changes


@pytest.mark.parametrize("value", [-1, 1.5, True, "31337", 2**32])
def test_request_field_is_checked(value: object) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        GenerationRequest(eta_noise_seed_delta=value).validated(Bounds())  # type: ignore[arg-type]
    assert caught.value.field == "eta_noise_seed_delta"


def test_euler_a_with_ensd_equals_a1111s_loop_reseeded(service: Service) -> None:
    torch.set_num_threads(2)
    model = _model(service)
    base = {"sampler_name": "Euler a", "scheduler": "karras", "steps": 3, "cfg_scale": 5.0}
    # ENSD 0: exactly today's image, A1111's loop without a re-seed, no ENSD written
    today, info = _pixels(service, _request(**base, eta_noise_seed_delta=0))
    assert np.abs(today - a1111_sample_euler_ancestral(model, "karras", 3, 5.0, 21)).max() <= 1
    assert "ENSD" not in info
    ours, info = _pixels(service, _request(**base, eta_noise_seed_delta=31337))
    expected = a1111_sample_euler_ancestral(model, "karras", 3, 5.0, 21, ensd=31337)
    assert np.abs(ours - expected).max() <= 1
    assert np.abs(ours - today).max() > 1  # the delta changed the image
    assert parse_infotext(info).params["ENSD"] == "31337"


def test_euler_a_default_schedule_changes_and_plain_euler_does_not(service: Service) -> None:
    torch.set_num_threads(2)
    ancestral = {"sampler_name": "Euler a", "steps": 2}
    zero, _ = _pixels(service, _request(**ancestral))
    delta, _ = _pixels(service, _request(**ancestral, eta_noise_seed_delta=31337))
    assert not np.array_equal(zero, delta)  # diffusers' ancestral Euler draws from them too
    plain = {"sampler_name": "Euler", "steps": 2}
    zero, _ = _pixels(service, _request(**plain))
    delta, info = _pixels(service, _request(**plain, eta_noise_seed_delta=31337))
    assert np.array_equal(zero, delta)
    assert "ENSD" not in info  # A1111 writes it only for samplers that use it


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(build_api(service, service.settings)) as made:
        yield made


def test_option_round_trips_and_override_applies_per_request(client: TestClient) -> None:
    body = {
        "prompt": "a lighthouse",
        "negative_prompt": "fog",
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 21,
        "sampler_name": "Euler a",
        "override_settings": {"sd_model_checkpoint": "tiny-sd1"},
    }

    def infotext(payload: dict) -> str:
        made = client.post("/txt2img", json=payload)
        assert made.status_code == 200, made.text
        return json.loads(made.json()["info"])["infotexts"][0]

    assert client.get("/options").json()["eta_noise_seed_delta"] == 0
    checkpoint = {"sd_model_checkpoint": "tiny-sd1"}
    override = {**body, "override_settings": {**checkpoint, "eta_noise_seed_delta": 31337}}
    assert "ENSD: 31337" in infotext(override)
    assert client.get("/options").json()["eta_noise_seed_delta"] == 0
    assert "ENSD" not in infotext(body)  # the override was for that request only
    posted = client.post("/options", json={"eta_noise_seed_delta": 31337})
    try:
        assert posted.status_code == 200 and posted.json()["eta_noise_seed_delta"] == 31337
        assert client.get("/options").json()["eta_noise_seed_delta"] == 31337
        assert "ENSD: 31337" in infotext(body)  # the option applies to later requests
    finally:
        client.post("/options", json={"eta_noise_seed_delta": 0})
    for bad in (-1, 1.5, "31337"):
        wrong = client.post("/options", json={"eta_noise_seed_delta": bad})
        assert wrong.status_code == 422 and "eta_noise_seed_delta" in wrong.json()["detail"]
        bad_override = {**body, "override_settings": {"eta_noise_seed_delta": bad}}
        wrong = client.post("/txt2img", json=bad_override)
        assert wrong.status_code == 422
        assert "override_settings.eta_noise_seed_delta" in wrong.json()["detail"]
    assert client.get("/options").json()["eta_noise_seed_delta"] == 0


def test_shared_infotext_ensd_is_read_back(service: Service) -> None:
    """A shared PNG's `ENSD: 31337`: the API's png-info returns it, and the page's recall
    (PNG Info, Send to txt2img) sets the ENSD field; an infotext without ENSD means 0."""
    text = "a cat\nSteps: 3, Sampler: Euler a, Seed: 5, Size: 64x64, ENSD: 31337"
    png = write_png_with_infotext(Image.new("RGB", (64, 64)), text)
    info = a1111.png_info({"image": base64.b64encode(png).decode()})
    assert str(info["parameters"]["ENSD"]) == "31337"
    found = recall(text, service)
    assert found.values["eta_noise_seed_delta"] == 31337 and "ENSD" not in found.not_applied
    assert recall(text.replace(", ENSD: 31337", ""), service).values["eta_noise_seed_delta"] == 0


def test_page_settings_keep_an_ensd_default(tmp_path: Path) -> None:
    """The page's Settings tab saves ENSD as a default for new pages (settings.json)."""
    bounds = Bounds()
    assert load_defaults(tmp_path, bounds)["eta_noise_seed_delta"] == 0
    values = {**load_defaults(tmp_path, bounds), "eta_noise_seed_delta": 31337}
    save_defaults(tmp_path, values, bounds)
    assert load_defaults(tmp_path, bounds)["eta_noise_seed_delta"] == 31337
    with pytest.raises(ValueError, match="eta_noise_seed_delta"):
        save_defaults(tmp_path, {**values, "eta_noise_seed_delta": -1}, bounds)


def test_img2img_takes_ensd_too(service: Service) -> None:
    """img2img's noise comes from the same seeded generators (A1111's ImageRNG), so ENSD
    changes an Euler a img2img and is written in its infotext."""
    torch.set_num_threads(2)
    init = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    base = {"sampler_name": "Euler a", "steps": 3, "img2img": ImageInputs(images=(init,))}
    zero, _ = _pixels(service, _request(**base))
    delta, info = _pixels(service, _request(**base, eta_noise_seed_delta=31337))
    assert not np.array_equal(zero, delta)
    assert parse_infotext(info).params["ENSD"] == "31337"
