"""LoRA stacks through the service: tags and UI rows, exact restore, isolation, errors."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import NotFoundError, UnusableFileError
from pipelines.infotext import parse_infotext
from pipelines.loading import LoadedModel
from pipelines.schema import GenerationRequest, LoraSpec
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

SMALL = {"width": 64, "height": 64, "steps": 2, "checkpoint": "tiny-sd1"}


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    tiny_sd1: LoadedModel,
    tiny_sdxl: LoadedModel,
) -> Service:
    data = tmp_path_factory.mktemp("data")
    loras = data / "loras"
    keys = sd1_keys(SD1_MODULES)
    write(
        loras / "ink.safetensors",
        make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1),
        {"ss_output_name": "ink_style"},
    )
    write(
        loras / "styles" / "glow.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=2)
    )
    xl_modules = [
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "linear"),
        ("text_encoder", "encoder.layers.0.self_attn.q_proj", "linear"),
        ("text_encoder_2", "text_model.encoder.layers.0.self_attn.q_proj", "linear"),
    ]
    prefixes = {
        "unet": "lora_unet_",
        "text_encoder": "lora_te1_text_model_",
        "text_encoder_2": "lora_te2_",
    }
    xl_keys = {(c, n): prefixes[c] + n.replace(".", "_") for c, n, _ in xl_modules}
    xl = make_kohya(tiny_sdxl.pipe, xl_modules, xl_keys, seed=3)
    write(loras / "xl-only.safetensors", xl, {"ss_base_model_version": "sdxl_base_v1-0"})
    partial = make_kohya(tiny_sd1.pipe, SD1_MODULES[:2], keys, seed=4)
    partial["lora_unet_output_blocks_99_1_proj_in.lora_down.weight"] = partial[
        f"{keys[SD1_MODULES[0][:2]]}.lora_down.weight"
    ].clone()
    partial["lora_unet_output_blocks_99_1_proj_in.lora_up.weight"] = partial[
        f"{keys[SD1_MODULES[0][:2]]}.lora_up.weight"
    ].clone()
    write(loras / "partial.safetensors", partial)
    settings = Settings(data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(loras,), threads=2)
    service = build_service(settings)
    service.folders.hash_missing()
    return service


def pixels(engine: Service, **fields: object) -> np.ndarray:
    request = GenerationRequest(**{"prompt": "a tower", "seed": 9, **SMALL, **fields})
    return np.asarray(engine.generate(request).images[0])


def test_tag_and_stack_row_are_the_same(engine: Service) -> None:
    by_tag = pixels(engine, prompt="a tower <lora:ink:0.8>")
    by_row = pixels(engine, loras=(LoraSpec("ink", 0.8),))
    base = pixels(engine)
    assert np.array_equal(by_tag, by_row)
    assert not np.array_equal(by_tag, base)


def test_infotext_replays_stack_rows_as_tags(engine: Service) -> None:
    result = engine.generate(
        GenerationRequest(
            prompt="a tower",
            seed=9,
            loras=(LoraSpec("ink", 0.8), LoraSpec("glow", -0.5, 0.25)),
            **SMALL,
        )
    )
    parsed = parse_infotext(result.infotexts[0])
    assert parsed.prompt == "a tower <lora:ink:0.8> <lora:glow:0.25:-0.5>"
    hashes = parse_infotext(result.infotexts[0]).lora_hashes
    assert hashes == {
        "ink": engine.resolve_lora("ink").short_hash,
        "glow": engine.resolve_lora("glow").short_hash,
    }
    replay = engine.generate(GenerationRequest(prompt=parsed.prompt, seed=9, **SMALL))
    assert np.array_equal(np.asarray(replay.images[0]), np.asarray(result.images[0]))


def test_weight_zero_and_removal_restore_base_bit_exactly(engine: Service) -> None:
    base = pixels(engine)
    assert np.array_equal(pixels(engine, loras=(LoraSpec("ink", 0.0),)), base)
    pixels(engine, prompt="a tower <lora:ink:1.3> <lora:glow:0.7>")
    assert np.array_equal(pixels(engine), base)


def test_interleaved_requests_keep_their_own_stacks(engine: Service) -> None:
    stacks = [
        (LoraSpec("ink", 1.0),),
        (LoraSpec("glow", 0.6),),
        (),
        (LoraSpec("ink", -0.4), LoraSpec("glow", 0.9)),
    ]
    references = [pixels(engine, loras=stack) for stack in stacks]
    results: dict[int, np.ndarray] = {}

    def run(index: int) -> None:
        results[index] = pixels(engine, loras=stacks[index])

    threads = [threading.Thread(target=run, args=(i % 4,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, reference in enumerate(references):
        assert np.array_equal(results[index], reference)


def test_alias_lookup_and_unknown_name(engine: Service) -> None:
    assert np.array_equal(
        pixels(engine, prompt="a tower <lora:ink_style:1>"),
        pixels(engine, prompt="a tower <lora:ink:1>"),
    )
    with pytest.raises(NotFoundError, match="ink"):
        pixels(engine, prompt="a tower <lora:inc:1>")


def test_wrong_family_is_refused_naming_both(engine: Service) -> None:
    with pytest.raises(UnusableFileError) as caught:
        pixels(engine, prompt="a tower <lora:xl-only:1>")
    assert "SDXL" in caught.value.message and "SD1" in caught.value.message
    assert pixels(engine).shape == (64, 64, 3)  # still serving


def test_tag_overrides_stack_row_with_a_note(engine: Service) -> None:
    result = engine.generate(
        GenerationRequest(
            prompt="a tower <lora:ink:0.5>", seed=9, loras=(LoraSpec("ink", 1.0),), **SMALL
        )
    )
    assert any("replaces the stack weight" in note for note in result.notes)
    only_tag = pixels(engine, prompt="a tower <lora:ink:0.5>")
    assert np.array_equal(np.asarray(result.images[0]), only_tag)
    assert "<lora:ink:1>" not in result.infotexts[0]


def test_coverage_report_per_applied_lora(
    engine: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """Every applied LoRA is reported in the notes, the result and the log; a partial one
    says what it skipped; the API's info carries `lora_coverage`."""
    from frontends.api import a1111

    with caplog.at_level(logging.INFO, logger="pipelines.lora.stack"):
        result = engine.generate(
            GenerationRequest(prompt="a tower <lora:partial:0.5> <lora:ink:1>", seed=9, **SMALL)
        )
    by_name = {report.name: report for report in result.lora_coverage}
    assert set(by_name) == {"ink", "partial"}
    assert by_name["ink"].complete and by_name["ink"].total == len(SD1_MODULES)
    partial = by_name["partial"]
    assert (partial.matched, partial.total) == (2, 3)
    assert partial.skipped == ("lora_unet_output_blocks_99_1_proj_in",)
    assert ("UNet up", 0, 1) in partial.regions
    assert by_name["ink"].summary() in result.notes
    assert partial.summary() in result.notes
    assert "skipped 1: 'lora_unet_output_blocks_99_1_proj_in'" in partial.summary()
    logged = [r for r in caplog.records if "LoRA 'partial'" in r.getMessage()]
    assert logged and logged[0].levelno == logging.WARNING
    call = a1111.parse_txt2img({"prompt": "a tower"}, a1111.ApiOptions())
    info = a1111.txt2img_info(call, result, started=0.0)
    assert [entry["name"] for entry in info["lora_coverage"]] == ["partial", "ink"]
    assert info["lora_coverage"][0]["skipped"] == ["lora_unet_output_blocks_99_1_proj_in"]
    assert info["lora_coverage"][0]["regions"]["UNet down"] == {"matched": 2, "total": 2}
    json.dumps(info)
    plain = engine.generate(GenerationRequest(prompt="a tower", seed=9, **SMALL))
    assert plain.lora_coverage == []


def test_negative_prompt_tags_are_text(engine: Service) -> None:
    with_tag = pixels(engine, negative_prompt="blurry <lora:ink:1>")
    assert not np.array_equal(
        with_tag, pixels(engine, negative_prompt="blurry", loras=(LoraSpec("ink", 1.0),))
    )


def test_prompt_cache_skips_text_encoder_only_when_valid(engine: Service) -> None:
    pixels(engine)  # make sure tiny-sd1 is loaded
    calls: list[int] = []
    text_encoder = engine.runner.manager.current.pipe.text_encoder
    hook = text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        pixels(engine, prompt="a cached castle", seed=1)
        first = len(calls)
        pixels(engine, prompt="a cached castle", seed=2, sampler_name="Euler a")
        assert len(calls) == first  # only the seed/sampler changed: no encoder run
        with_te = pixels(engine, prompt="a cached castle", loras=(LoraSpec("ink", 0.0, 1.0),))
        assert len(calls) > first  # the text encoder's weights changed: encoded again
        engine.runner.manager.current.prompt_cache.clear()
        fresh = pixels(engine, prompt="a cached castle", loras=(LoraSpec("ink", 0.0, 1.0),))
        assert np.array_equal(with_te, fresh)
    finally:
        hook.remove()
