"""The txt2img page's Hires fix section: its values become the request's HiresFix (A1111's
"Use same ..." choices mean the first pass's), its "from WxH to WxH" line matches the size
the engine makes, and a pasted infotext fills it back (or turns it off)."""

from __future__ import annotations

import pytest

from frontends.page.hires_panel import (
    OFF,
    SAME_CHECKPOINT,
    SAME_SAMPLER,
    SAME_SCHEDULER,
    final_resolution_text,
    hires_from_values,
    recall_hires,
)
from pipelines.errors import InvalidRequestError
from pipelines.infotext import parse_infotext
from pipelines.schema import HiresFix


def test_off_means_no_hires_and_defaults_are_a1111s() -> None:
    assert hires_from_values(OFF) is None
    on = hires_from_values({**OFF, "enable_hr": True})
    assert on == HiresFix(scale=2.0, upscaler="Latent")  # every "Use same" -> first pass's
    assert (OFF["denoising_strength"], OFF["hr_scale"], OFF["hr_upscaler"]) == (0.7, 2.0, "Latent")


def test_values_become_the_request_fields() -> None:
    values = {
        **OFF,
        "enable_hr": True,
        "hr_upscaler": "2x_tiny",
        "hr_second_pass_steps": 4.0,  # sliders send floats
        "hr_scale": 1.25,
        "hr_resize_x": 160.0,
        "hr_checkpoint_name": "other.safetensors [abcdef0123]",
        "hr_sampler_name": "DPM++ 2M",
        "hr_scheduler": "Karras",
        "hr_prompt": "sharp",
        "hr_negative_prompt": "blur",
    }
    assert hires_from_values(values) == HiresFix(
        scale=1.25,
        resize_x=160,
        upscaler="2x_tiny",
        second_pass_steps=4,
        sampler_name="DPM++ 2M",
        scheduler="karras",
        prompt="sharp",
        negative_prompt="blur",
        checkpoint="other.safetensors [abcdef0123]",
    )
    # a schedule alone is checked against the first pass's sampler, which it keeps
    only_schedule = {**OFF, "enable_hr": True, "hr_scheduler": "Exponential"}
    hires = hires_from_values({**only_schedule, "sampler_name": "DPM++ 2M"})
    assert hires is not None and (hires.sampler_name, hires.scheduler) == (None, "exponential")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"hr_sampler_name": "Nope"}, "hr_sampler_name"),
        ({"hr_sampler_name": "DDIM", "hr_scheduler": "Karras"}, "hr_scheduler"),
        ({"hr_upscaler": None}, "hr_upscaler"),
    ],
)
def test_bad_values_name_their_field(change: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        hires_from_values({**OFF, "enable_hr": True, **change})
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("first", "values", "final"),
    [
        ((64, 64), (2.0, 0, 0), "128x128"),
        ((64, 96), (1.5, 0, 0), "96x144"),
        ((64, 96), (2.0, 160, 0), "160x240"),
        ((96, 64), (2.0, 0, 96), "144x96"),
        ((64, 64), (2.0, 160, 96), "160x96"),  # cover, then crop the excess
    ],
)
def test_final_resolution_line_is_the_engines_size(
    first: tuple[int, int], values: tuple[float, int, int], final: str
) -> None:
    text = final_resolution_text(*first, *values)
    assert text == f"from **{first[0]}x{first[1]}** to **{final}**"
    scale, resize_x, resize_y = values
    size = HiresFix(scale=scale, resize_x=resize_x, resize_y=resize_y).final_size(*first)
    assert f"{size[0]}x{size[1]}" == final
    assert final_resolution_text(None, 64, 2.0, 0, 0) == ""  # a cleared field: no line


def params_of(keys: str) -> dict[str, str]:
    return parse_infotext(
        f"a castle\nSteps: 20, Sampler: Euler, Seed: 1, Size: 64x64, {keys}"
    ).params


def test_a_pasted_infotext_fills_the_section() -> None:
    params = params_of(
        "Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 8, Hires upscaler: "
        "Latent (nearest), Hires sampler: DPM++ 2M, Hires schedule type: Karras, Hires prompt: "
        '"sharp, detailed", Hires checkpoint: other [0123456789]'
    )
    titles = {"other": "other.safetensors [0123456789]"}
    values, warnings = recall_hires(params, titles.get)
    assert warnings == []
    assert values == {
        **{name: value for name, value in OFF.items() if name != "denoising_strength"},
        "enable_hr": True,
        "hr_upscaler": "Latent (nearest)",
        "hr_second_pass_steps": 8,
        "hr_scale": 1.5,
        "hr_checkpoint_name": "other.safetensors [0123456789]",
        "hr_sampler_name": "DPM++ 2M",
        "hr_scheduler": "Karras",
        "hr_prompt": "sharp, detailed",
    }
    resized, _ = recall_hires(params_of("Denoising strength: 0.5, Hires resize: 160x96"), {}.get)
    assert (resized["hr_resize_x"], resized["hr_resize_y"]) == (160, 96)
    assert resized["hr_sampler_name"] == SAME_SAMPLER
    assert resized["hr_scheduler"] == SAME_SCHEDULER


def test_no_hires_keys_or_a_missing_checkpoint() -> None:
    assert recall_hires(params_of("Denoising strength: 0.5"), {}.get) == ({"enable_hr": False}, [])
    # as A1111's paste: Hires keys without a denoising strength leave the fix off
    assert recall_hires(params_of("Hires upscale: 2"), {}.get) == ({"enable_hr": False}, [])
    values, warnings = recall_hires(
        params_of("Denoising strength: 0.5, Hires upscale: 2, Hires checkpoint: gone [0a1b2c3d4e]"),
        {}.get,
    )
    assert values["enable_hr"] and values["hr_checkpoint_name"] == SAME_CHECKPOINT
    assert warnings == [
        "Hires checkpoint gone is not in the models folders; the second pass uses the same "
        "checkpoint"
    ]
    bad, warned = recall_hires(params_of("Denoising strength: 0.5, Hires steps: many"), {}.get)
    assert bad == {"enable_hr": False} and "turned off" in warned[0]
