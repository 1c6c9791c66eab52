"""Per-visitor outputs on a shared server, through the page's own Gallery events: a
visitor lists, opens, deletes, restores and empties only the images they made."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest

from frontends.page.gallery_tab import build_gallery_tab, note_owner
from pipelines.gallery import GalleryIndex
from tests.test_gallery import made


class GalleryOnly:
    """The one service method the Gallery tab uses."""

    def __init__(self, index: GalleryIndex) -> None:
        self.index = index

    def gallery(self) -> GalleryIndex:
        return self.index


def visitor(name: str) -> SimpleNamespace:
    return SimpleNamespace(session_hash=name, username=None, client=None)


def events(service: GalleryOnly) -> dict[str, Any]:
    """The tab's event functions by name, built as `build_ui` builds it (inside a loop)."""

    async def build() -> gr.Blocks:
        with gr.Blocks() as page:
            build_gallery_tab(service, page, None, lambda request: request.session_hash)
        return page

    page = asyncio.run(build())
    return {f.fn.__name__: f.fn for f in page.fns.values() if f.fn is not None}


def test_a_visitor_sees_deletes_and_restores_only_their_own_images(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    index = GalleryIndex(outputs, tmp_path / "cache")
    service = GalleryOnly(index)
    ann_image = made(outputs, 1, "ann's castle")
    bob_image = made(outputs, 2, "bob's forest")
    note_owner(service, ann_image, "ann")  # type: ignore[arg-type]
    note_owner(service, bob_image, "bob")  # type: ignore[arg-type]
    note_owner(service, made(outputs, 3, "nobody's"), None)  # type: ignore[arg-type]
    on = events(service)
    filters = ("", "", "", "(all)", "(all)", 0)

    shown, ids, *_ = on["first"](visitor("bob"), *filters)
    assert ids == [bob_image.relative_to(outputs).as_posix()] and len(shown) == 1
    with pytest.raises(gr.Error, match="no image"):  # bob deletes ann's by its path
        on["remove"](visitor("bob"), str(ann_image), "", "", *filters)
    assert ann_image.is_file()

    on["remove"](visitor("ann"), str(ann_image), "", "", *filters)
    assert not ann_image.exists()
    (trash_id,) = index.trashed("ann")
    assert on["trash_choices"](visitor("bob")).choices == []
    with pytest.raises(gr.Error, match="no image"):
        on["put_back"](visitor("bob"), trash_id, "", "", *filters)
    assert on["clear"]("", "", visitor("bob"))[1] == "Deleted 0 image(s) for good"
    on["put_back"](visitor("ann"), trash_id, "", "", *filters)
    assert ann_image.is_file()
    _, ids, *_ = on["first"](visitor("ann"), *filters)
    assert ids == [ann_image.relative_to(outputs).as_posix()]
