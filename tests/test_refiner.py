"""The refiner (A1111's `refiner_checkpoint`, `refiner_switch_at`) through the real service
with tiny models: the switch equals diffusers' base (`denoising_end`) + refiner
(`denoising_start`) run by hand, switch-at 1.0 is no refiner, the infotext replays, a
wrong family is refused, LoRAs that do not fit the refiner are named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.errors import InvalidRequestError, UnusableFileError
from pipelines.generation.refiner import switch_index
from pipelines.infotext import parse_infotext, refiner_from_params
from pipelines.loading import LoadedModel, random_pipeline
from pipelines.samplers import make_scheduler, resolve_sampler
from pipelines.schema import Bounds, GenerationRequest, ImageInputs
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.conftest import FIXTURES, copy_yaml_with_clip
from tests.ldm_export import save_single_file
from tests.test_lora import make_kohya, sdxl_ldm_modules, write

REFINER_YAML = FIXTURES / "tiny-sdxl-refiner.yaml"
SMALL = {
    "prompt": "a house by a lake",
    "negative_prompt": "blurry",
    "steps": 5,
    "sampler_name": "Euler",
    "seed": 3,
    "width": 64,
    "height": 64,
    "checkpoint": "xl/tiny-sdxl",
}
REFINED = {"refiner_checkpoint": "tiny-refiner", "refiner_switch_at": 0.6}


@pytest.fixture(scope="module")
def tiny_refiner(cache_root: Path) -> LoadedModel:
    """Tiny SDXL refiner: OpenCLIP-G only, aesthetic-score time ids, other UNet widths;
    its size/score embedding made strong, so a wrong time id shows in the image."""
    loaded = random_pipeline(REFINER_YAML, 1, cache_root)
    with torch.no_grad():
        loaded.pipe.unet.add_embedding.linear_1.weight.mul_(40)
    return loaded


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    tiny_sdxl: LoadedModel,
    tiny_refiner: LoadedModel,
) -> Service:
    """The shared tiny models plus the tiny refiner as a single file; a UNet-only SDXL
    LoRA (does not fit the refiner's UNet) and a CLIP-G-only one (fits both)."""
    folder = tmp_path_factory.mktemp("refiner-models")
    save_single_file(tiny_refiner.pipe, folder / "tiny-refiner.safetensors")
    copy_yaml_with_clip(REFINER_YAML, folder / "tiny-refiner.yaml")
    data = tmp_path_factory.mktemp("refiner-data")
    modules, keys = sdxl_ldm_modules()
    unet = [m for m in modules if m[0] == "unet"]
    clip_g = [m for m in modules if m[0] == "text_encoder_2"]
    loras = data / "loras"
    write(loras / "xl-unet.safetensors", make_kohya(tiny_sdxl.pipe, unet, keys, seed=2))
    write(loras / "xl-clipg.safetensors", make_kohya(tiny_sdxl.pipe, clip_g, keys, seed=3))
    settings = Settings(
        data_dir=data, ckpt_dirs=(folder, models_dir), lora_dirs=(loras,), threads=2
    )
    made = build_service(settings)
    made.folders.hash_missing()
    return made


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest(**{**SMALL, **fields})  # type: ignore[arg-type]


def pixels(result: object) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)  # type: ignore[attr-defined]


def test_switch_equals_base_then_refiner_by_hand(
    service: Service, tiny_sdxl: LoadedModel, tiny_refiner: LoadedModel
) -> None:
    """Steps before the switch point on the base, the rest on the refiner, on the same
    latents: diffusers' own `denoising_end` / `denoising_start` pair, which also gives
    the refiner its aesthetic-score time ids (6.0 / 2.5) and its own text encoder."""
    made = service.generate(
        request(refiner_checkpoint="tiny-refiner", refiner_switch_at=0.3, height=96)
    )

    choice = resolve_sampler("Euler", "automatic")  # A1111's Euler, as the run makes it
    config = tiny_sdxl.pipe.scheduler.config

    def own_scheduler(loaded: LoadedModel, **flags: bool) -> Any:
        """The shared pipeline's modules with a scheduler of its own (fixture unchanged)."""
        components = {**loaded.pipe.components, "scheduler": make_scheduler(choice, config)}
        return type(loaded.pipe)(**components, add_watermarker=False, **flags)

    base = own_scheduler(tiny_sdxl)
    refiner = own_scheduler(tiny_refiner, requires_aesthetics_score=True)
    base.set_progress_bar_config(disable=True)
    refiner.set_progress_bar_config(disable=True)
    base.scheduler.set_timesteps(5)
    split = switch_index(base.scheduler, base.scheduler.timesteps, 0.3)
    assert 0 < split < 5, "the test should switch halfway"
    noise = torch.randn((1, 4, 12, 8), generator=torch.Generator().manual_seed(3))
    texts = {"prompt": SMALL["prompt"], "negative_prompt": SMALL["negative_prompt"]}
    texts["guidance_scale"] = 7.0  # our default CFG (diffusers SDXL's is 5)
    with torch.no_grad():
        first = base(
            **texts,
            num_inference_steps=5,
            denoising_end=0.3,
            latents=noise,
            height=96,
            width=64,
            output_type="latent",
        ).images
        latents = refiner(
            **texts, image=first, num_inference_steps=5, denoising_start=0.3, output_type="latent"
        ).images
        decoded = base.vae.decode(latents / base.vae.config.scaling_factor).sample
    expected = base.image_processor.postprocess(decoded, output_type="pil")[0]
    difference = np.abs(pixels(made) - np.asarray(expected, dtype=np.int16))
    assert difference.max() <= 1, difference.max()

    alone = service.generate(request(height=96))
    assert not np.array_equal(pixels(made), pixels(alone))  # the refiner did something
    params = parse_infotext(made.infotexts[0]).params
    entry = service.resolve_checkpoint("tiny-refiner")
    assert params["Refiner"] == f"tiny-refiner [{entry.short_hash}]"
    assert params["Refiner switch at"] == "0.3"
    assert params["Model"] == "tiny-sdxl"  # A1111: Model is the base


