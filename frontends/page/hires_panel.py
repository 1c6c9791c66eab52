"""The txt2img tab's Hires fix section, as A1111 1.10's (`modules/ui.py`, "Hires. fix"):
a second img2img pass over the upscaled first pass. Its values become the request's
`HiresFix` and `denoising_strength`; a pasted infotext's `Hires ...` keys fill them back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import gradio as gr

from frontends.page.defaults import scheduler_label
from frontends.page.lora_panel import QUICK
from pipelines.errors import InvalidRequestError
from pipelines.infotext import hires_from_params
from pipelines.samplers import SAMPLER_NAMES, SCHEDULER_LABELS, resolve_sampler
from pipelines.schema import LATENT_UPSCALE_MODES, Bounds, HiresFix

SAME_CHECKPOINT = "Use same checkpoint"
SAME_SAMPLER = "Use same sampler"
SAME_SCHEDULER = "Use same scheduler"
HIRES_DENOISING = 0.7
"""A1111's txt2img page default for the second pass's denoising strength."""
HIRES_FIELDS = (
    "enable_hr",
    "hr_upscaler",
    "hr_second_pass_steps",
    "denoising_strength",
    "hr_scale",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
)
"""The section's values, named as A1111's API fields (the page's txt2img endpoint takes
them by these names)."""
OFF: dict[str, Any] = {
    "enable_hr": False,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 0,
    "denoising_strength": HIRES_DENOISING,
    "hr_scale": 2.0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_checkpoint_name": SAME_CHECKPOINT,
    "hr_sampler_name": SAME_SAMPLER,
    "hr_scheduler": SAME_SCHEDULER,
    "hr_prompt": "",
    "hr_negative_prompt": "",
}
"""A1111's page defaults: the section as a new page shows it."""


def upscaler_choices(model_upscalers: list[str]) -> list[str]:
    """A1111's `hr_upscaler` list: the latent modes, then None, Lanczos, Nearest and the
    model upscalers (`model_upscalers` is the service's list, built-ins first)."""
    return [*LATENT_UPSCALE_MODES, *model_upscalers]


def build_hires(
    upscaler_names: Callable[[], list[str]],
    checkpoint_choices: Callable[[], list[str]],
    bounds: Bounds,
    page: gr.Blocks,
) -> tuple[dict[str, Any], gr.Markdown]:
    """The section's components (by `HIRES_FIELDS` name) and its "from WxH to WxH" line.
    The upscaler and checkpoint lists are read again on page load."""
    values: dict[str, Any] = {}
    values["enable_hr"] = gr.Checkbox(False, label="Hires. fix", elem_id="txt2img_hr")
    with gr.Group(visible=False, elem_id="txt2img_hires_fix") as section:
        with gr.Row():
            values["hr_upscaler"] = gr.Dropdown(
                upscaler_choices(upscaler_names()),
                value="Latent",
                label="Upscaler",
                elem_id="txt2img_hr_upscaler",
            )
            values["hr_second_pass_steps"] = gr.Slider(
                0,
                bounds.max_steps,
                value=0,
                step=1,
                label="Hires steps",
                elem_id="txt2img_hires_steps",
            )
            values["denoising_strength"] = gr.Slider(
                0.0,
                1.0,
                value=HIRES_DENOISING,
                step=0.01,
                label="Denoising strength",
                elem_id="txt2img_denoising_strength",
            )
        with gr.Row():
            values["hr_scale"] = gr.Slider(
                1.0, 4.0, value=2.0, step=0.05, label="Upscale by", elem_id="txt2img_hr_scale"
            )
            values["hr_resize_x"] = gr.Slider(
                0,
                bounds.max_size,
                value=0,
                step=8,
                label="Resize width to",
                elem_id="txt2img_hr_resize_x",
            )
            values["hr_resize_y"] = gr.Slider(
                0,
                bounds.max_size,
                value=0,
                step=8,
                label="Resize height to",
                elem_id="txt2img_hr_resize_y",
            )
        final = gr.Markdown("", elem_id="txt2img_hr_final_resolution")
        with gr.Row():
            values["hr_checkpoint_name"] = gr.Dropdown(
                [SAME_CHECKPOINT, *checkpoint_choices()],
                value=SAME_CHECKPOINT,
                label="Hires checkpoint",
                elem_id="hr_checkpoint",
            )
            values["hr_sampler_name"] = gr.Dropdown(
                [SAME_SAMPLER, *SAMPLER_NAMES],
                value=SAME_SAMPLER,
                label="Hires sampling method",
                elem_id="hr_sampler",
            )
            values["hr_scheduler"] = gr.Dropdown(
                [SAME_SCHEDULER, *SCHEDULER_LABELS],
                value=SAME_SCHEDULER,
                label="Hires schedule type",
                elem_id="hr_scheduler",
            )
        with gr.Row():
            values["hr_prompt"] = gr.Textbox(
                "",  # a value: clients of the page's endpoint may leave it out
                label="Hires prompt",
                lines=2,
                placeholder="Prompt for hires fix pass.\nLeave empty to use the same prompt.",
                elem_id="hires_prompt",
            )
            values["hr_negative_prompt"] = gr.Textbox(
                "",  # a value: clients of the page's endpoint may leave it out
                label="Hires negative prompt",
                lines=2,
                placeholder="Negative prompt for hires fix pass.\n"
                "Leave empty to use the same negative prompt.",
                elem_id="hires_neg_prompt",
            )
    values["enable_hr"].change(
        lambda on: gr.Group(visible=bool(on)), values["enable_hr"], section, **QUICK
    )

    def refresh() -> tuple[gr.Dropdown, gr.Dropdown]:
        return (
            gr.Dropdown(choices=upscaler_choices(upscaler_names())),
            gr.Dropdown(choices=[SAME_CHECKPOINT, *checkpoint_choices()]),
        )

    page.load(refresh, None, [values["hr_upscaler"], values["hr_checkpoint_name"]], **QUICK)
    return values, final


