"""A1111's "Open output folder": the folder reaches the machine's file manager opener,
and the button exists only where the user sits at the server."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import gradio as gr
import pytest

from frontends.page.open_folder import open_folder, opener_command


@pytest.fixture
def fake_opener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An `xdg-open` on PATH that writes what it was asked to open (the real one would
    open a window)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "opened.txt"
    script = bin_dir / "xdg-open"
    script.write_text(f'#!/bin/sh\nprintf "%s" "$1" > "{record}"\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return record


def test_the_output_folder_is_made_and_handed_to_the_opener(
    tmp_path: Path, fake_opener: Path
) -> None:
    folder = tmp_path / "outputs" / "txt2img-images"
    assert open_folder(folder) == f"Opened {folder}"
    assert folder.is_dir()
    deadline = time.monotonic() + 10
    while not fake_opener.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert fake_opener.read_text() == str(folder)


def test_without_an_opener_the_user_is_told_where_the_folder_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no xdg-open anywhere
    assert opener_command(tmp_path) is None
    with pytest.raises(gr.Error, match="no file manager opener"):
        open_folder(tmp_path / "outputs")
