"""The gallery index: newest first, paged, filtered by what the parameters say; reads each
file once; thumbnails made once; delete to the trash and back; only listed ids resolve."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from PIL import Image

from pipelines.errors import InvalidRequestError, NotFoundError
from pipelines.gallery import GalleryIndex, GalleryQuery
from pipelines.output import SaveOptions, save_image


def made(outputs: Path, n: int, prompt: str, **extra: object) -> Path:
    model = extra.get("model", "tiny-sd1")
    infotext = (
        f"{prompt}\nNegative prompt: fog\nSteps: 2, Seed: {n}, Size: 16x16, "
        f"Model hash: 0123456789, Model: {model}"
    )
    kind = str(extra.get("kind", "txt2img-images"))
    day = extra.get("day", dt.datetime(2026, 12, 3, 10, 0, 0))
    options = SaveOptions(str(extra.get("fmt", "png")))
    path = save_image(outputs, Image.new("RGB", (16, 16), (n, 0, 0)), infotext, n, kind=kind,
                      now=day, options=options)  # fmt: skip
    stamp = 1_700_000_000 + n  # file times give the order
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def outputs(tmp_path: Path) -> Path:
    out = tmp_path / "outputs"
    made(out, 1, "a castle <lora:ink:0.8>")
    made(out, 2, "a forest", fmt="jpg", model="other-model")
    made(out, 3, "a boat <lora:glow:1>", kind="img2img-images", fmt="webp")
    made(out, 4, "a castle at night", day=dt.datetime(2026, 12, 4, 9, 0, 0))
    return out


def test_newest_first_paged_and_filtered(outputs: Path, tmp_path: Path) -> None:
    index = GalleryIndex(outputs, tmp_path / "cache")
    assert index.refresh() == 4
    everything = index.query(GalleryQuery())
    assert [item.seed for item in everything.items] == ["4", "3", "2", "1"]
    two = index.query(GalleryQuery(per_page=3, page=1))
    assert (two.pages, two.total, [i.seed for i in two.items]) == (2, 4, ["1"])
    assert [i.seed for i in index.query(GalleryQuery(text="castle")).items] == ["4", "1"]
    assert [i.seed for i in index.query(GalleryQuery(lora="INK")).items] == ["1"]
    assert [i.seed for i in index.query(GalleryQuery(checkpoint="other")).items] == ["2"]
    assert [i.seed for i in index.query(GalleryQuery(day="2026-12-04")).items] == ["4"]
    assert [i.seed for i in index.query(GalleryQuery(kind="img2img-images")).items] == ["3"]
    assert index.days() == ["2026-12-04", "2026-12-03"]
    assert index.item(everything.items[1].id).loras == ("glow",)  # webp parameters read


def test_each_file_is_read_once_and_the_index_survives_a_restart(
    outputs: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    index = GalleryIndex(outputs, cache)
    index.refresh()
    assert index.refresh() == 0
    made(outputs, 5, "a bridge")
    assert index.refresh() == 1 and index.query(GalleryQuery()).items[0].seed == "5"
    again = GalleryIndex(outputs, cache)  # a restart: nothing re-read
    assert again.refresh() == 0 and again.query(GalleryQuery()).total == 5


def test_thumbnails_are_made_once(outputs: Path, tmp_path: Path) -> None:
    index = GalleryIndex(outputs, tmp_path / "cache")
    index.refresh()
    first = index.query(GalleryQuery()).items[0]
    thumb = index.thumbnail(first.id)
    stamp = thumb.stat().st_mtime_ns
    assert index.thumbnail(first.id) == thumb and thumb.stat().st_mtime_ns == stamp
    with Image.open(thumb) as image:
        assert image.format == "WEBP" and max(image.size) <= 256


def test_delete_goes_to_the_trash_and_comes_back(outputs: Path, tmp_path: Path) -> None:
    index = GalleryIndex(outputs, tmp_path / "cache")
    index.refresh()
    item = index.query(GalleryQuery(lora="ink")).items[0]
    trash_id = index.delete(item.id)
    assert not (outputs / item.id).exists() and index.query(GalleryQuery(lora="ink")).total == 0
    assert index.trashed() == [trash_id]
    back = index.restore(trash_id)
    assert back == item.id and (outputs / item.id).is_file() and index.trashed() == []
    index.delete(item.id)
    assert index.empty_trash() == 1 and index.trashed() == []


@pytest.mark.parametrize("bad", ["../secret.png", "/etc/passwd", "txt2img-images/x.png", ""])
def test_only_listed_ids_resolve(outputs: Path, tmp_path: Path, bad: str) -> None:
    index = GalleryIndex(outputs, tmp_path / "cache")
    index.refresh()
    for call in (index.path, index.thumbnail, index.delete, index.restore):
        with pytest.raises(NotFoundError):
            call(bad)


def test_on_a_shared_server_a_visitor_sees_deletes_and_restores_only_their_own(
    outputs: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    index = GalleryIndex(outputs, cache)
    index.refresh()
    ids = {item.seed: item.id for item in index.query(GalleryQuery()).items}
    index.record_owner(outputs / ids["1"], "session:alice")
    index.record_owner(outputs / ids["4"], "session:alice")
    index.record_owner(outputs / ids["2"], "session:bob")
    alice, bob, eve = "session:alice", "session:bob", "session:eve"
    with pytest.raises(InvalidRequestError, match="not in the outputs folder"):
        index.record_owner(tmp_path / "elsewhere.png", alice)

    def seeds(owner: str | None) -> list[str]:
        return [i.seed for i in index.query(GalleryQuery(owner=owner)).items]

    assert (seeds(alice), seeds(bob), seeds(eve)) == (["4", "1"], ["2"], [])
    assert seeds(None) == ["4", "3", "2", "1"]  # the single local user sees everything
    assert index.days(bob) == ["2026-12-03"]
    with pytest.raises(NotFoundError):  # another's image is as unknown as a missing one
        index.path(ids["1"], bob)
    with pytest.raises(NotFoundError):
        index.delete(ids["1"], bob)
    with pytest.raises(NotFoundError):  # an image nobody recorded is nobody's
        index.delete(ids["3"], alice)
    assert (outputs / ids["1"]).is_file() and (outputs / ids["3"]).is_file()

    alice_trash = index.delete(ids["1"], alice)
    bob_trash = index.delete(ids["2"], bob)
    assert (index.trashed(alice), index.trashed(bob), index.trashed(eve)) == (
        [alice_trash],
        [bob_trash],
        [],
    )
    with pytest.raises(NotFoundError):
        index.restore(alice_trash, bob)
    again = GalleryIndex(outputs, cache)  # a restart keeps who owns what, trash included
    assert again.trashed(alice) == [alice_trash]
    assert again.empty_trash(bob) == 1 and again.trashed() == [alice_trash]
    back = again.restore(alice_trash, alice)
    assert back == ids["1"] and [i.seed for i in again.query(GalleryQuery(owner=alice)).items] == [
        "4",
        "1",
    ]
    assert "alice" not in (cache / "gallery-owners.json").read_text()  # hashed keys only
