"""The img2img tab's image inputs, as in A1111: the img2img (with the "SD upscale" script),
Inpaint (paint the mask on the image), Inpaint upload (image + mask) and Outpaint sub-tabs,
the options that go with them, and "Send to img2img / inpaint". Only page values become
`ImageInputs` here; what they mean (resize, mask blur, fill, the outpainting canvas, the
tiles) is the engine's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
from PIL import Image, ImageOps

from frontends.page.errors import user_error
from frontends.page.lora_panel import QUICK, LoraPanel
from frontends.page.recall import read_image_info, recall
from frontends.page.stack import rows_from_value
from pipelines.errors import InvalidRequestError, LorastackError
from pipelines.imageops import MASKED_CONTENT, RESIZE_MODES
from pipelines.images import open_image
from pipelines.interface import GenerationService
from pipelines.outpainting import outpaint_size
from pipelines.schema import (
    OUTPAINT_DIRECTIONS,
    OUTPAINT_METHODS,
    Bounds,
    ImageInputs,
    Outpaint,
    SdUpscale,
)

SCRIPTS = ("None", "SD upscale")
"""The img2img sub-tab's Script choices (A1111's names)."""
MODES = ("img2img", "inpaint", "inpaint_upload", "outpaint")
"""The sub-tabs; each one's tab id is `<mode>_tab`."""
INPAINT_MODES = ("inpaint", "inpaint_upload")
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
INPAINT_AREAS = ("Whole picture", "Only masked")
MK2 = OUTPAINT_METHODS[1]


@dataclass
class ImagePanel:
    """The sub-tabs and their options; `values` names every input `image_request` reads."""

    mode: gr.Textbox  # hidden: the selected sub-tab's MODES name
    subtabs: gr.Tabs
    image: gr.Image  # img2img
    editor: gr.ImageEditor  # Inpaint: background = the image, layers = the painted mask
    values: dict[str, Any]  # name -> component, including the four above


def build_images(upscaler_names: list[str]) -> ImagePanel:
    """The four sub-tabs, each with its own image, as A1111 keeps one per tab; the img2img
    sub-tab has A1111's "SD upscale" script (`upscaler_names`: its upscaler choices)."""
    # Set in the browser as a sub-tab is clicked, so it is in order with the clicks that
    # follow (a server event per click could arrive after Generate).
    mode = gr.Textbox(MODES[0], visible=False, elem_id="img2img_mode")
    upload = {
        "type": "filepath",
        "image_mode": None,  # the file as uploaded; load_image reads it
        "sources": ["upload", "clipboard"],
        "height": 360,
    }
    values: dict[str, Any] = {"mode": mode}
    with gr.Tabs(elem_id="img2img_modes") as subtabs:
        with gr.Tab("img2img", id="img2img_tab", elem_id="img2img_tab") as img2img_tab:
            values["image"] = gr.Image(label="Image", elem_id="img2img_image", **upload)
            values.update(_sd_upscale_controls(upscaler_names))
        with gr.Tab("Inpaint", id="inpaint_tab", elem_id="inpaint_tab") as inpaint_tab:
            values["editor"] = gr.ImageEditor(
                type="filepath",
                image_mode="RGBA",
                format="png",  # lossless: unmasked pixels come back unchanged
                sources=["upload", "clipboard"],
                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                eraser=gr.Eraser(),
                layers=False,
                transforms=(),
                label="Image: paint what to repaint (white)",
                elem_id="inpaint_editor",
                height=480,
            )
        with (
            gr.Tab(
                "Inpaint upload", id="inpaint_upload_tab", elem_id="inpaint_upload_tab"
            ) as upload_tab,
            gr.Row(),
        ):
            values["upload_image"] = gr.Image(
                label="Image", elem_id="inpaint_upload_image", **upload
            )
            values["upload_mask"] = gr.Image(
                label="Mask (white = repaint)", elem_id="inpaint_upload_mask", **upload
            )
        with gr.Tab("Outpaint", id="outpaint_tab", elem_id="outpaint_tab") as outpaint_tab:
            values.update(_outpaint_controls(upload))
    for name, tab in zip(MODES, (img2img_tab, inpaint_tab, upload_tab, outpaint_tab), strict=True):
        tab.select(None, None, mode, js=f"() => '{name}'", **QUICK)
    return ImagePanel(mode, subtabs, values["image"], values["editor"], values)


