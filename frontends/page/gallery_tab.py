"""The Gallery tab: every image in the outputs folders, newest first, a page of
thumbnails at a time, filtered by prompt text, LoRA, checkpoint, day and kind; the chosen
image full size with its parameters, sent back to txt2img, img2img, inpaint or Extras,
downloaded, or deleted to the trash (and restored from it).

Deleting, restoring and emptying the trash are admin actions on a shared server, as the
other actions that change files are (CONTRACT). There every visitor also sees, deletes,
restores and empties only the images they made (`identity.output_owner`; `note_owner`
records them as they are saved): the admin credential does not open other visitors'
images either."""

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
    path: gr.State  # the chosen image's file: kept on the server, so no client can name one
    infotext: gr.Textbox


def build_gallery_tab(
    service: GenerationService,
    page: gr.Blocks,
    admin_check: Callable[[str, str], str | None] | None,
    owner_of: Callable[[gr.Request | None], str | None] = lambda _: None,
) -> GalleryTab:
    """The tab's layout and events (inside the caller's `gr.Tab`); `owner_of` says whose
    images a request may list and change (None: all)."""
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
            path = gr.State("")
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

    def query(values: list[Any], page_number: int, owner: str | None) -> GalleryQuery:
        words, lora_name, checkpoint, chosen_day, chosen_kind = values
        return GalleryQuery(
            text=(words or "").strip(),
            lora=(lora_name or "").strip(),
            checkpoint=(checkpoint or "").strip(),
            day="" if chosen_day in (None, ALL) else chosen_day,
            kind="" if chosen_kind in (None, ALL) else chosen_kind,
            owner=owner,
            page=max(0, int(page_number)),
        )

    def render(found: GalleryPage, owner: str | None) -> tuple[Any, ...]:
        items = [
            (str(gallery.thumbnail(item.id)), item.id.rsplit("/", 1)[-1]) for item in found.items
        ]
        label = f"page {found.page + 1} of {found.pages} · {found.total} image(s)"
        days = gr.Dropdown(choices=[ALL, *gallery.days(owner)])
        return items, [item.id for item in found.items], found.page, label, days

    def listing(values: tuple[Any, ...], step: int | None, request: Any) -> tuple[Any, ...]:
        """The page `step` pages from the shown one (None: the first) for `request`'s
        visitor."""
        *chosen, page_number = values
        owner = owner_of(request)
        gallery.refresh()
        wanted = 0 if step is None else page_number + step
        return render(gallery.query(query(chosen, wanted, owner)), owner)

    def first(request: gr.Request, *values: Any) -> tuple[Any, ...]:
        return listing(values, None, request)

    def newer(request: gr.Request, *values: Any) -> tuple[Any, ...]:
        return listing(values, -1, request)

    def older(request: gr.Request, *values: Any) -> tuple[Any, ...]:
        return listing(values, 1, request)

    outputs = [shown, ids, number, where, day]
    search.click(first, [*filters, number], outputs, **QUICK)
    for box in (text, lora, model):
        box.submit(first, [*filters, number], outputs, **QUICK)
    previous.click(newer, [*filters, number], outputs, **QUICK)
    following.click(older, [*filters, number], outputs, **QUICK)
    page.load(first, [*filters, number], outputs, **QUICK)

    def choose(listed: list[str], event: gr.SelectData, request: gr.Request) -> tuple[Any, ...]:
        if not listed or event.index is None or event.index >= len(listed):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        try:
            item = gallery.item(listed[event.index], owner_of(request))
            file = str(gallery.path(item.id, owner_of(request)))
        except LorastackError as error:
            raise user_error(error.message) from error
        return file, item.infotext, file, gr.DownloadButton(value=file)

    shown.select(choose, ids, [full, infotext, path, download], **QUICK)

    def refused(who: str, secret: str, action: str) -> None:
        reason = admin_check(who or "", secret or "") if admin_check else None
        if reason is not None:
            raise user_error(f"{action}: {reason}")

    def remove(
        request: gr.Request, file: str, who: str, secret: str, *values: Any
    ) -> tuple[Any, ...]:
        refused(who, secret, "Not deleted")
        if not file:
            raise user_error("Choose an image first")
        item_id = _item_id(gallery.outputs_dir, file)
        owner = owner_of(request)
        try:
            gallery.delete(item_id, owner)
        except LorastackError as error:
            raise user_error(error.message) from error
        *chosen, page_number = values
        listed = render(gallery.query(query(chosen, page_number, owner)), owner)
        cleared = (None, "", "", gr.Dropdown(choices=gallery.trashed(owner)))
        return (*listed, *cleared, f"Moved {item_id} to the trash")

    after = [*outputs, full, infotext, path, trashed, status]
    delete.click(remove, [path, user, password, *filters, number], after, **QUICK)

    def put_back(
        request: gr.Request, trash_id: str, who: str, secret: str, *values: Any
    ) -> tuple[Any, ...]:
        refused(who, secret, "Not restored")
        if not trash_id:
            raise user_error("Choose a deleted image first")
        owner = owner_of(request)
        try:
            item_id = gallery.restore(trash_id, owner)
        except LorastackError as error:
            raise user_error(error.message) from error
        *chosen, page_number = values
        listed = render(gallery.query(query(chosen, page_number, owner)), owner)
        trash = gr.Dropdown(choices=gallery.trashed(owner), value=None)
        return (*listed, trash, f"Restored {item_id}")

    restore.click(
        put_back,
        [trashed, user, password, *filters, number],
        [*outputs, trashed, status],
        **QUICK,
    )

    def clear(who: str, secret: str, request: gr.Request) -> tuple[Any, str]:
        refused(who, secret, "Trash not emptied")
        count = gallery.empty_trash(owner_of(request))
        return gr.Dropdown(choices=[], value=None), f"Deleted {count} image(s) for good"

    empty.click(clear, [user, password], [trashed, status], **QUICK)

    def trash_choices(request: gr.Request) -> Any:
        return gr.Dropdown(choices=gallery.trashed(owner_of(request)))

    page.load(trash_choices, None, trashed, **QUICK)
    return GalleryTab(send_txt2img, send_img2img, send_inpaint, send_extras, path, infotext)


def note_owner(service: GenerationService, path: Path, owner: str | None) -> None:
    """On a shared server the visitor who made a saved image owns it in the gallery."""
    if owner is not None:
        service.gallery().record_owner(path, owner)


def _item_id(outputs_dir: Path, file: str) -> str:
    """The gallery id of a chosen file (its path relative to the outputs folder)."""
    try:
        return Path(file).resolve().relative_to(Path(outputs_dir).resolve()).as_posix()
    except ValueError:
        raise user_error("That image is not in the outputs folder") from None
