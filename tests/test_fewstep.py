"""The few-step rule table (`pipelines/fewstep.py`): names and metadata -> suggested
sampler, schedule, steps and CFG; a plain file -> none; shown on LoRA cards, beside the
checkpoint choice (with "Use suggested settings") and in the API's LoRA listing."""

from __future__ import annotations

import shutil
from pathlib import Path

import gradio as gr
import pytest
from safetensors.torch import load_file, save_file

from frontends.api.a1111 import lora_item
from frontends.page import stack as st
from frontends.page.fewstep_panel import (
    TARGETS,
    checkpoint_note,
    checkpoint_suggestion,
    suggested_values,
)
from pipelines.fewstep import FewStepSettings, suggest
from pipelines.loading import LoadedModel
from pipelines.samplers import resolve_sampler, schedulers_for
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_files_tab import make_page
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

# name -> (kind, sampler, schedule, steps, steps range, cfg, cfg range)
NAMES = [
    ("lcm-lora-sdv1-5", ("LCM", "LCM", "automatic", 4, (2, 8), 1.5, (1.0, 2.0))),
    ("lcm_lora_sdxl", ("LCM", "LCM", "automatic", 4, (2, 8), 1.5, (1.0, 2.0))),
    ("LCM_Dreamshaper_v7", ("LCM", "LCM", "automatic", 4, (2, 8), 1.5, (1.0, 2.0))),
    ("dreamshaper8LCM", ("LCM", "LCM", "automatic", 4, (2, 8), 1.5, (1.0, 2.0))),
    ("sd_xl_turbo_1.0_fp16", ("SD/SDXL-Turbo", "Euler a", "automatic", 4, (1, 4), 1, (1, 1))),
    ("sd_turbo", ("SD/SDXL-Turbo", "Euler a", "automatic", 4, (1, 4), 1, (1, 1))),
    ("dreamshaperXL_turboDPMSDE", ("SD/SDXL-Turbo", "Euler a", "automatic", 4, (1, 4), 1, (1, 1))),
    ("sdxl_lightning_2step_lora", ("SDXL-Lightning", "Euler", "sgm_uniform", 2, (2, 2), 1, (1, 1))),
    ("sdxl_lightning_4step", ("SDXL-Lightning", "Euler", "sgm_uniform", 4, (4, 4), 1, (1, 1))),
    ("sdxl_lightning_8step_lora", ("SDXL-Lightning", "Euler", "sgm_uniform", 8, (8, 8), 1, (1, 1))),
    ("juggernautXL_lightning", ("SDXL-Lightning", "Euler", "sgm_uniform", 4, (2, 8), 1, (1, 1))),
    ("Hyper-SDXL-8steps-lora", ("Hyper-SD", "DDIM", "sgm_uniform", 8, (8, 8), 1, (1, 1))),
    ("Hyper-SD15-4steps-lora", ("Hyper-SD", "DDIM", "sgm_uniform", 4, (4, 4), 1, (1, 1))),
    ("Hyper-SDXL-1step-lora", ("Hyper-SD", "TCD", "automatic", 1, (1, 1), 1, (1, 1))),
    ("Hyper-SDXL-12steps-CFG-lora",
     ("Hyper-SD (CFG)", "DDIM", "sgm_uniform", 12, (12, 12), 5, (5, 8))),
    ("hyper_sd15_8step", ("Hyper-SD", "DDIM", "sgm_uniform", 8, (8, 8), 1, (1, 1))),
    ("TCD-SDXL-LoRA", ("TCD", "TCD", "automatic", 4, (4, 8), 1, (1, 1))),
    ("tcd_sd15", ("TCD", "TCD", "automatic", 4, (4, 8), 1, (1, 1))),
]  # fmt: skip
PLAIN = [
    "ink",
    "v1-5-pruned-emaonly",
    "juggernautXL_v9",
    "hyperrealism_v3",
    "blcmx",
    "pytorch_lora_weights",
    "watercolor_style",
    "steps_to_heaven",
]


def fields(found: FewStepSettings) -> tuple:
    return (
        found.kind,
        found.sampler_name,
        found.scheduler,
        found.steps,
        found.steps_range,
        found.cfg_scale,
        found.cfg_range,
    )


@pytest.mark.parametrize(("name", "expected"), NAMES)
def test_names_give_the_model_cards_settings(name: str, expected: tuple) -> None:
    found = suggest(name)
    assert found is not None
    assert fields(found) == expected
    assert found.matched == f'file name "{name}"'
    assert found.source.startswith("https://huggingface.co/")


@pytest.mark.parametrize("name", PLAIN)
def test_a_plain_name_gets_no_suggestion(name: str) -> None:
    assert suggest(name) is None
    assert (
        suggest(name, {"ss_sd_model_name": "sdxl_lightning_4step", "ss_network_dim": "8"}) is None
    )


@pytest.mark.parametrize(
    ("metadata", "kind", "where"),
    [
        ({"ss_output_name": "lcm-lora-sdxl"}, "LCM", "ss_output_name"),
        ({"ss_output_name": "my_Hyper-SD_8steps"}, "Hyper-SD", "ss_output_name"),
        ({"modelspec.title": "SDXL Turbo"}, "SD/SDXL-Turbo", "modelspec.title"),
        ({"modelspec.title": "SDXL-Lightning 2-step"}, "SDXL-Lightning", "modelspec.title"),
        ({"modelspec.title": "tcd lora", "ss_output_name": "plain"}, "TCD", "modelspec.title"),
    ],
)
def test_metadata_marks_a_file_whose_name_does_not(metadata: dict, kind: str, where: str):
    found = suggest("pytorch_lora_weights.safetensors", metadata)
    assert found is not None and found.kind == kind
    assert found.matched.startswith(where)


