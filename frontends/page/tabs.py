"""The PNG Info and Settings tabs."""

from __future__ import annotations

import hmac
import html
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import gradio as gr

from frontends.page.defaults import (
    DEFAULT_FIELDS,
    check_default,
    load_defaults,
    save_defaults,
    scheduler_label,
)
from frontends.page.errors import user_error
from frontends.page.lora_panel import QUICK, LoraPanel
from frontends.page.recall import Recall, read_image_info, recall
from frontends.page.stack import rows_from_value
from pipelines.errors import LorastackError
from pipelines.infotext import parse_infotext
from pipelines.interface import GenerationService
from pipelines.preview import PREVIEW_METHODS
from pipelines.samplers import SAMPLER_NAMES, SCHEDULER_LABELS
from pipelines.schema import field_spec
from pipelines.settings import Settings, admin_credentials


@dataclass
class PngInfo:
    """The dropped image and the buttons that send it to the img2img and Extras tabs
    (wired there)."""

    image: gr.Image
    send_img2img: gr.Button
    send_inpaint: gr.Button
    send_extras: gr.Button


def build_pnginfo(
    service: GenerationService,
    controls: dict[str, gr.components.Component],
    checkpoint: gr.Dropdown,
    panel: LoraPanel,
    tabs: gr.Tabs,
    notes: gr.Markdown,
    styles: gr.Dropdown | None = None,
    vae: gr.Dropdown | None = None,
) -> PngInfo:
    """Drop an image, see its parameters, send them (fields, checkpoint, stack, and into
    `styles` the styles found in the prompts) to txt2img, or the image with them to img2img."""
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                type="filepath",
                image_mode=None,  # keep the uploaded file as is: its metadata is the point
                sources=["upload", "clipboard"],
                label="Image (PNG, JPEG, WebP)",
                elem_id="pnginfo_image",
            )
        with gr.Column():
            text = gr.Textbox(
                label="Parameters", lines=6, interactive=False, elem_id="pnginfo_text"
            )
            parsed = gr.JSON(label="Parsed", visible=False)
            other = gr.JSON(label="Other metadata (shown raw)", visible=False)
            warnings = gr.Markdown(elem_id="pnginfo_warnings")
            send = gr.Button("Send to txt2img", variant="primary", elem_id="send_to_txt2img")
            with gr.Row():
                send_img2img = gr.Button("Send to img2img", elem_id="pnginfo_send_to_img2img")
                send_inpaint = gr.Button("Send to inpaint", elem_id="pnginfo_send_to_inpaint")
                send_extras = gr.Button("Send to extras", elem_id="pnginfo_send_to_extras")

    def inspect(path: str | None) -> tuple[str, Any, Any, str]:
        if not path:
            return "", gr.JSON(visible=False), gr.JSON(visible=False), ""
        try:
            info = read_image_info(path)
        except LorastackError as error:
            raise user_error(error.message) from error
        raw = gr.JSON(value=info.other, visible=bool(info.other))
        if not info.infotext:
            note = "No A1111 parameters in this image." + (
                " Other metadata is shown raw below." if info.other else ""
            )
            return "", gr.JSON(visible=False), raw, note
        table = gr.JSON(value=parse_infotext(info.infotext).a1111_parameters(), visible=True)
        found = recall(info.infotext, service)
        return info.infotext, table, raw, "\n".join(f"⚠ {w}" for w in found.warnings)

    image.change(inspect, image, [text, parsed, other, warnings], **QUICK)

    targets = Txt2ImgTargets(controls, checkpoint, panel, tabs, notes, styles, vae)
    wire_send_to_txt2img(service, send, text, targets)
    return PngInfo(image, send_img2img, send_inpaint, send_extras)


@dataclass(frozen=True)
class Txt2ImgTargets:
    """What "Send to txt2img" fills: the tab's fields, checkpoint, LoRA stack, styles and
    SD VAE, then the tab is shown with the warnings in its notes."""

    controls: dict[str, gr.components.Component]
    checkpoint: gr.Dropdown
    panel: LoraPanel
    tabs: gr.Tabs
    notes: gr.Markdown
    styles: gr.Dropdown | None = None
    vae: gr.Dropdown | None = None


def txt2img_unused(found: Recall) -> list[str]:
    """The recalled parameters txt2img does not apply: keys the page has no use for, and
    `Denoising strength` without Hires. fix (an img2img value; dropped from the values)."""
    unused = list(found.not_applied)
    if not found.values.get("enable_hr") and "denoising_strength" in found.values:
        del found.values["denoising_strength"]
        unused.insert(0, "Denoising strength (txt2img uses it only with Hires. fix)")
    return unused