def test_switch_at_one_is_no_refiner(service: Service) -> None:
    plain = service.generate(request(seed=5))
    never = service.generate(
        request(seed=5, refiner_checkpoint="tiny-refiner", refiner_switch_at=1)
    )
    assert np.array_equal(pixels(plain), pixels(never))
    assert "Refiner" not in never.infotexts[0]  # A1111 writes it only when it switched


def test_infotext_replays_and_batches_restart_on_the_base(service: Service) -> None:
    """Two batches: each starts on the base again (the second equals a run of it alone),
    and the pasted infotext's refiner replays the image."""
    wanted = request(seed=7, n_iter=2, refiner_checkpoint="tiny-refiner", refiner_switch_at=0.5)
    both = service.generate(wanted)
    alone = service.generate(
        request(seed=8, refiner_checkpoint="tiny-refiner", refiner_switch_at=0.5)
    )
    assert np.array_equal(np.asarray(both.images[1]), np.asarray(alone.images[0]))
    recalled = refiner_from_params(parse_infotext(both.infotexts[1]).params)
    assert recalled == ("tiny-refiner", 0.5)
    replay = service.generate(
        request(seed=8, refiner_checkpoint=recalled[0], refiner_switch_at=recalled[1])
    )
    assert np.array_equal(pixels(replay), pixels(alone))
    assert refiner_from_params({"Steps": "20"}) is None


def test_wrong_family_and_refiner_as_base_are_refused(service: Service) -> None:
    with pytest.raises(InvalidRequestError) as wrong:
        service.submit(request(refiner_checkpoint="tiny-sd1"))
    assert wrong.value.field == "refiner_checkpoint"
    assert "SD1" in wrong.value.message and "SDXL" in wrong.value.message
    with pytest.raises(UnusableFileError, match="refiner") as base:
        service.submit(request(checkpoint="tiny-refiner"))
    assert base.value.field == "checkpoint"
    # the refiner alone works for img2img (A1111), with its aesthetic-score conditioning
    init = ImageInputs(images=(Image.new("RGB", (64, 64), "gray"),))
    refined = service.generate(request(checkpoint="tiny-refiner", img2img=init, steps=2))
    assert refined.images[0].size == (64, 64)
    # naming the request's own checkpoint is no switch at all (A1111)
    same = service.generate(request(seed=9, refiner_checkpoint="xl/tiny-sdxl"))
    assert "Refiner" not in same.infotexts[0]


def test_loras_apply_to_the_refiner_where_they_fit(service: Service) -> None:
    tags = " <lora:xl-unet:1> <lora:xl-clipg:1>"
    made = service.generate(
        request(
            seed=11,
            prompt=SMALL["prompt"] + tags,
            refiner_checkpoint="tiny-refiner",
            refiner_switch_at=0.4,
        )
    )
    notes = [note for note in made.notes if "refiner" in note]
    assert len(notes) == 1 and "'xl-unet' not applied" in notes[0], made.notes
    assert "matches no layer" in notes[0]
    without = service.generate(
        request(
            seed=11,
            prompt=SMALL["prompt"] + " <lora:xl-unet:1>",
            refiner_checkpoint="tiny-refiner",
            refiner_switch_at=0.4,
        )
    )
    # the CLIP-G LoRA changed the refiner's conditioning too (and the base's)
    assert not np.array_equal(pixels(made), pixels(without))


@pytest.mark.parametrize("value", [0.0, 1.5, float("nan")])
def test_switch_at_bounds_name_the_field(value: float) -> None:
    with pytest.raises(InvalidRequestError) as error:
        request(refiner_checkpoint="tiny-refiner", refiner_switch_at=value).validated(Bounds())
    assert error.value.field == "refiner_switch_at"