def test_the_name_wins_over_metadata_and_steps_come_from_the_matching_text():
    found = suggest("sdxl_lightning_8step_lora", {"modelspec.title": "LCM"})
    assert found is not None and found.kind == "SDXL-Lightning" and found.steps == 8
    found = suggest("plain", {"modelspec.title": "SDXL-Lightning 2-step"})
    assert found is not None and found.steps == 2


def test_every_suggestion_is_a_valid_request():
    """Each row's sampler and schedule resolve, with steps and CFG inside their ranges."""
    for name, _ in NAMES:
        found = suggest(name)
        assert found is not None
        choice = resolve_sampler(found.sampler_name, found.scheduler)
        assert found.scheduler in schedulers_for(choice.sampler)
        assert found.steps_range[0] <= found.steps <= found.steps_range[1]
        assert found.cfg_range[0] <= found.cfg_scale <= found.cfg_range[1]


def test_summary_and_page_values():
    found = suggest("sdxl_lightning_4step_lora")
    assert found is not None
    assert found.summary() == "SDXL-Lightning: Euler · SGM Uniform · 4 steps · CFG 1"
    assert suggested_values(found) == ("Euler", "SGM Uniform", 4, 1.0)
    lcm = suggest("lcm-lora-sdxl")
    assert lcm is not None
    assert lcm.summary() == "LCM: LCM · Automatic · 4 steps (2–8) · CFG 1.5 (1–2)"
    assert suggested_values(lcm) == ("LCM", "Automatic", 4, 1.5)


# ---------------------------------------------------------- cards, API and the page


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Service:
    data = tmp_path_factory.mktemp("fewstep-ui")
    loras = data / "loras"
    keys = sd1_keys(SD1_MODULES)
    write(
        loras / "lcm-lora-sdv1-5.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=0)
    )
    write(loras / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    write(
        loras / "renamed.safetensors",
        make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=2),
        {"ss_output_name": "Hyper-SD15-8steps-lora"},
    )
    models = data / "models"
    models.mkdir()
    single = models_dir / "tiny-sd1.safetensors"
    shutil.copy(single, models / "sdxl_lightning_4step.safetensors")
    shutil.copy(models_dir / "tiny-sd1.yaml", models / "sdxl_lightning_4step.yaml")
    save_file(load_file(single), str(models / "fast.safetensors"), {"modelspec.title": "SD Turbo"})
    shutil.copy(single, models / "plain.safetensors")
    settings = Settings(data_dir=data, ckpt_dirs=(models,), lora_dirs=(loras,), threads=2)
    return build_service(settings)


def test_the_lora_card_shows_the_suggestion(engine: Service) -> None:
    card = st.card_html(engine.resolve_lora("lcm-lora-sdv1-5"), None)
    assert 'class="lora-fewstep"' in card
    assert "LCM: LCM · Automatic · 4 steps (2–8) · CFG 1.5 (1–2)" in card
    assert "latent-consistency/lcm-lora-sdxl" in card  # the model card, in the tooltip
    renamed = st.card_html(engine.resolve_lora("renamed"), None)
    assert "Hyper-SD: DDIM · SGM Uniform · 8 steps · CFG 1" in renamed
    assert "ss_output_name" in renamed
    assert "lora-fewstep" not in st.card_html(engine.resolve_lora("ink"), None)


def test_the_api_lora_listing_carries_the_suggestion(engine: Service) -> None:
    item = lora_item(engine.resolve_lora("lcm-lora-sdv1-5"), hide_paths=True)
    assert item["suggested_settings"]["sampler_name"] == "LCM"
    assert item["suggested_settings"]["steps"] == 4
    assert item["suggested_settings"]["cfg_range"] == [1.0, 2.0]
    plain = lora_item(engine.resolve_lora("ink"), hide_paths=True)
    assert set(plain) == {"name", "alias", "path", "metadata"}  # A1111's shape, unchanged


def test_checkpoints_by_name_and_by_metadata(engine: Service) -> None:
    lightning = checkpoint_suggestion(engine, "sdxl_lightning_4step")
    assert lightning is not None and (lightning.sampler_name, lightning.steps) == ("Euler", 4)
    assert "SGM Uniform" in checkpoint_note(lightning)
    turbo = checkpoint_suggestion(engine, "fast")
    assert turbo is not None and turbo.kind == "SD/SDXL-Turbo"
    assert turbo.matched == 'modelspec.title "SD Turbo"'
    assert checkpoint_suggestion(engine, "plain") is None
    assert checkpoint_suggestion(engine, "no-such-model") is None
    assert checkpoint_note(None) == ""


def test_use_suggested_settings_beside_the_checkpoint(engine: Service) -> None:
    """The page's button fills sampler, schedule, steps and CFG from the chosen checkpoint."""
    page = make_page(engine)
    button = next(
        b for b in page.blocks.values() if getattr(b, "elem_id", None) == "checkpoint_fewstep_use"
    )
    click = next(
        f
        for f in page.fns.values()
        if any(t[0] == button._id and t[1] == "click" for t in f.targets)
    )
    labels = [getattr(o, "label", None) for o in click.outputs]
    assert labels == ["Sampling method", "Schedule type", "Sampling steps", "CFG scale"]
    assert len(labels) == len(TARGETS)
    assert click.fn("sdxl_lightning_4step") == ("Euler", "SGM Uniform", 4, 1.0)
    skipped = click.fn("plain")
    assert all(isinstance(value, dict) or value == gr.skip() for value in skipped)
