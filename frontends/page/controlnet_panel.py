"""The ControlNet section of the txt2img and img2img tabs: one unit, with sd-webui-controlnet's
controls and names (Enable, Pixel Perfect, Preprocessor, Model, Control Weight, Starting and
Ending Control Step, Control Mode, Resize Mode) and a preview of the detected map.

Its values become the request's `controlnet` (one `ControlNetUnit` when enabled). Models
that cannot be used and preprocessors whose weights are missing or cannot run are listed
under the controls with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image

from frontends.page.lora_panel import QUICK
from pipelines.errors import LorastackError
from pipelines.images import open_image
from pipelines.interface import GenerationService
from pipelines.recall import controlnet_units, unit_fields, unit_model_title
from pipelines.schema import CONTROL_MODES, CONTROL_RESIZE_MODES, ControlNetUnit

NO_MODEL = "None"
CONTROLNET_FIELDS = (
    "controlnet_enabled",
    "controlnet_image",
    "controlnet_module",
    "controlnet_model",
    "controlnet_weight",
    "controlnet_processor_res",
    "controlnet_threshold_a",
    "controlnet_threshold_b",
    "controlnet_guidance_start",
    "controlnet_guidance_end",
    "controlnet_control_mode",
    "controlnet_resize_mode",
    "controlnet_pixel_perfect",
)
"""The section's values, in the order the txt2img handler takes them."""


@dataclass
class ControlNetPanel:
    values: dict[str, Any]  # by CONTROLNET_FIELDS name
    preview: gr.Image
    run_preview: gr.Button
    refresh: gr.Button
    notes: gr.Markdown

    @property
    def inputs(self) -> list[Any]:
        return [self.values[name] for name in CONTROLNET_FIELDS]


def model_choices(service: GenerationService) -> list[str]:
    return [NO_MODEL, *(e.title for e in service.controlnet_models() if not e.error)]


def unavailable_text(service: GenerationService) -> str:
    """The models and preprocessors that are listed but cannot be used, and why."""
    lines = [f"- `{e.title}`: {e.error}" for e in service.controlnet_models() if e.error]
    lines += [
        f"- preprocessor `{name}`: {reason}"
        for name, reason in service.controlnet_unavailable_modules()
    ]
    return "**Not usable here**\n\n" + "\n".join(lines) if lines else ""


def build_controlnet(service: GenerationService, prefix: str = "") -> ControlNetPanel:
    """The section's components in a closed accordion (`prefix` tells the tabs apart)."""
    modules = service.controlnet_modules()
    first = modules[0]
    with gr.Accordion("ControlNet", open=False, elem_id=f"{prefix}controlnet"):
        with gr.Row():
            image = gr.Image(
                type="filepath",
                image_mode=None,
                sources=["upload", "clipboard"],
                label="Control image (img2img: empty uses the init image)",
                elem_id=f"{prefix}controlnet_image",
                height=260,
            )
            preview = gr.Image(
                type="pil",
                label="Detected map",
                interactive=False,
                elem_id=f"{prefix}controlnet_preview",
                height=260,
            )
        with gr.Row():
            enabled = gr.Checkbox(False, label="Enable", elem_id=f"{prefix}controlnet_enabled")
            pixel_perfect = gr.Checkbox(
                False, label="Pixel Perfect", elem_id=f"{prefix}controlnet_pixel_perfect"
            )
        with gr.Row():
            module = gr.Dropdown(
                [(p.label, p.name) for p in modules],
                value=first.name,
                label="Preprocessor",
                elem_id=f"{prefix}controlnet_module",
                scale=2,
            )
            model = gr.Dropdown(
                model_choices(service),
                value=NO_MODEL,
                label="Model",
                elem_id=f"{prefix}controlnet_model",
                scale=3,
            )
            run_preview = gr.Button(
                "Preview", scale=0, min_width=90, elem_id=f"{prefix}controlnet_run_preview"
            )
            refresh = gr.Button(
                "Refresh", scale=0, min_width=80, elem_id=f"{prefix}controlnet_refresh"
            )
        weight = gr.Slider(
            0.0, 2.0, 1.0, step=0.05, label="Control Weight", elem_id=f"{prefix}controlnet_weight"
        )
        with gr.Row():
            resolution, slider_a, slider_b = (
                gr.Slider(**_slider_args(s), elem_id=f"{prefix}controlnet_{name}")
                for s, name in (
                    (first.resolution, "processor_res"),
                    (first.slider_1, "threshold_a"),
                    (first.slider_2, "threshold_b"),
                )
            )
        with gr.Row():
            start = gr.Slider(
                0.0,
                1.0,
                0.0,
                step=0.01,
                label="Starting Control Step",
                elem_id=f"{prefix}controlnet_guidance_start",
            )
            end = gr.Slider(
                0.0,
                1.0,
                1.0,
                step=0.01,
                label="Ending Control Step",
                elem_id=f"{prefix}controlnet_guidance_end",
            )
        control_mode = gr.Radio(
            list(CONTROL_MODES),
            value=CONTROL_MODES[0],
            label="Control Mode",
            elem_id=f"{prefix}controlnet_control_mode",
        )
        resize_mode = gr.Radio(
            list(CONTROL_RESIZE_MODES),
            value="Crop and Resize",
            label="Resize Mode",
            elem_id=f"{prefix}controlnet_resize_mode",
        )
        notes = gr.Markdown(unavailable_text(service), elem_id=f"{prefix}controlnet_notes")
    values = {
        "controlnet_enabled": enabled,
        "controlnet_image": image,
        "controlnet_module": module,
        "controlnet_model": model,
        "controlnet_weight": weight,
        "controlnet_processor_res": resolution,
        "controlnet_threshold_a": slider_a,
        "controlnet_threshold_b": slider_b,
        "controlnet_guidance_start": start,
        "controlnet_guidance_end": end,
        "controlnet_control_mode": control_mode,
        "controlnet_resize_mode": resize_mode,
        "controlnet_pixel_perfect": pixel_perfect,
    }
    panel = ControlNetPanel(values, preview, run_preview, refresh, notes)
    _wire(service, panel)
    return panel