def _sd_upscale_controls(upscaler_names: list[str]) -> dict[str, Any]:
    """A1111's img2img Script dropdown with its "SD upscale" script (`scripts/sd_upscale.py`:
    the same labels and defaults); the width and height sliders are the tile size."""
    values: dict[str, Any] = {}
    values["script"] = gr.Dropdown(
        list(SCRIPTS), value=SCRIPTS[0], label="Script", elem_id="img2img_script"
    )
    defaults = SdUpscale()
    with gr.Group(visible=False, elem_id="sd_upscale_options") as options:
        gr.Markdown(
            "Will upscale the image by the selected scale factor; use width and height "
            "sliders to set tile size"
        )
        with gr.Row():
            values["sd_upscale_overlap"] = gr.Slider(
                0,
                256,
                value=defaults.overlap,
                step=16,
                label="Tile overlap",
                elem_id="sd_upscale_overlap",
            )
            values["sd_upscale_scale"] = gr.Slider(
                1.0,
                4.0,
                value=defaults.scale,
                step=0.05,
                label="Scale Factor",
                elem_id="sd_upscale_scale",
            )
        values["sd_upscale_upscaler"] = gr.Radio(
            upscaler_names,
            value=upscaler_names[0],  # A1111's: the first, "None"
            label="Upscaler",
            elem_id="sd_upscale_upscaler",
        )
    values["script"].change(
        lambda chosen: gr.Group(visible=chosen == SCRIPTS[1]), values["script"], options, **QUICK
    )
    return values


def _outpaint_controls(upload: dict[str, Any]) -> dict[str, Any]:
    """A1111's two outpainting scripts; mk2's noise options show only for mk2, poor man's
    masked content only for poor man's."""
    values: dict[str, Any] = {}
    values["outpaint_image"] = gr.Image(label="Image", elem_id="outpaint_image", **upload)
    gr.Markdown(
        "The canvas grows by the pixels (rounded up to 64 per side) and only the new area "
        "is painted; the width and height sliders do not apply here."
    )
    defaults = Outpaint()
    with gr.Row():
        values["outpaint_pixels"] = gr.Slider(
            8,
            256,
            value=defaults.pixels,
            step=8,
            label="Pixels to expand",
            elem_id="outpaint_pixels",
        )
        values["outpaint_mask_blur"] = gr.Slider(
            0, 64, value=defaults.mask_blur, step=1, label="Mask blur", elem_id="outpaint_mask_blur"
        )
    values["outpaint_directions"] = gr.CheckboxGroup(
        list(OUTPAINT_DIRECTIONS),
        value=list(defaults.directions),
        label="Outpainting direction",
        elem_id="outpaint_directions",
    )
    method = gr.Radio(
        list(OUTPAINT_METHODS), value=defaults.method, label="Method", elem_id="outpaint_method"
    )
    with gr.Row(visible=defaults.method == MK2) as mk2_row:
        values["outpaint_noise_q"] = gr.Slider(
            0.0,
            4.0,
            value=defaults.noise_q,
            step=0.01,
            label="Fall-off exponent (lower = higher detail)",
            elem_id="outpaint_noise_q",
        )
        values["outpaint_color_variation"] = gr.Slider(
            0.0,
            1.0,
            value=defaults.color_variation,
            step=0.01,
            label="Color variation",
            elem_id="outpaint_color_variation",
        )
    values["outpaint_fill"] = gr.Radio(
        list(MASKED_CONTENT),
        value=MASKED_CONTENT[0],  # poor man's own default
        type="index",
        label="Masked content",
        elem_id="outpaint_fill",
        visible=defaults.method != MK2,
    )
    method.change(
        lambda chosen: (gr.Row(visible=chosen == MK2), gr.Radio(visible=chosen != MK2)),
        method,
        [mk2_row, values["outpaint_fill"]],
        **QUICK,
    )
    values["outpaint_method"] = method
    return values


