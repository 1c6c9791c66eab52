"""The few-step rule table: names and metadata of LCM, Turbo, Lightning, Hyper-SD and TCD
files get their model cards' settings; anything else gets none; the LoRA card shows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from frontends.page.stack import card_html
from pipelines.fewstep import suggest
from pipelines.folders.loras import LoraEntry
from pipelines.samplers import resolve_sampler


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("lcm-lora-sdv1-5", ("LCM", "LCM", "automatic", 4, 1.5)),
        ("pytorch_lora_weights_LCM_SDXL", ("LCM", "LCM", "automatic", 4, 1.5)),
        ("sd_xl_turbo_1.0_fp16", ("Turbo", "Euler a", "automatic", 1, 1.0)),
        ("sdxl_lightning_4step_lora", ("Lightning", "Euler", "sgm_uniform", 4, 1.0)),
        ("sdxl_lightning_8step_lora", ("Lightning", "Euler", "sgm_uniform", 8, 1.0)),
        ("SDXL-Lightning 2-steps", ("Lightning", "Euler", "sgm_uniform", 2, 1.0)),
        ("Hyper-SD15-1step-lora", ("Hyper-SD", "TCD", "automatic", 1, 1.0)),
        ("Hyper-SDXL-8steps-lora", ("Hyper-SD", "DDIM", "sgm_uniform", 8, 1.0)),
        ("Hyper-SDXL-12steps-CFG-lora", ("Hyper-SD", "DDIM", "sgm_uniform", 12, 6.0)),
        ("TCD-SDXL-LoRA", ("TCD", "TCD", "automatic", 4, 1.0)),
    ],
)
def test_few_step_names_get_their_model_cards_settings(
    name: str, expected: tuple[str, str, str, int, float]
) -> None:
    found = suggest(name)
    assert found is not None
    got = (found.kind, found.sampler_name, found.scheduler, found.steps, found.cfg_scale)
    assert got == expected
    resolve_sampler(found.sampler_name, found.scheduler)  # a combination we can run


@pytest.mark.parametrize(
    "name", ["ink_style", "turbocharged-car-v2", "flcmx", "blightning", "dreamshaper_8"]
)
def test_plain_names_get_nothing(name: str) -> None:
    assert suggest(name) is None


def test_metadata_names_count_too() -> None:
    assert suggest("my_file", {"ss_output_name": "lcm_lora_sd15"}) is not None
    assert suggest("x", {"modelspec.title": "SDXL Lightning 4 step"}).steps == 4  # type: ignore[union-attr]
    assert suggest("x", {"ss_tag_frequency": "lightning"}) is None  # words, not a name


def test_the_lora_card_shows_the_settings() -> None:
    def entry(name: str) -> LoraEntry:
        path = Path(f"/x/{name}.safetensors")
        return LoraEntry(name=name, relpath=path.name, path=path, alias=name, size=1, mtime_ns=0)

    assert "Lightning: Euler, sgm_uniform schedule, 4 steps, CFG 1" in card_html(
        entry("sdxl_lightning_4step_lora"), None
    )
    assert "lora-fewstep" not in card_html(entry("ink_style"), None)
