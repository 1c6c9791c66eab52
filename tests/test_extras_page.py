"""The Extras tab's page logic: its values become the ExtrasRequest with A1111's page
defaults (scale by, scale to, a batch of files), every result is saved to
outputs/extras-images with the source's parameters and a `postprocessing` chunk, and
errors show as readable messages while the service keeps working."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from frontends.page.extras_tab import (
    build_extras_tab,
    extras_request,
    run_extras_page,
    stop_extras,
)
from pipelines.errors import InvalidRequestError
from pipelines.infotext import write_png_with_infotext
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.upscaler_files import write_esrgan

PARAMETERS = "a red boat\nSteps: 3, Seed: 42, Size: 48x32"


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Service:
    data = tmp_path_factory.mktemp("extras-page")
    write_esrgan(data / "models" / "ESRGAN" / "2x_tiny.safetensors", scale=2)
    return build_service(Settings(data_dir=data, threads=2))


@pytest.fixture(scope="module")
def page_values(service: Service) -> dict[str, Any]:
    """What the tab sends before the user changes anything (preprocessed like an event's
    inputs). Built in an event loop, as Gradio wants (test_files_tab)."""

    async def build() -> dict[str, Any]:
        with gr.Blocks() as page, gr.Tabs() as tabs, gr.Tab("Extras", id="extras"):
            panel = build_extras_tab(service, Path("unused"), page, tabs, lambda _: "someone")
        return {name: c.preprocess(c.value) for name, c in panel.values.items()}

    return asyncio.run(build())


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """A PNG with A1111 parameters and one without."""
    pixels = np.random.default_rng(0).integers(0, 255, (32, 48, 3), np.uint8)
    image = Image.fromarray(pixels)
    with_parameters = tmp_path / "with.png"
    with_parameters.write_bytes(write_png_with_infotext(image, PARAMETERS))
    plain = tmp_path / "plain.png"
    image.save(plain)
    return {"with": str(with_parameters), "plain": str(plain)}


def run(service: Service, outputs: Path, values: dict[str, Any]) -> tuple[list[str], str]:
    """The Generate event to its end: the gallery paths and the postprocessing text."""
    gallery, text = None, None
    for update in run_extras_page(service, outputs, values, "someone"):
        if isinstance(update[0], list):
            gallery, text = update[0], update[1]
    assert gallery is not None and text is not None
    return gallery, text


def test_page_defaults_are_a1111s(page_values: dict[str, Any], files: dict[str, str]) -> None:
    request = extras_request({**page_values, "image": files["with"]})
    assert len(request.images) == 1 and request.images[0].size == (48, 32)
    assert (request.resize_mode, request.upscaling_resize, request.max_side_length) == (0, 4, 0)
    assert (request.upscaling_resize_w, request.upscaling_resize_h) == (512, 512)
    assert request.upscaling_crop is True
    assert (request.upscaler_1, request.upscaler_2, request.upscaler_2_visibility) == (
        "None",
        "None",
        0.0,
    )


def test_scale_by_and_scale_to_requests(page_values: dict[str, Any], files: dict[str, str]) -> None:
    scale_by = extras_request(
        {
            **page_values,
            "image": files["plain"],
            "upscaling_resize": 2.0,
            "max_side_length": 64,
            "upscaler_1": "2x_tiny",
            "upscaler_2": "Lanczos",
            "upscaler_2_visibility": 0.25,
        }
    )
    assert (scale_by.resize_mode, scale_by.upscaling_resize, scale_by.max_side_length) == (
        0,
        2,
        64,
    )
    assert isinstance(scale_by.upscaling_resize, int)  # A1111's page writes "by: 2"
    assert (scale_by.upscaler_1, scale_by.upscaler_2, scale_by.upscaler_2_visibility) == (
        "2x_tiny",
        "Lanczos",
        0.25,
    )
    assert extras_request({**page_values, "image": files["plain"], "upscaling_resize": 2.5})
    scale_to = extras_request(
        {
            **page_values,
            "image": files["plain"],
            "resize_mode": "Scale to",
            "upscaling_resize_w": 96,
            "upscaling_resize_h": 80,
            "upscaling_crop": False,
            "max_side_length": None,  # a cleared number box
        }
    )
    assert (scale_to.resize_mode, scale_to.upscaling_resize_w, scale_to.upscaling_resize_h) == (
        1,
        96,
        80,
    )
    assert scale_to.upscaling_crop is False and scale_to.max_side_length == 0


def test_batch_takes_every_file_and_missing_images_are_named(
    page_values: dict[str, Any], files: dict[str, str]
) -> None:
    batch = extras_request({**page_values, "source": "batch", "batch": [files["with"]] * 3})
    assert len(batch.images) == 3
    with pytest.raises(InvalidRequestError, match="Extras: upload an image first"):
        extras_request(page_values)
    with pytest.raises(InvalidRequestError, match="Extras: upload images to process first"):
        extras_request({**page_values, "source": "batch", "batch": None})


def test_results_are_saved_with_the_source_parameters_and_postprocessing(
    service: Service, page_values: dict[str, Any], files: dict[str, str], tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    values = {**page_values, "upscaler_1": "2x_tiny", "upscaling_resize": 2}
    gallery, text = run(service, outputs, {**values, "image": files["with"]})
    assert text == "Postprocess upscale by: 2, Postprocess upscaler: 2x_tiny"
    day = outputs / "extras-images" / dt.date.today().isoformat()
    assert [Path(path) for path in gallery] == [day / "00000.png"]
    with Image.open(gallery[0]) as saved:
        assert saved.size == (96, 64)
        assert saved.info["parameters"] == PARAMETERS
        assert saved.info["postprocessing"] == text

    batch = {**values, "source": "batch", "batch": [files["plain"], files["with"]]}
    gallery, _ = run(service, outputs, batch)
    assert [Path(path).name for path in gallery] == ["00001.png", "00002.png"]  # never over
    with Image.open(gallery[0]) as plain, Image.open(gallery[1]) as kept:
        assert "parameters" not in plain.info and plain.info["postprocessing"] == text
        assert kept.info["parameters"] == PARAMETERS


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"upscaler_1": "missing_model"}, "missing_model"),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 8, "max_side_length": 0}, "pixels"),
    ],
)
def test_errors_show_on_the_page_and_the_service_keeps_working(
    service: Service,
    page_values: dict[str, Any],
    files: dict[str, str],
    tmp_path: Path,
    changes: dict[str, Any],
    message: str,
) -> None:
    huge = tmp_path / "huge.png"
    Image.new("RGB", (1024, 1024)).save(huge)
    values = {**page_values, "image": str(huge), **changes}
    with pytest.raises(gr.Error, match=re.escape(message)):
        run(service, tmp_path / "outputs", values)
    assert not (tmp_path / "outputs").exists()
    fine = {**page_values, "image": files["plain"], "upscaler_1": "Nearest", "upscaling_resize": 1}
    gallery, text = run(service, tmp_path / "outputs", fine)
    assert len(gallery) == 1 and "Postprocess upscaler: Nearest" in text


def test_stop_without_a_job(service: Service) -> None:
    assert stop_extras(service, "", "nobody") == "Nothing of yours is running"


def test_a_waiting_extras_job_shows_its_place_in_the_queue(
    service: Service, page_values: dict[str, Any], files: dict[str, str], tmp_path: Path
) -> None:
    """Behind a running generation the Extras job hears no step updates; the tab asks the
    service where it stands and shows its place, as txt2img does."""
    from pipelines.schema import GenerationRequest

    ahead = service.submit(
        GenerationRequest(prompt="a tower", steps=150, n_iter=20, width=64, height=64)
    )
    shown: list[str] = []

    def progress(_: float, desc: str = "") -> None:
        shown.append(desc)
        if desc.startswith("waiting in the queue"):
            service.interrupt(ahead)  # seen: let the queue move

    values = {**page_values, "image": files["plain"], "upscaler_1": "Lanczos"}
    updates = list(run_extras_page(service, tmp_path, values, "someone", progress))
    assert any(d.startswith("waiting in the queue, position 1") for d in shown), shown
    assert isinstance(updates[-1][0], list) and len(updates[-1][0]) == 1
    assert service.result(ahead).interrupted
