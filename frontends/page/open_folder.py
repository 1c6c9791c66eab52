"""A1111's "Open images output directory" button: the tab's output folder in the
file manager of the machine the server runs on, for a user sitting at that machine. On a
shared server (`--listen`, `--share`, a Space) the button is not there: the folder would
open on the server, not for the visitor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import gradio as gr

from frontends.page.errors import user_error
from frontends.page.lora_panel import QUICK


def opener_command(folder: Path) -> list[str] | None:
    """The command that shows `folder` in this machine's file manager (None: none here;
    Windows opens it through `os.startfile` instead)."""
    if sys.platform == "darwin":
        return ["open", str(folder)]
    found = shutil.which("xdg-open")
    return [found, str(folder)] if found else None


def open_folder(folder: Path) -> str:
    """Open `folder` (made if missing) in the file manager; say what was opened."""
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform == "win32":  # pragma: no cover - not this project's CI
        os.startfile(folder)  # type: ignore[attr-defined]
        return f"Opened {folder}"
    command = opener_command(folder)
    if command is None:
        raise user_error(f"no file manager opener (xdg-open) here; the folder is {folder}")
    opener = subprocess.Popen(  # noqa: S603 - a fixed program and our own folder, no shell
        command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    threading.Thread(target=opener.wait, daemon=True).start()  # reaped, never waited on
    return f"Opened {folder}"


def build_open_folder(folder: Path, elem_id: str) -> gr.Button:
    """The button for `folder` (build it only for a local user)."""
    button = gr.Button("Open output folder", size="sm", elem_id=elem_id, min_width=80)
    button.click(lambda: gr.Info(open_folder(folder)), None, None, **QUICK)
    return button