def wire_send_to_txt2img(
    service: GenerationService, button: gr.Button, infotext: Any, targets: Txt2ImgTargets
) -> None:
    """`button` recalls the infotext in `infotext` (a component's value) into txt2img."""
    names = list(targets.controls)
    panel = targets.panel

    def send_to_txt2img(text: str, rows: Any, version: int) -> list[Any]:
        if not text:
            raise user_error("No parameters to send: choose an image with A1111 parameters first")
        found = recall(text, service)
        said = list(found.warnings)
        unused = txt2img_unused(found)
        if unused:
            said.append(f"not applied here: {', '.join(unused)}")
        if rows_from_value(rows):  # the image's LoRAs are its prompt's tags
            said.append("the LoRA stack was emptied: the image's LoRAs are its prompt tags")
        fields = [found.values.get(name, gr.skip()) for name in names]
        return [
            *fields,
            found.checkpoint or gr.skip(),
            [],
            version + 1,
            gr.Tabs(selected="txt2img"),
            "\n\n".join(f"⚠ {html.escape(note)}" for note in said),
        ]

    outputs = [
        *targets.controls.values(),
        targets.checkpoint,
        panel.stack,
        panel.rows_version,
        targets.tabs,
        targets.notes,
    ]
    sources = [infotext, panel.stack, panel.rows_version]
    button.click(send_to_txt2img, sources, outputs, **QUICK)
    if targets.styles is not None:
        button.click(lambda text: recall(text, service).styles, infotext, targets.styles, **QUICK)
    if targets.vae is not None:
        button.click(
            lambda text: recall(text, service).vae or gr.skip(), infotext, targets.vae, **QUICK
        )


def build_preview_setting(
    service: GenerationService,
    admin_check: Callable[[str, str], str | None] | None,
    admin_user: gr.Textbox,
    admin_password: gr.Textbox,
) -> None:
    """A1111's "Live preview display" choice: Approx cheap, TAESD (a decoder from
    `models/VAE-approx/`), or Full (the model's VAE)."""
    with gr.Row():
        method = gr.Radio(
            list(PREVIEW_METHODS),
            value=service.preview_method,
            label="Live preview method (TAESD needs taesd_decoder.pth or "
            "taesdxl_decoder.pth in models/VAE-approx/)",
            elem_id="preview_method",
        )
        apply = gr.Button("Apply", scale=0, elem_id="apply_preview_method")

    def choose(chosen: str, user: str, password: str) -> None:
        refusal = admin_check(user or "", password or "") if admin_check else None
        if refusal is not None:
            raise user_error(f"Live preview method not changed: {refusal}")
        try:
            service.set_preview_method(chosen)
        except LorastackError as error:
            raise user_error(error.message) from error
        gr.Info(f"Live previews: {chosen}")

    apply.click(choose, [method, admin_user, admin_password], None, **QUICK)


def build_saving_setting(
    service: GenerationService,
    admin_check: Callable[[str, str], str | None] | None,
    admin_user: gr.Textbox,
    admin_password: gr.Textbox,
) -> None:
    """A1111's "Saving images" options: the file format (parameters kept inside) and the
    file-name pattern after the `NNNNN-` number."""
    saving = service.save_options
    with gr.Row():
        fmt = gr.Dropdown(
            ["png", "jpg", "webp"],
            value=saving.samples_format,
            label="File format for images",
            elem_id="samples_format",
        )
        pattern = gr.Textbox(
            saving.filename_pattern,
            label="Images filename pattern (after NNNNN-; empty: [seed])",
            placeholder="[seed]-[prompt_words]",
            elem_id="samples_filename_pattern",
        )
        quality = gr.Number(
            saving.jpeg_quality,
            label="Quality for jpg and webp",
            minimum=1,
            maximum=100,
            precision=0,
            elem_id="jpeg_quality",
        )
        apply = gr.Button("Apply", scale=0, elem_id="apply_saving")

    def choose(chosen: str, name: str, level: float, user: str, password: str) -> None:
        refusal = admin_check(user or "", password or "") if admin_check else None
        if refusal is not None:
            raise user_error(f"Saving options not changed: {refusal}")
        wanted = replace(
            service.save_options,
            samples_format=chosen,
            filename_pattern=name or "",
            jpeg_quality=int(level or 80),
        )
        try:
            service.set_save_options(wanted)
        except LorastackError as error:
            raise user_error(error.message) from error
        gr.Info(f"Images are saved as {chosen}")

    apply.click(choose, [fmt, pattern, quality, admin_user, admin_password], None, **QUICK)


