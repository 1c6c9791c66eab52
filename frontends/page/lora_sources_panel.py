"""The page's side of LoRA sources: "Add from the Hub or Civitai" and "Fetch info" (in the
Add files tab), and the cards' "Make preview" (A1111's "replace preview": the image chosen
in the txt2img gallery, with its parameters, becomes the card's `NAME.png`).

The work happens in `deployments.lora_sources` / `deployments.loracards`; this module turns
results and refusals into one Markdown line each. The token and key boxes are password
fields whose values go to that one call only: they are not kept in the session, and a
refusal never echoes them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from deployments.lora_sources import CardResult, Credentials, LoraSources
from deployments.loracards import replace_preview
from frontends.page.lora_panel import QUICK, library_signature
from pipelines.errors import LorastackError
from pipelines.images import open_image
from pipelines.interface import GenerationService


def result_line(result: CardResult) -> str:
    """One success line: the LoRA, what its card says, the files written."""
    card = result.card
    verb = "Added" if result.placed else "Fetched info for"
    line = f"{verb} **{result.name}**"
    if card is not None:
        words = ", ".join(card.trigger_words) or "none"
        line += f" from {card.source} ({card.page_url}): trigger words {words}"
        if card.base_model:
            line += f"; base model {card.base_model}"
    written = ", ".join(f"`{name}`" for name in result.sidecars) or "no new sidecar"
    line += f"; wrote {written}"
    return line + "".join(f"\n   - {note}" for note in result.notes)


def add_lora(
    service: GenerationService,
    sources: LoraSources,
    text: str,
    credentials: Credentials,
    overwrite: bool,
) -> tuple[str, str | None]:
    """ "Add LoRA": the line to show, and the new listing signature (None when refused)."""
    try:
        result = sources.add(text, credentials, overwrite=overwrite)
    except (LorastackError, OSError) as error:
        return f"Refused: {_reason(error)}", None
    return result_line(result), library_signature(service)


def fetch_info(
    service: GenerationService, sources: LoraSources, name: str, credentials: Credentials
) -> tuple[str, str | None]:
    """ "Fetch info": the line to show, and the new listing signature (None when refused)."""
    try:
        result = sources.fetch_info((name or "").strip(), credentials)
    except (LorastackError, OSError) as error:
        return f"Refused: {_reason(error)}", None
    return result_line(result), library_signature(service)


def chosen_image(gallery: list | None, index: int | None) -> str | None:
    """The gallery image the user clicked (the first when none was), as a file path."""
    if not gallery:
        return None
    item = gallery[min(index or 0, len(gallery) - 1)]
    if isinstance(item, dict):  # {"image": {"path": ...}, "caption": ...}
        image = item.get("image") or {}
        return image.get("path") if isinstance(image, dict) else image
    return item[0] if isinstance(item, list | tuple) else item


def make_preview(service: GenerationService, name: str, gallery: list | None, index: int) -> str:
    """Write the chosen gallery image as `name`'s preview; returns the line to show."""
    path = chosen_image(gallery, index)
    if path is None:
        raise LorastackError("Make preview: generate an image first", field="gallery")
    entry = service.resolve_lora(name)
    with open_image(Path(path).read_bytes(), field="gallery") as image:
        image.load()
        infotext = image.info.get("parameters")
        target = replace_preview(entry.path, image.convert("RGB"), infotext)
    service.rescan()
    return f"Preview of **{entry.name}** is now `{target.name}`"


def preview_refusal(
    admin_check: Callable[[str, str], str | None] | None, user: str, password: str
) -> str | None:
    """Why "Make preview" is refused (a shared server, not the admin), or None."""
    reason = admin_check(user or "", password or "") if admin_check else None
    if reason is None:
        return None
    return (
        "Make preview writes into the LoRA folder, an admin action on this server: type the "
        f"admin user and password in the Add files tab's LoRA section first ({reason})"
    )


