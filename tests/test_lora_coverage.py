"""The LoRA coverage report: for every applied LoRA, how many of its modules found a layer,
per region (text encoders, UNet down/mid/up), and which did not; in the result's notes and
`lora_coverage` (the API's info), and in the log. A file that matches nothing is refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pipelines.errors import LorastackError
from pipelines.loading import LoadedModel
from pipelines.lora.coverage import LoraCoverage, region_of
from pipelines.schema import GenerationRequest, LoraSpec
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

STRAY = "lora_unet_up_blocks_9_attentions_0_proj_in"  # a layer the tiny UNet lacks


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Service:
    folder = tmp_path_factory.mktemp("coverage-loras")
    state = make_kohya(tiny_sd1.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=1)
    write(folder / "whole.safetensors", state)
    stray = {
        f"{STRAY}.lora_down.weight": torch.zeros(4, 32),
        f"{STRAY}.lora_up.weight": torch.zeros(32, 4),
        f"{STRAY}.alpha": torch.tensor(4.0),
    }
    write(folder / "partial.safetensors", {**state, **stray})
    write(folder / "nothing.safetensors", stray)
    data = tmp_path_factory.mktemp("coverage-data")
    return build_service(
        Settings(data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(folder,), threads=2)
    )


def run(service: Service, name: str) -> object:
    request = GenerationRequest(
        prompt="a hill", steps=1, width=64, height=64, seed=1, checkpoint="tiny-sd1",
        loras=(LoraSpec(name, 0.7),),
    )  # fmt: skip
    return service.generate(request)


def report_of(result: object, name: str) -> LoraCoverage:
    return next(r for r in result.lora_coverage if r.name == name)  # type: ignore[attr-defined]


def test_a_whole_match_is_reported_by_region(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="pipelines.lora.stack"):
        result = run(service, "whole")
    report = report_of(result, "whole")
    assert report.complete and report.matched == report.total == len(SD1_MODULES)
    expected = {"text encoder": 0, "UNet down": 0, "UNet mid": 0, "UNet up": 0}
    for component, name, _ in SD1_MODULES:  # counted from the module names, independently
        prefix = name.split(".")[0]
        where = {"down_blocks": "UNet down", "mid_block": "UNet mid", "up_blocks": "UNet up"}
        expected["text encoder" if component != "unet" else where[prefix]] += 1
    assert {region: (hit, of) for region, hit, of in report.regions} == {
        region: (count, count) for region, count in expected.items()
    }
    assert report.skipped == ()
    line = f"LoRA 'whole': {len(SD1_MODULES)} of {len(SD1_MODULES)} modules matched"
    assert any(note.startswith(line) for note in result.notes)  # type: ignore[attr-defined]
    assert line in caplog.text


def test_a_partial_match_is_applied_and_names_what_was_skipped(service: Service) -> None:
    result = run(service, "partial")
    report = report_of(result, "partial")
    assert report.matched == len(SD1_MODULES) and report.total == len(SD1_MODULES) + 1
    assert report.skipped == (STRAY,)
    up = next((hit, of) for region, hit, of in report.regions if region == "UNet up")
    assert up[1] == up[0] + 1
    note = next(n for n in result.notes if n.startswith("LoRA 'partial'"))  # type: ignore[attr-defined]
    assert f"skipped 1: {STRAY!r}" in note


def test_a_file_matching_nothing_is_refused(service: Service) -> None:
    with pytest.raises(LorastackError, match="matches no layer"):
        run(service, "nothing")


@pytest.mark.parametrize(
    ("key", "region"),
    [
        ("lora_te2_text_model_encoder_layers_0_mlp_fc1", "text encoder 2"),
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", "text encoder"),
        ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj", "text encoder"),
        ("lora_unet_input_blocks_4_1_proj_in", "UNet down"),
        ("unet.mid_block.attentions.0.proj_out", "UNet mid"),
        ("lora_unet_output_blocks_3_0_emb_layers_1", "UNet up"),
        ("something_else", "UNet other"),
    ],
)
def test_unmatched_keys_are_placed_by_their_spelling(key: str, region: str) -> None:
    assert region_of(None, key, key) == region


def test_the_card_report_before_generating(service: Service) -> None:
    """The LoRA card's report (`Service.lora_coverage`): the same numbers a generation
    reports, once the checkpoint is loaded; a sentence saying why before that."""
    from frontends.page.stack import coverage_html

    service.select_checkpoint("tiny-sd1")
    other = service.lora_coverage("partial", "tiny-sd1-diffusers")  # listed, not loaded
    assert isinstance(other, str) and "tiny-sd1-diffusers is loaded" in other
    report = service.lora_coverage("partial", "tiny-sd1")
    assert isinstance(report, LoraCoverage)
    assert report == report_of(run(service, "partial"), "partial")
    shown = coverage_html(report)
    assert shown.startswith(f'<div class="lora-coverage">⚠ {len(SD1_MODULES)} of ')
    assert f"<code>{STRAY}</code>" in shown and "1 skipped (no such layer)" in shown
    whole = coverage_html(service.lora_coverage("whole", "tiny-sd1"))
    assert "✓" in whole and "<details>" not in whole
    with pytest.raises(LorastackError, match="no-such-lora"):
        service.lora_coverage("no-such-lora", "tiny-sd1")