def admin_refusal(settings: Settings, user: str, password: str) -> str | None:
    """Why an admin action is refused, or None when `user`/`password` are the admin's.

    A credential, never an address: behind a proxy every client can look like loopback.
    Without `--admin-auth` nobody is the admin."""
    expected = admin_credentials(settings)
    if expected is None:
        return "admin actions are off: start the server with --admin-auth USER:PASS"
    same_user = hmac.compare_digest(user.encode(), expected[0].encode())
    same_password = hmac.compare_digest(password.encode(), expected[1].encode())
    return None if same_user and same_password else "wrong admin user or password"


DEFAULTS_MARK = "defaultsLoaded"
"""Set on the page's <html> dataset once the fields hold the server's defaults (the
browser tests wait for it before typing, as a page load may overwrite earlier input)."""


def build_settings(
    service: GenerationService,
    settings: Settings,
    page: gr.Blocks,
    tabs_controls: list[dict[str, Any]],
    admin_check: Callable[[str, str], str | None] | None = None,
) -> None:
    """Server-wide defaults (settings.json, admin only) and the device facts, read-only;
    new pages start every tab's fields (`tabs_controls`) with the defaults. The live
    preview method is server-wide too (an admin action on a shared server)."""
    device = service.device()
    bounds = service.bounds()
    folder = "(hidden)" if settings.hide_paths else f"`{settings.outputs_dir}`"
    gr.Markdown(
        f"**Device:** {device.describe()}  \n"
        f"**Outputs:** {folder} — the page saves every image with its parameters.  \n"
        "Memory mode and the attention backend are launch flags (`--medvram`, "
        "`--lowvram`, `--xformers`); they are shown here read-only."
    )
    gr.Textbox(device.attention, label="Attention backend", interactive=False, elem_id="attention")
    gr.Markdown(
        "### Defaults for new pages\nKept in `settings.json` in the data folder; saving them "
        "asks for the admin credential (`--admin-auth USER:PASS`)."
    )
    edits: dict[str, Any] = {}
    with gr.Row():
        for name in DEFAULT_FIELDS:
            spec = field_spec(name, bounds)
            if name == "sampler_name":
                edits[name] = gr.Dropdown(list(SAMPLER_NAMES), label=spec.label)
            elif name == "scheduler":
                edits[name] = gr.Dropdown(list(SCHEDULER_LABELS), label=spec.label)
            elif spec.kind is str:
                edits[name] = gr.Textbox(label=spec.label)
            else:
                # no minimum/maximum here: Gradio's own refusal ("Value 0 is less than
                # minimum value 1") names no field; save_defaults' does
                edits[name] = gr.Number(
                    label=spec.label,
                    info=None
                    if spec.minimum is None or spec.maximum is None
                    else f"{spec.minimum:g}–{spec.maximum:g}",
                    precision=0 if spec.kind is int else None,
                    elem_id=f"default_{name}",
                )
    with gr.Row():
        admin_user = gr.Textbox(label="Admin user", elem_id="admin_user")
        admin_password = gr.Textbox(
            label="Admin password", type="password", elem_id="admin_password"
        )
    save = gr.Button("Save defaults", elem_id="save_defaults")
    names = list(DEFAULT_FIELDS)

    def current() -> list[Any]:
        values = load_defaults(settings.data_dir, bounds)
        values["scheduler"] = scheduler_label(values["scheduler"])
        return [values[name] for name in names]

    def store(user: str, password: str, *values: Any) -> None:
        given = dict(zip(names, values, strict=True))
        try:  # a bad value is named first, whoever asks
            for name in names:
                check_default(name, given[name], bounds)
        except ValueError as error:
            raise user_error(f"Defaults not saved: {error}") from error
        refusal = admin_refusal(settings, user or "", password or "")
        if refusal is not None:
            raise user_error(f"Defaults not saved: {refusal}")
        save_defaults(settings.data_dir, given, bounds)
        gr.Info("Saved: new pages start with these defaults")

    save.click(store, [admin_user, admin_password, *(edits[name] for name in names)], None, **QUICK)
    build_preview_setting(service, admin_check, admin_user, admin_password)
    build_saving_setting(service, admin_check, admin_user, admin_password)
    targets = [edits, *tabs_controls]  # one event, so one mark says all are set

    def current_everywhere() -> list[Any]:
        return current() * len(targets)

    page.load(current_everywhere, None, [t[name] for t in targets for name in names], **QUICK).then(
        None, js=f"() => {{ document.documentElement.dataset.{DEFAULTS_MARK} = '1'; }}"
    )
