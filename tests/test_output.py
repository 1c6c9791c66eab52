"""Saving never overwrites, numbers like A1111, and never leaves half files under a name."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from pipelines.infotext import read_infotext, write_png_with_infotext
from pipelines.output import (
    next_sequence_number,
    remove_stale_placeholders,
    save_png,
    write_new_file,
)

DAY = dt.date(2026, 11, 23)


def _png(text: str = "a cat\nSteps: 2, Sampler: Euler, Seed: 1") -> bytes:
    return write_png_with_infotext(Image.new("RGB", (8, 8), (10, 20, 30)), text)


def test_dated_folder_and_sequence(tmp_path: Path) -> None:
    first = save_png(tmp_path, _png(), 42, today=DAY)
    second = save_png(tmp_path, _png(), 43, today=DAY)
    assert first == tmp_path / "txt2img-images" / "2026-11-23" / "00000-42.png"
    assert second.name == "00001-43.png"
    assert read_infotext(first).startswith("a cat")


def test_existing_files_are_never_overwritten(tmp_path: Path) -> None:
    folder = tmp_path / "txt2img-images" / "2026-11-23"
    folder.mkdir(parents=True)
    (folder / "00007-1.png").write_bytes(b"user's file")
    saved = save_png(tmp_path, _png(), 1, today=DAY)
    assert saved.name == "00008-1.png"
    assert (folder / "00007-1.png").read_bytes() == b"user's file"


def test_concurrent_saves_get_distinct_names(tmp_path: Path) -> None:
    paths: list[Path] = []
    lock = threading.Lock()

    def save(seed: int) -> None:
        path = save_png(tmp_path, _png(), seed, today=DAY)
        with lock:
            paths.append(path)

    threads = [threading.Thread(target=save, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({p.name[:5] for p in paths}) == 16


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    earlier = save_png(tmp_path, _png(), 1, today=DAY)

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipelines.output.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="No space"):
        save_png(tmp_path, _png(), 2, today=DAY)
    folder = earlier.parent
    assert sorted(p.name for p in folder.iterdir()) == [earlier.name]


def test_sequence_ignores_other_names(tmp_path: Path) -> None:
    for name in ("notes.txt", "00003-5.png", "12-1.png", ".saving-x.tmp"):
        (tmp_path / name).write_bytes(b"")
    assert next_sequence_number(tmp_path) == 4
    assert write_new_file(tmp_path, lambda n: f"{n:05d}-x.png", b"1").name == "00004-x.png"


def test_saved_images_are_readable_by_others(tmp_path: Path) -> None:
    saved = save_png(tmp_path, _png(), 1, today=DAY)
    assert saved.stat().st_mode & 0o777 == 0o644


def test_saving_works_where_hard_links_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FUSE and SMB mounts (Space buckets) refuse os.link; saving must not need it."""

    def no_links(*args: object, **kwargs: object) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr("pipelines.output.os.link", no_links)
    first = save_png(tmp_path, _png(), 1, today=DAY)
    second = save_png(tmp_path, _png(), 1, today=DAY)
    assert (first.name, second.name) == ("00000-1.png", "00001-1.png")
    assert first.read_bytes() == _png()
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name, second.name]


def test_a_reserved_name_is_never_taken_again(tmp_path: Path) -> None:
    """An empty placeholder (a save in progress, or one a kill left) keeps its number."""
    folder = tmp_path / "txt2img-images" / DAY.isoformat()
    folder.mkdir(parents=True)
    (folder / "00000-9.png").touch()
    saved = save_png(tmp_path, _png(), 9, today=DAY)
    assert saved.name == "00001-9.png" and (folder / "00000-9.png").stat().st_size == 0


def test_stale_placeholders_are_removed_at_start_up(tmp_path: Path) -> None:
    kept = save_png(tmp_path, _png(), 1, today=DAY)
    folder = kept.parent
    for name in ("00007-3.png", ".saving-abc.tmp", "00008-4.png"):
        (folder / name).touch()
    (folder / "notes.txt").touch()  # empty, but not ours
    fresh = folder / "00008-4.png"  # a save happening right now
    old = time.time() - 3600
    for name in ("00007-3.png", ".saving-abc.tmp", "notes.txt"):
        os.utime(folder / name, (old, old))
    os.utime(kept, (old, old))
    removed = remove_stale_placeholders(tmp_path)
    assert sorted(p.name for p in removed) == [".saving-abc.tmp", "00007-3.png"]
    assert sorted(p.name for p in folder.iterdir()) == sorted([kept.name, fresh.name, "notes.txt"])