def build_options(panel: ImagePanel) -> None:
    """Resize mode for every sub-tab; the mask options with A1111's page defaults, shown on
    the two inpainting sub-tabs only."""
    values = panel.values
    values["resize_mode"] = gr.Radio(
        list(RESIZE_MODES),
        value=RESIZE_MODES[0],
        type="index",
        label="Resize mode",
        elem_id="resize_mode",
    )
    with gr.Group(visible=False, elem_id="inpaint_options") as inpaint_options:
        with gr.Row():
            values["mask_blur"] = gr.Slider(
                0, 64, value=4, step=1, label="Mask blur", elem_id="mask_blur"
            )
            values["mask_mode"] = gr.Radio(
                list(MASK_MODES),
                value=MASK_MODES[0],
                type="index",
                label="Mask mode",
                elem_id="mask_mode",
            )
        values["inpainting_fill"] = gr.Radio(
            list(MASKED_CONTENT),
            value=MASKED_CONTENT[1],
            type="index",
            label="Masked content",
            elem_id="inpainting_fill",
        )
        with gr.Row():
            values["inpaint_area"] = gr.Radio(
                list(INPAINT_AREAS),
                value=INPAINT_AREAS[0],
                type="index",
                label="Inpaint area",
                elem_id="inpaint_area",
            )
            values["inpaint_padding"] = gr.Slider(
                0,
                256,
                value=32,
                step=4,
                label="Only masked padding, pixels",
                elem_id="inpaint_padding",
            )
    panel.mode.change(
        lambda mode: gr.Group(visible=mode in INPAINT_MODES), panel.mode, inpaint_options, **QUICK
    )


