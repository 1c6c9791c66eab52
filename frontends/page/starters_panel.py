"""The starter list, shown while only the demo model runs: the pinned checkpoints of
`deployments.firstrun`. Choosing one reads its size and licence from the Hub (that click is
the first contact); Download fetches it into the first models folder with a progress bar,
resumable and checked like the first-run download, and is an admin action on a shared
server.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from deployments.firstrun import STARTERS, Starter, download_starter, starter_info
from pipelines.errors import LorastackError, NotFoundError
from pipelines.interface import GenerationService

Progress = Callable[..., Any]
"""gr.Progress, or any callable taking (fraction, desc=...)."""


def starter_named(choice: str | None) -> Starter:
    """The starter a dropdown value (`org/repo/file`) names; LorastackError otherwise."""
    for starter in STARTERS:
        if str(starter) == choice:
            return starter
    raise NotFoundError(f"unknown starter {choice!r}", field="starter")


def describe_starter(choice: str | None) -> str:
    """One Markdown line: the starter's size and licence as the Hub lists them now."""
    try:
        starter = starter_named(choice)
        info = starter_info(starter)
    except LorastackError as error:
        return f"Not available: {error.message}"
    except Exception as error:  # huggingface_hub and its HTTP client raise many types
        return f"The Hub could not be asked about {choice} ({type(error).__name__}: {error})"
    size = f"{info.size / 10**9:.2f} GB" if info.size else "size not listed"
    licence = info.licence or "not stated (read the model card)"
    return f"**{starter.label}**: {size}, licence {licence}"


def download_choice(
    service: GenerationService,
    models_dir: Path,
    choice: str | None,
    *,
    refusal: str | None = None,
    progress: Progress | None = None,
) -> str:
    """Download the chosen starter and rescan; one Markdown line: what was added or why not.

    Args:
        refusal: why the admin check refused the caller (nothing is downloaded then).
        progress: called with (fraction, desc=...) while bytes arrive.
    """
    if refusal is not None:
        return f"Not downloaded: downloading a checkpoint is an admin action; {refusal}"

    def report(done: int, total: int | None) -> None:
        if progress is not None and total:
            progress(min(done / total, 1.0), desc=f"{done / 10**6:.0f} of {total / 10**6:.0f} MB")

    try:
        placed = download_starter(starter_named(choice), models_dir, progress=report)
    except LorastackError as error:
        return f"Not downloaded: {error.message}"
    service.rescan()
    return f"Downloaded {placed.name}: choose it in the checkpoint menu (after Refresh)."


def build_starters(
    service: GenerationService,
    models_dir: Path,
    admin_check: Callable[[str, str], str | None] | None = None,
    visible: bool = True,
) -> gr.Accordion:
    """The panel (call inside the page's Blocks, only while the demo model runs; hidden
    while the first-run download is under way, shown if it fails)."""
    with gr.Accordion(
        "Download a starter checkpoint", open=True, visible=visible, elem_id="starters"
    ) as panel:
        choice = gr.Dropdown(
            [(f"{s.label}: {s}", str(s)) for s in STARTERS],
            value=None,
            label="Starter checkpoint (choose one to see its size and licence)",
            elem_id="starter_choice",
        )
        info = gr.Markdown(elem_id="starter_info")
        with gr.Row(visible=admin_check is not None):
            admin_user = gr.Textbox(label="Admin user", elem_id="starter_admin_user")
            admin_password = gr.Textbox(
                label="Admin password", type="password", elem_id="starter_admin_password"
            )
        download = gr.Button("Download", elem_id="starter_download")
        status = gr.Markdown(elem_id="starter_status")

    def on_download(
        value: str | None,
        user: str,
        password: str,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects it
    ) -> str:
        refusal = None if admin_check is None else admin_check(user or "", password or "")
        return download_choice(service, models_dir, value, refusal=refusal, progress=progress)

    choice.change(describe_starter, [choice], [info])
    download.click(on_download, [choice, admin_user, admin_password], [status])
    return panel