def test_page_section_values_and_recall() -> None:
    from frontends.page.refiner_panel import (
        NO_REFINER,
        recall_refiner,
        refiner_request_fields,
    )

    assert refiner_request_fields(NO_REFINER, 0.5) == {}
    assert refiner_request_fields("r.safetensors [0123456789]", 0.55) == {
        "refiner_checkpoint": "r.safetensors [0123456789]",
        "refiner_switch_at": 0.55,
    }
    params = {"Refiner": "tiny-refiner [0123456789]", "Refiner switch at": "0.7"}
    titles = {"tiny-refiner": "tiny-refiner.safetensors [0123456789]"}
    assert recall_refiner(params, titles.get) == (
        {"refiner_checkpoint": "tiny-refiner.safetensors [0123456789]", "refiner_switch_at": 0.7},
        [],
    )
    off, warnings = recall_refiner(params, lambda name: None)
    assert off == {"refiner_checkpoint": NO_REFINER} and "not in the models" in warnings[0]
    assert recall_refiner({"Steps": "4"}, titles.get) == ({"refiner_checkpoint": NO_REFINER}, [])


def test_refiner_stays_loaded_and_runs_only_the_hires_second_passs_tail(
    service: Service, tmp_path: Path
) -> None:
    """With room for two checkpoints (A1111's `sd_checkpoints_limit`) the refiner stays
    loaded beside the base, which is current again after the run. With hires fix the
    refiner takes only the second pass's steps after the switch (A1111's default
    `hires_fix_refiner_pass`); img2img switches on its tail too."""
    from dataclasses import replace

    from pipelines.schema import HiresFix
    from tests.test_img2img import UNetCalls

    roomy = build_service(replace(service.settings, checkpoints_limit=2, data_dir=tmp_path))
    plain = roomy.generate(request(seed=13, steps=4, refiner_checkpoint="tiny-refiner"))
    manager = roomy.runner.manager  # type: ignore[attr-defined]
    loaded = {model.name: model for model in manager._loaded.values()}
    assert set(loaded) == {"tiny-sdxl", "tiny-refiner"}
    assert manager.current is loaded["tiny-sdxl"]
    base, refiner = (UNetCalls(loaded[name].pipe.unet) for name in ("tiny-sdxl", "tiny-refiner"))
    try:
        # 4 Euler steps: timesteps 999, 666, 333, 0; switch at 0.6: the last two (t <= 399)
        hires = HiresFix(scale=1.5, second_pass_steps=4)
        both = roomy.generate(
            request(seed=13, steps=4, hires=hires, denoising_strength=0.9, **REFINED)
        )
        assert (base.count, refiner.count) == (4 + 2, 2)  # CFG runs in one UNet batch
        assert {model.name for model in manager._loaded.values()} == set(loaded)  # no reload
        assert "Refiner: tiny-refiner" in both.infotexts[0]
        base.count = refiner.count = 0
        init = ImageInputs(images=(plain.images[0],))
        roomy.generate(request(seed=13, steps=4, img2img=init, denoising_strength=0.9, **REFINED))
        assert (base.count, refiner.count) == (2, 2)
        # the CLIP-G LoRA is merged into the refiner's text encoder too; the UNet one not
        tags = " <lora:xl-clipg:1> <lora:xl-unet:1>"
        roomy.generate(request(seed=13, steps=2, prompt=SMALL["prompt"] + tags, **REFINED))
        assert loaded["tiny-refiner"].adapters.applied_layers == 1
        assert loaded["tiny-sdxl"].adapters.applied_layers == 11 + 1
    finally:
        base.close()
        refiner.close()


def test_config_folders_say_which_pipeline(tmp_path: Path) -> None:
    """The refiner's config folder asks for the aesthetic score; the base's stays SDXL's."""
    import json

    from pipelines.loading import read_model_spec, write_config_folder
    from tests.conftest import SDXL_YAML

    def index(yaml: Path) -> dict[str, object]:
        folder = write_config_folder(read_model_spec(yaml), tmp_path)
        return dict(json.loads((folder / "model_index.json").read_text()))

    refiner, base = index(REFINER_YAML), index(SDXL_YAML)
    assert refiner["_class_name"] == "StableDiffusionXLImg2ImgPipeline"
    assert refiner["requires_aesthetics_score"] is True
    assert base["_class_name"] == "StableDiffusionXLPipeline"
    assert "requires_aesthetics_score" not in base and "safety_checker" not in base


def test_api_fields_reach_the_engine(service: Service) -> None:
    """A1111's JSON fields through the HTTP API: the refiner runs (infotext, notes) and a
    switch point out of range is a 422 naming the field."""
    from fastapi.testclient import TestClient

    from frontends.api.routes import build_api

    body = {
        **{k: v for k, v in SMALL.items() if k != "checkpoint"},
        "steps": 2,
        "override_settings": {"sd_model_checkpoint": "xl/tiny-sdxl"},
        "refiner_checkpoint": "tiny-refiner",
        "refiner_switch_at": 0.5,
    }
    with TestClient(build_api(service, service.settings)) as client:
        made = client.post("/txt2img", json=body)
        assert made.status_code == 200, made.text
        info = json.loads(made.json()["info"])
        assert "Refiner: tiny-refiner" in info["infotexts"][0]
        wrong = client.post("/txt2img", json={**body, "refiner_switch_at": 2})
        assert wrong.status_code == 422 and "refiner_switch_at" in wrong.json()["detail"]