def fit_size(width: int, height: int, bounds: Bounds) -> tuple[int, int]:
    """An image's size as the width and height sliders take it: scaled down (aspect kept)
    when over the size or pixel limit, rounded down to a multiple of 8 as the engine
    rounds, at least the minimum size."""
    scale = min(
        1.0, bounds.max_size / max(width, height), math.sqrt(bounds.max_pixels / (width * height))
    )

    def fit(side: int) -> int:
        return max(int(side * scale + 1e-6) // 8 * 8, bounds.min_size)

    return fit(width), fit(height)


def load_image(path: str | None, field: str, missing: str) -> Image.Image:
    """An uploaded file as a loaded image, upright as the browser shows it; sized from its
    header first, like every image input. `missing` is the error for no file."""
    if not path:
        raise InvalidRequestError(missing, field=field)
    with open_image(path, field) as image:
        return ImageOps.exif_transpose(image)


def painted_mask(layers: list[Image.Image], size: tuple[int, int]) -> Image.Image | None:
    """The brush layers as one RGBA mask (the engine reads its alpha: painted = repaint);
    None when nothing was painted."""
    mask = Image.new("RGBA", size)
    for layer in layers:
        mask.alpha_composite(layer.convert("RGBA").resize(size))
    return mask if mask.getextrema()[3][1] > 0 else None


def image_request(values: dict[str, Any]) -> tuple[ImageInputs, tuple[int, int] | None]:
    """The request's `img2img` from the page values named in `ImagePanel.values`, and the
    size the request must have instead of the sliders' (outpainting: the canvas), if any.
    Raises InvalidRequestError saying what is missing."""
    mode = values["mode"]
    masking: dict[str, Any] = {}
    if mode in INPAINT_MODES:
        blur = int(values["mask_blur"])
        masking = {
            "mask_blur_x": blur,
            "mask_blur_y": blur,
            "inpainting_fill": values["inpainting_fill"],
            "inpaint_full_res": bool(values["inpaint_area"]),
            "inpaint_full_res_padding": int(values["inpaint_padding"]),
            "inpainting_mask_invert": bool(values["mask_mode"]),
        }
    resize_mode = values["resize_mode"]
    if mode == "inpaint":
        editor = values["editor"] or {}
        image = load_image(
            editor.get("background"), "init_images", "Inpaint: upload an image first"
        )
        layers = [
            load_image(path, "mask", "Inpaint: the painted layer is missing")
            for path in editor.get("layers") or []
        ]
        mask = painted_mask(layers, image.size)
        if mask is None:
            raise InvalidRequestError(
                "Inpaint: paint over the part of the image to repaint (the white brush)",
                field="mask",
            )
        return ImageInputs((image,), mask=mask, resize_mode=resize_mode, **masking), None
    if mode == "inpaint_upload":
        image = load_image(
            values["upload_image"], "init_images", "Inpaint upload: upload an image first"
        )
        mask = load_image(
            values["upload_mask"], "mask", "Inpaint upload: upload a mask (white = repaint)"
        )
        return ImageInputs((image,), mask=mask, resize_mode=resize_mode, **masking), None
    if mode == "outpaint":
        image = load_image(
            values["outpaint_image"], "init_images", "Outpaint: upload an image first"
        )
        spec = Outpaint(
            pixels=int(values["outpaint_pixels"]),
            directions=tuple(d for d in OUTPAINT_DIRECTIONS if d in values["outpaint_directions"]),
            method=values["outpaint_method"],
            mask_blur=int(values["outpaint_mask_blur"]),
            noise_q=float(values["outpaint_noise_q"]),
            color_variation=float(values["outpaint_color_variation"]),
        )
        inputs = ImageInputs((image,), inpainting_fill=values["outpaint_fill"], outpaint=spec)
        return inputs, outpaint_size(*image.size, spec)
    image = load_image(values["image"], "init_images", "img2img: upload an image first")
    sd_upscale = None
    if values["script"] == SCRIPTS[1]:
        sd_upscale = SdUpscale(
            scale=float(values["sd_upscale_scale"]),
            upscaler=values["sd_upscale_upscaler"] or "None",
            overlap=int(values["sd_upscale_overlap"]),
        )
    return ImageInputs((image,), resize_mode=resize_mode, sd_upscale=sd_upscale), None


@dataclass
class SendTargets:
    """What "Send to img2img" and "Send to inpaint" fill: the img2img tab's image and
    fields, and, as PNG Info's "Send to txt2img" does, the checkpoint and the LoRA stack."""

    service: GenerationService
    bounds: Bounds
    tabs: gr.Tabs
    images: ImagePanel
    controls: dict[str, Any]  # the img2img tab's schema.FIELDS components
    checkpoint: gr.Dropdown
    stack: LoraPanel
    notes: gr.Markdown
    summary: gr.Markdown  # the tab's line about the stack
    styles: gr.Dropdown | None = None  # the img2img tab's styles: those the prompts carry

    def wire(
        self, button: gr.Button, mode: str, sources: list[Any], path_of: Callable[..., str | None]
    ) -> None:
        """`button` sends the image `path_of(*sources values)` to the `mode` sub-tab."""
        names = list(self.controls)
        target = self.images.image if mode == "img2img" else self.images.editor

        def send(*given: Any) -> list[Any]:
            *values, version = given
            path = path_of(*values)
            if not path:
                raise user_error("No image to send: generate or drop one first")
            fields, rows, model, warnings = self.recalled(path)
            styles = fields.pop("styles", None)
            chosen = [] if self.styles is None else [gr.skip() if styles is None else styles]
            return [
                *(fields.get(name, gr.skip()) for name in names),
                path,
                mode,
                gr.Tabs(selected=f"{mode}_tab"),
                gr.Tabs(selected="img2img"),
                model or gr.skip(),
                gr.skip() if rows is None else rows,
                gr.skip() if rows is None else version + 1,
                "\n".join(f"⚠ {w}" for w in warnings),
                gr.skip() if rows is None else stack_text(rows),
                *chosen,
            ]

        button.click(
            send,
            [*sources, self.stack.rows_version],
            [
                *self.controls.values(),
                target,
                self.images.mode,
                self.images.subtabs,
                self.tabs,
                self.checkpoint,
                self.stack.stack,
                self.stack.rows_version,
                self.notes,
                self.summary,
                *([] if self.styles is None else [self.styles]),
            ],
            **QUICK,
        )

    def recalled(self, path: str) -> tuple[dict[str, Any], list | None, str | None, list[str]]:
        """Fields, stack rows, checkpoint and warnings from the image's parameters; an
        image without them sends only itself (and its size). A1111's `send_seed` and
        `send_size` off leave the tab's seed and size as they are."""
        try:
            info = read_image_info(path)
            with open_image(path) as image:
                size = fit_size(*image.size, self.bounds)
        except LorastackError as error:
            raise user_error(error.message) from error
        fields: dict[str, Any] = {"width": size[0], "height": size[1]}
        rows, model, warnings = None, None, []
        if info.infotext:
            found = recall(info.infotext, self.service)
            fields = {**found.values, **fields, "styles": found.styles}
            rows, model, warnings = [], found.checkpoint, found.warnings  # LoRAs: its tags
        paste = self.service.paste_options  # A1111's send_seed / send_size
        dropped = [] if paste.send_seed else ["seed", "subseed", "subseed_strength"]
        dropped += [] if paste.send_size else ["width", "height"]
        for name in dropped:
            fields.pop(name, None)
        return fields, rows, model, warnings


def stack_text(value: Any) -> str:
    """The img2img tab's line about the session's LoRA stack (edited in txt2img), which
    applies there too; refreshed when the tab is opened or an image is sent to it."""
    try:
        rows = rows_from_value(value)
    except LorastackError:
        rows = []
    names = ", ".join(f"{row['name']} {row['weight']:g}" for row in rows) or "empty"
    return (
        f"**LoRA stack** (edited in the txt2img tab; applies here too): {names}. "
        "`<lora:name:w>` tags in the prompt work as well."
    )
