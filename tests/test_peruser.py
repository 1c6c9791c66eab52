"""Per-visitor outputs on a shared server, through the page's own Gallery events: a
visitor lists, opens, deletes, restores and empties only the images they made. And the
real app with two logins: the second user's job shows its place in the queue while the
first runs, each owns the images they made, and nobody fetches another's by its path."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import pytest

from frontends.page.gallery_tab import build_gallery_tab, note_owner
from frontends.page.private_files import PrivateFolders
from pipelines.gallery import GalleryIndex, GalleryQuery
from pipelines.interface import DEMO_MODEL_NAME
from tests.test_app_http import app_server
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
            tab = build_gallery_tab(service, page, None, lambda request: request.session_hash)
        # the chosen file that Send and Delete act on stays on the server: a client
        # cannot put another visitor's path there
        assert isinstance(tab.path, gr.State)
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


def test_the_file_route_refuses_paths_inside_the_private_folders(tmp_path: Path) -> None:
    folders = PrivateFolders(lambda *_: None, [tmp_path / "outputs"])  # type: ignore[arg-type]
    inside = tmp_path / "outputs" / "txt2img-images" / "x.png"
    assert folders.inside(str(inside)) and folders.inside(str(tmp_path / "outputs"))
    assert folders.inside(f"{tmp_path}/cache/../outputs/x.png")
    assert not folders.inside(str(tmp_path / "outputs-other" / "x.png"))
    assert not folders.inside(str(tmp_path / "cache" / "x.png"))


# ---------------------------------------------------------------- the real app, two users


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """`python app.py --listen --api` with two Gradio logins (the demo model)."""
    data = tmp_path_factory.mktemp("shared")
    with app_server(data, "--listen", "--api", "--gradio-auth", "alice:a,bob:b") as url:
        yield url, data


def txt2img(seed: int, **fields: object) -> dict[str, object]:
    return {
        "prompt": "a tower",
        "negative_prompt": "",
        "steps": 2,
        "cfg_scale": 7,
        "sampler_name": "Euler",
        "scheduler": "Automatic",
        "seed": seed,
        "width": 64,
        "height": 64,
        "batch_size": 1,
        "n_iter": 1,
        "clip_skip": 1,
        "checkpoint": DEMO_MODEL_NAME,
        "loras": [],
        **fields,
    }


def progress_text(job: Any) -> str:
    units = job.status().progress_data or []
    return " ".join(str(unit.desc) for unit in units)


def wait_until(check: Any, seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text := check():
            return text
        time.sleep(0.05)
    raise TimeoutError(f"not within {seconds}s")


def test_a_second_users_job_shows_its_place_and_each_owns_their_images(
    shared: tuple[str, Path],
) -> None:
    from gradio_client import Client

    url, data = shared
    alice = Client(url, auth=("alice", "a"), verbose=False)
    bob = Client(url, auth=("bob", "b"), verbose=False)
    try:
        first = alice.submit(**txt2img(1, steps=150, n_iter=50), api_name="/txt2img")
        wait_until(lambda: "step" in progress_text(first) and progress_text(first))
        second = bob.submit(**txt2img(100), api_name="/txt2img")
        waiting = wait_until(lambda: "position" in progress_text(second) and progress_text(second))
        assert "waiting in the queue, position 1" in waiting
        stop = urllib.request.Request(f"{url}sdapi/v1/interrupt", method="POST")
        urllib.request.urlopen(stop, timeout=10).close()  # A1111's: the running job (alice's)
        made_by_alice = first.result(timeout=120)[2]
        assert second.result(timeout=120)[2] == [100]
        (alices,) = (data / "outputs").rglob(f"*-{made_by_alice[0]}.png")
        cookies = "; ".join(f"{name}={value}" for name, value in bob.cookies.items())
        by_path = urllib.request.Request(
            f"{url}gradio_api/file={alices.resolve()}", headers={"Cookie": cookies}
        )
        with pytest.raises(urllib.error.HTTPError, match="404"):  # not by guessing its path
            urllib.request.urlopen(by_path, timeout=10)
    finally:
        alice.close()
        bob.close()
    index = GalleryIndex(data / "outputs", data / "cache")
    index.refresh()

    def seeds(owner: str) -> list[str]:
        return sorted(item.seed for item in index.query(GalleryQuery(owner=owner)).items)

    assert 1 <= len(made_by_alice) < 50  # stopped early, the finished images kept
    assert seeds("user:alice") == sorted(str(seed) for seed in made_by_alice)
    assert seeds("user:bob") == ["100"]