def wire_final_resolution(
    final: gr.Markdown, values: dict[str, Any], width: gr.Slider, height: gr.Slider
) -> None:
    """Keep the "from WxH to WxH" line (A1111's `hr_final_resolution`) up to date."""
    inputs = [
        width,
        height,
        values["hr_scale"],
        values["hr_resize_x"],
        values["hr_resize_y"],
    ]
    for component in (*inputs, values["enable_hr"]):
        component.change(final_resolution_text, inputs, final, **QUICK)


def final_resolution_text(
    width: float, height: float, scale: float, resize_x: float, resize_y: float
) -> str:
    """What the second pass will make from a `width`×`height` first pass."""
    try:
        hires = HiresFix(scale=float(scale), resize_x=int(resize_x), resize_y=int(resize_y))
        first = int(width), int(height)
        if min(first) <= 0:
            return ""
        final_width, final_height = hires.final_size(*first)
    except (TypeError, ValueError):
        return ""
    return f"from **{first[0]}x{first[1]}** to **{final_width}x{final_height}**"


def hires_from_values(values: Mapping[str, Any]) -> HiresFix | None:
    """The request's HiresFix for the section's values (None when Hires. fix is off).
    "Use same ..." means the first pass's; raises InvalidRequestError naming the field."""
    if not values["enable_hr"]:
        return None
    sampler_name = values["hr_sampler_name"] or SAME_SAMPLER
    scheduler = values["hr_scheduler"] or SAME_SCHEDULER
    checkpoint = values["hr_checkpoint_name"] or SAME_CHECKPOINT
    hr_sampler = hr_scheduler = None  # None: the first pass's
    if sampler_name != SAME_SAMPLER or scheduler != SAME_SCHEDULER:
        try:
            choice = resolve_sampler(
                sampler_name if sampler_name != SAME_SAMPLER else values.get("sampler_name"),
                scheduler if scheduler != SAME_SCHEDULER else None,
            )
        except InvalidRequestError as error:
            error.field = "hr_sampler_name" if error.field == "sampler_name" else "hr_scheduler"
            raise
        hr_sampler = choice.sampler if sampler_name != SAME_SAMPLER else None
        hr_scheduler = choice.scheduler if scheduler != SAME_SCHEDULER else None
    upscaler = values["hr_upscaler"]
    if not upscaler:
        raise InvalidRequestError("Hires fix: choose an upscaler", field="hr_upscaler")
    return HiresFix(
        scale=float(values["hr_scale"]),
        resize_x=int(values["hr_resize_x"] or 0),
        resize_y=int(values["hr_resize_y"] or 0),
        upscaler=upscaler,
        second_pass_steps=int(values["hr_second_pass_steps"] or 0),
        sampler_name=hr_sampler,
        scheduler=hr_scheduler,
        prompt=values["hr_prompt"] or "",
        negative_prompt=values["hr_negative_prompt"] or "",
        checkpoint=None if checkpoint == SAME_CHECKPOINT else checkpoint,
    )


def recall_hires(
    params: Mapping[str, str], checkpoint_title: Callable[[str], str | None]
) -> tuple[dict[str, Any], list[str]]:
    """The section's values for an infotext's parameters, and warnings. As A1111's paste,
    Hires. fix is on only with `Denoising strength` and a `Hires ...` key; without them
    it is turned off so the pasted image replays. `checkpoint_title` finds a listed
    checkpoint's title by name (None when it is not here)."""
    try:
        hires = hires_from_params(params)
    except ValueError as error:
        return {"enable_hr": False}, [f"Hires fix: {error}; turned off"]
    if hires is None or "Denoising strength" not in params:
        return {"enable_hr": False}, []
    warnings = []
    checkpoint = SAME_CHECKPOINT
    if hires.checkpoint is not None:
        title = checkpoint_title(hires.checkpoint)
        if title is None:
            warnings.append(
                f"Hires checkpoint {hires.checkpoint} is not in the models folders; "
                "the second pass uses the same checkpoint"
            )
        else:
            checkpoint = title
    values = {
        **OFF,
        "enable_hr": True,
        "hr_upscaler": hires.upscaler,
        "hr_second_pass_steps": hires.second_pass_steps,
        "hr_scale": hires.scale,
        "hr_resize_x": hires.resize_x,
        "hr_resize_y": hires.resize_y,
        "hr_checkpoint_name": checkpoint,
        "hr_sampler_name": hires.sampler_name or SAME_SAMPLER,
        "hr_scheduler": scheduler_label(hires.scheduler) if hires.scheduler else SAME_SCHEDULER,
        "hr_prompt": hires.prompt,
        "hr_negative_prompt": hires.negative_prompt,
    }
    del values["denoising_strength"]  # recalled with the other numbers
    return values, warnings