@dataclass
class PreviewMaker:
    """What a card's "Make preview" button needs: the txt2img gallery and its selection,
    and on a shared server the admin check with the Add files tab's admin boxes (set once
    that tab is built; the cards are rendered after the whole page exists)."""

    service: GenerationService
    gallery: gr.Gallery
    selected: gr.State
    library_version: gr.State
    admin_check: Callable[[str, str], str | None] | None = None
    admin_fields: tuple[gr.Textbox, gr.Textbox] | None = None

    def wire(self, button: gr.Button, name: str) -> None:
        """The card's button: write the preview, then re-render the cards."""

        def run(gallery: list | None, index: int, user: str = "", password: str = "") -> str:
            refusal = preview_refusal(self.admin_check, user, password)
            if refusal is not None:
                raise gr.Error(refusal)
            try:
                message = make_preview(self.service, name, gallery, index)
            except (LorastackError, OSError) as error:
                raise gr.Error(_reason(error)) from None
            gr.Info(message)
            return library_signature(self.service)

        inputs = [self.gallery, self.selected, *(self.admin_fields or ())]
        button.click(run, inputs, self.library_version, **QUICK)


def build_lora_sources_panel(
    service: GenerationService,
    sources: LoraSources,
    library_version: gr.State,
    *,
    admin_check: Callable[[str, str], str | None] | None = None,
) -> tuple[gr.Textbox, gr.Textbox]:
    """The "Add from the Hub or Civitai" and "Fetch info" section (inside the Add files
    tab). With `admin_check` (a shared server) both are admin actions. Returns the admin
    user and password boxes (the cards' "Make preview" reads them too)."""
    with gr.Group():
        gr.Markdown(
            "### Add a LoRA from the Hub or Civitai\n"
            "A Civitai model or version link, or a Hub repo (`org/repo`, "
            "`org/repo/file.safetensors` or a huggingface.co link). The file is checked "
            "like any download; its trigger words, base model and first image are written "
            "beside it (`NAME.json`, `NAME.civitai.info`, `NAME.preview.png`). *Fetch info* "
            "looks a listed LoRA up on Civitai by its SHA256. Nothing is sent anywhere "
            "until you click; a token or key is used for that click only."
        )
        source = gr.Textbox(
            label="Civitai link or Hub repo",
            placeholder="https://civitai.com/models/… or org/repo",
            elem_id="lora_source",
        )
        with gr.Row():
            hf_token = gr.Textbox(
                label="Hub token (optional)", type="password", elem_id="lora_source_hf_token"
            )
            civitai_key = gr.Textbox(
                label="Civitai API key (optional)", type="password", elem_id="lora_source_key"
            )
            overwrite = gr.Checkbox(False, label="Overwrite an existing file of the same name")
        with gr.Row(visible=admin_check is not None):
            admin_user = gr.Textbox(label="Admin user", elem_id="lora_source_admin_user")
            admin_password = gr.Textbox(
                label="Admin password", type="password", elem_id="lora_source_admin_password"
            )
        add = gr.Button("Add LoRA", variant="primary", elem_id="lora_source_add")
        with gr.Row():
            name = gr.Textbox(label="Listed LoRA name", scale=3, elem_id="lora_fetch_name")
            fetch = gr.Button("Fetch info", scale=1, elem_id="lora_fetch_info")
        outcome = gr.Markdown(elem_id="lora_source_result")

    def refused(user: str, password: str) -> str | None:
        reason = admin_check(user or "", password or "") if admin_check else None
        return None if reason is None else f"Not done: this is an admin action; {reason}"

    def on_add(
        text: str, token: str, key: str, replace: bool, user: str, password: str
    ) -> tuple[str, Any]:
        refusal = refused(user, password)
        if refusal is not None:
            return refusal, gr.skip()
        line, signature = add_lora(service, sources, text, Credentials.of(token, key), replace)
        return line, signature or gr.skip()

    def on_fetch(wanted: str, token: str, key: str, user: str, password: str) -> tuple[str, Any]:
        refusal = refused(user, password)
        if refusal is not None:
            return refusal, gr.skip()
        line, signature = fetch_info(service, sources, wanted, Credentials.of(token, key))
        return line, signature or gr.skip()

    light: dict[str, Any] = {"concurrency_limit": 2, "api_visibility": "private"}
    add.click(
        on_add,
        [source, hf_token, civitai_key, overwrite, admin_user, admin_password],
        [outcome, library_version],
        **light,
    )
    fetch.click(
        on_fetch,
        [name, hf_token, civitai_key, admin_user, admin_password],
        [outcome, library_version],
        **light,
    )
    return admin_user, admin_password


def _reason(error: Exception) -> str:
    """The user-facing sentence; OS errors without their host path."""
    if isinstance(error, LorastackError):
        return error.message
    return (
        f"the file could not be stored ({getattr(error, 'strerror', None) or type(error).__name__})"
    )
