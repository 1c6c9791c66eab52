"""The Gallery tab: every image in the outputs folders, newest first, a page of
thumbnails at a time, filtered by prompt text, LoRA, checkpoint, day and kind; the chosen
image full size with its parameters, sent back to txt2img, img2img, inpaint or Extras,
downloaded, or deleted to the trash (and restored from it).

Deleting, restoring and emptying the trash are admin actions on a shared server, as the
other actions that change files are."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from frontends.page.errors import user_error
from frontends.page.lora_panel import QUICK
from pipelines.errors import LorastackError
from pipelines.gallery import KINDS, GalleryPage, GalleryQuery
from pipelines.interface import GenerationService

ALL = "(all)"


@dataclass(frozen=True)
class GalleryTab:
    """The buttons other tabs' wiring needs, and the chosen image's path and parameters."""

    send_txt2img: gr.Button
    send_img2img: gr.Button
    send_inpaint: gr.Button
    send_extras: gr.Button
    path: gr.Textbox  # the chosen image's file (hidden)
    infotext: gr.Textbox


def build_gallery_tab(
    service: GenerationService,
    page: gr.Blocks,
    admin_check: Callable[[str, str], str | None] | None,
) -> GalleryTab:
    """The tab's layout and events (inside the caller's `gr.Tab`)."""
    gallery = service.gallery()
    with gr.Row():
        text = gr.Textbox(label="Search the parameters", scale=3, elem_id="gallery_text")
        lora = gr.Textbox(label="LoRA", scale=1, elem_id="gallery_lora")
        model = gr.Textbox(label="Checkpoint (name or hash)", scale=1, elem_id="gallery_model")
        day = gr.Dropdown([ALL], value=ALL, label="Day", scale=1, elem_id="gallery_day")
        kind = gr.Dropdown([ALL, *KINDS], value=ALL, label="Kind", scale=1)
        search = gr.Button("Search", variant="primary", scale=0, elem_id="gallery_search")
    shown = gr.Gallery(
        label="Images",
        columns=8,
        height=420,
        object_fit="contain",  # the real shape, never a square crop
        allow_preview=False,
        preview=False,
        elem_id="gallery_browser",
    )
    ids = gr.State([])
    number = gr.State(0)
    with gr.Row():
        previous = gr.Button("◀ Newer", scale=0, elem_id="gallery_previous")
        where = gr.Markdown(elem_id="gallery_page")
        following = gr.Button("Older ▶", scale=0, elem_id="gallery_next")
    with gr.Row():
        with gr.Column():
            full = gr.Image(
                label="Image", type="filepath", interactive=False, elem_id="gallery_full"
            )
        with gr.Column():
            infotext = gr.Textbox(
                label="Parameters", lines=6, interactive=False, elem_id="gallery_infotext"
            )
            path = gr.Textbox(visible=False, elem_id="gallery_path")
            send_txt2img = gr.Button("Send to txt2img", elem_id="gallery_send_txt2img")
            with gr.Row():
                send_img2img = gr.Button("Send to img2img", elem_id="gallery_send_img2img")
                send_inpaint = gr.Button("Send to inpaint", elem_id="gallery_send_inpaint")
                send_extras = gr.Button("Send to extras", elem_id="gallery_send_extras")
            download = gr.DownloadButton("Download", elem_id="gallery_download")
            with gr.Row():
                user = gr.Textbox(label="Admin user", visible=admin_check is not None)
                password = gr.Textbox(
                    label="Admin password", type="password", visible=admin_check is not None
                )
            delete = gr.Button("Delete (to the trash)", variant="stop", elem_id="gallery_delete")
    with gr.Accordion("Trash", open=False, elem_id="gallery_trash"):
        trashed = gr.Dropdown([], label="Deleted images", elem_id="gallery_trashed")
        with gr.Row():
            restore = gr.Button("Restore", elem_id="gallery_restore")
            empty = gr.Button("Empty the trash", variant="stop", elem_id="gallery_empty")
        status = gr.Markdown(elem_id="gallery_status")

    filters = [text, lora, model, day, kind]

    def query(values: list[Any], page_number: int) -> GalleryQuery:
        words, lora_name, checkpoint, chosen_day, chosen_kind = values
        return GalleryQuery(
            text=(words or "").strip(),
            lora=(lora_name or "").strip(),
            checkpoint=(checkpoint or "").strip(),
            day="" if chosen_day in (None, ALL) else chosen_day,
            kind="" if chosen_kind in (None, ALL) else chosen_kind,
            page=max(0, int(page_number)),
        )

    def render(found: GalleryPage) -> tuple[Any, ...]:
        items = [
            (str(gallery.thumbnail(item.id)), item.id.rsplit("/", 1)[-1]) for item in found.items
        ]
        label = f"page {found.page + 1} of {found.pages} · {found.total} image(s)"
        days = gr.Dropdown(choices=[ALL, *gallery.days()])
        return items, [item.id for item in found.items], found.page, label, days

    def listing(*values: Any) -> tuple[Any, ...]:
        *chosen, page_number = values
        gallery.refresh()
        return render(gallery.query(query(chosen, page_number)))

    outputs = [shown, ids, number, where, day]
    search.click(lambda *v: listing(*v[:-1], 0), [*filters, number], outputs, **QUICK)
    for box in (text, lora, model):
        box.submit(lambda *v: listing(*v[:-1], 0), [*filters, number], outputs, **QUICK)
    previous.click(lambda *v: listing(*v[:-1], v[-1] - 1), [*filters, number], outputs, **QUICK)
    following.click(lambda *v: listing(*v[:-1], v[-1] + 1), [*filters, number], outputs, **QUICK)
    page.load(lambda *v: listing(*v[:-1], 0), [*filters, number], outputs, **QUICK)

    def choose(listed: list[str], event: gr.SelectData) -> tuple[Any, ...]:
        if not listed or event.index is None or event.index >= len(listed):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            item = gallery.item(listed[event.index])
            file = str(gallery.path(item.id))
        except LorastackError as error:
            raise user_error(error.message) from error
        return file, item.infotext, file, gr.DownloadButton(value=file)

    shown.select(choose, ids, [full, infotext, path, download], **QUICK)

    def refused(who: str, secret: str, action: str) -> None:
        reason = admin_check(who or "", secret or "") if admin_check else None
        if reason is not None:
            raise user_error(f"{action}: {reason}")

    def remove(file: str, who: str, secret: str, *values: Any) -> tuple[Any, ...]:
        refused(who, secret, "Not deleted")
        if not file:
            raise user_error("Choose an image first")
        item_id = _item_id(gallery.outputs_dir, file)
        try:
            gallery.delete(item_id)
        except LorastackError as error:
            raise user_error(error.message) from error
        *chosen, page_number = values
        listed = render(gallery.query(query(chosen, page_number)))
        cleared = (None, "", "", gr.Dropdown(choices=gallery.trashed()))
        return (*listed, *cleared, f"Moved {item_id} to the trash")

    after = [*outputs, full, infotext, path, trashed, status]
    delete.click(remove, [path, user, password, *filters, number], after, **QUICK)

    def put_back(trash_id: str, who: str, secret: str, *values: Any) -> tuple[Any, ...]:
        refused(who, secret, "Not restored")
        if not trash_id:
            raise user_error("Choose a deleted image first")
        try:
            item_id = gallery.restore(trash_id)
        except LorastackError as error:
            raise user_error(error.message) from error
        *chosen, page_number = values
        listed = render(gallery.query(query(chosen, page_number)))
        return (*listed, gr.Dropdown(choices=gallery.trashed(), value=None), f"Restored {item_id}")

    restore.click(
        put_back,
        [trashed, user, password, *filters, number],
        [*outputs, trashed, status],
        **QUICK,
    )

    def clear(who: str, secret: str) -> tuple[Any, str]:
        refused(who, secret, "Trash not emptied")
        count = gallery.empty_trash()
        return gr.Dropdown(choices=[], value=None), f"Deleted {count} image(s) for good"

    empty.click(clear, [user, password], [trashed, status], **QUICK)
    page.load(lambda: gr.Dropdown(choices=gallery.trashed()), None, trashed, **QUICK)
    return GalleryTab(send_txt2img, send_img2img, send_inpaint, send_extras, path, infotext)


def _item_id(outputs_dir: Path, file: str) -> str:
    """The gallery id of a chosen file (its path relative to the outputs folder)."""
    try:
        return Path(file).resolve().relative_to(Path(outputs_dir).resolve()).as_posix()
    except ValueError:
        raise user_error("That image is not in the outputs folder") from None