def recall_controlnet(
    params: Mapping[str, str], service: GenerationService
) -> tuple[dict[str, Any], list[str]]:
    """The section's values for an infotext's `ControlNet 0: "..."` (sd-webui-controlnet's
    serialized unit), and warnings for what is not restored: the control image (never in
    an infotext), units past the first (the page has one), a module or model not here, and
    fields the page's unit does not have. Without a unit the section is turned off, so the
    pasted image replays; a unit whose model is not here is left off."""
    units = controlnet_units(params)
    if not units:
        return {"controlnet_enabled": False}, []
    key = units[0][1]
    warnings = [
        f"{other}: not restored, the page has one ControlNet unit ({params[other]})"
        for _, other in units[1:]
    ]
    fields, left, unit_warnings = unit_fields(key, params[key])
    module, model = fields.pop("module"), fields.pop("model")
    values: dict[str, Any] = {f"controlnet_{name}": value for name, value in fields.items()}
    if module in {p.name for p in service.controlnet_modules()}:
        values["controlnet_module"] = module
    else:
        warnings.append(f"{key}: preprocessor {module} is not available here; not restored")
    title = unit_model_title(model, service.controlnet_models())
    if title is None:
        warnings.append(
            f"{key}: model {model} is not a usable model in models/ControlNet; the unit is left off"
        )
    else:
        values["controlnet_model"] = title
        if title != model:
            warnings.append(f"{key}: model {model} recalled as {title} (another hash)")
    warnings.extend(unit_warnings)
    if left:
        pairs = ", ".join(f"{name}: {value}" for name, value in left.items())
        warnings.append(f"{key}: not restored (the page's unit has no such field): {pairs}")
    warnings.append(
        f"{key}: the control image is not in the infotext; choose it again in the ControlNet "
        "section"
    )
    values["controlnet_enabled"] = title is not None
    return values, warnings


def _slider_args(slider: Any) -> dict[str, Any]:
    return {
        "minimum": slider.minimum,
        "maximum": slider.maximum,
        "value": slider.value,
        "step": slider.step,
        "label": slider.label,
        "visible": slider.visible,
    }


def _wire(service: GenerationService, panel: ControlNetPanel) -> None:
    values = panel.values
    by_name = {p.name: p for p in service.controlnet_modules()}
    sliders = [values[f"controlnet_{n}"] for n in ("processor_res", "threshold_a", "threshold_b")]

    def module_sliders(name: str) -> tuple[Any, ...]:
        module = by_name.get(name)
        if module is None:
            return gr.skip(), gr.skip(), gr.skip()
        shown = (module.resolution, module.slider_1, module.slider_2)
        return tuple(gr.Slider(**_slider_args(s)) for s in shown)

    chooser = values["controlnet_module"]
    chooser.change(module_sliders, chooser, sliders, **QUICK)

    def preview(path: str | None, module: str, res: float, a: float, b: float) -> Any:
        if not path:
            raise gr.Error("ControlNet: upload a control image first")
        try:
            image = load_image(path)
            maps = service.detect_controlnet(module, [image], int(res), float(a), float(b))
        except LorastackError as error:
            raise gr.Error(error.message) from error
        return maps[0]

    inputs = [values["controlnet_image"], values["controlnet_module"], *sliders]
    panel.run_preview.click(preview, inputs, panel.preview, **QUICK)

    def refresh() -> tuple[Any, str]:
        service.rescan()
        return gr.Dropdown(choices=model_choices(service)), unavailable_text(service)

    panel.refresh.click(refresh, None, [values["controlnet_model"], panel.notes], **QUICK)


def load_image(path: str) -> Image.Image:
    with open_image(path, field="controlnet image") as image:
        image.load()
        return image.convert("RGB")


def units_from_values(given: Mapping[str, Any]) -> tuple[ControlNetUnit, ...]:
    """The request's `controlnet` for the section's values (none when not enabled)."""
    if not given.get("controlnet_enabled"):
        return ()
    path = given.get("controlnet_image")
    image = load_image(path) if path else None

    def number(name: str, default: float) -> float:
        value = given.get(name)
        return default if value is None else float(value)

    return (
        ControlNetUnit(
            image=image,
            module=given.get("controlnet_module") or "none",
            model=given.get("controlnet_model") or NO_MODEL,
            weight=number("controlnet_weight", 1.0),
            processor_res=int(number("controlnet_processor_res", -1)),
            threshold_a=number("controlnet_threshold_a", -1),
            threshold_b=number("controlnet_threshold_b", -1),
            guidance_start=number("controlnet_guidance_start", 0.0),
            guidance_end=number("controlnet_guidance_end", 1.0),
            control_mode=given.get("controlnet_control_mode") or CONTROL_MODES[0],
            resize_mode=given.get("controlnet_resize_mode") or "Crop and Resize",
            pixel_perfect=bool(given.get("controlnet_pixel_perfect")),
        ),
    )
