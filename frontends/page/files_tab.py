"""The "Add files" tab: upload LoRAs (and checkpoints, when the admin allows it) or download
them by reference, where nobody can copy files into a folder by hand (a Space).

Every check lives in `deployments.ingest`; this module only turns its results and refusals
into one line per file, rescans the listings after a success, and says when the files land
on a disk that a restart wipes. With `--hide-paths` the lines name files, never host paths.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import gradio as gr

from deployments.ingest import IngestPolicy, Kind, PlacedFile, temporary_storage_warning
from frontends.page.lora_panel import library_signature
from pipelines.errors import LorastackError
from pipelines.interface import GenerationService

KIND_LABELS: dict[str, Kind] = {"LoRA": "lora", "Checkpoint": "checkpoint"}
"""Radio labels -> ingest kinds."""

Progress = Callable[..., Any]
"""gr.Progress, or any callable taking (fraction or (done, total), desc=...)."""


def kind_of(label: str | None) -> Kind:
    """The ingest kind for a radio label (the kind names themselves are accepted too)."""
    if label in KIND_LABELS:
        return KIND_LABELS[label]
    return "checkpoint" if (label or "").lower() == "checkpoint" else "lora"


def _megabytes(size: int) -> str:
    """`12.3 MB`, or `4.5 KB` below a megabyte."""
    if size < 1024 * 1024:
        return f"{size / 1024:,.1f} KB"
    return f"{size / (1024 * 1024):,.1f} MB"


def _where(placed: PlacedFile, hide_paths: bool) -> str:
    """Where the file went: `loras/ink.safetensors`, or the host path when not hidden."""
    if hide_paths:
        return f"{placed.path.parent.name}/{placed.filename}"
    return str(placed.path)


def placed_line(placed: PlacedFile, hide_paths: bool) -> str:
    """One success line: name, what it is, size, where it went."""
    what = "LoRA" if placed.kind == "lora" else "checkpoint"
    verb = "replaced" if placed.replaced else "added"
    line = (
        f"Added **{placed.filename}**: {what} ({placed.architecture}), "
        f"{_megabytes(placed.size)}, {verb} as `{_where(placed, hide_paths)}`"
    )
    return line + "".join(f"\n   - {note}" for note in placed.notes)


def refused_line(name: str, reason: str) -> str:
    """One refusal line, the file named once (errors often start with the name already).
    Words, not emoji: Debian's Chromium has no emoji font and showed an empty box."""
    return f"Refused **{name}**: {reason.removeprefix(f'{name}: ')}"


def _reason(error: Exception) -> str:
    """The user-facing sentence; OS errors without their host path."""
    if isinstance(error, LorastackError):
        return error.message
    if isinstance(error, OSError):
        return f"the file could not be stored ({error.strerror or type(error).__name__})"
    raise error


def add_uploads(
    service: GenerationService,
    policy: IngestPolicy,
    files: Iterable[str | Path] | None,
    kind_label: str | None,
    overwrite: bool,
    *,
    hide_paths: bool,
) -> str:
    """Check and place each uploaded file (named by its own file name); rescan after any
    success. Returns one Markdown line per file: what was added, or why not."""
    paths = [Path(f) for f in files or []]
    if not paths:
        return "Choose one or more `.safetensors` files first."
    kind = kind_of(kind_label)
    lines = []
    added = 0
    for path in paths:
        try:
            placed = policy.upload(path, kind, filename=path.name, overwrite=overwrite)
        except (LorastackError, OSError) as error:
            lines.append(refused_line(path.name, _reason(error)))
            continue
        lines.append(placed_line(placed, hide_paths))
        added += 1
    if added:
        service.rescan()
    return "\n".join(lines)


def add_download(
    service: GenerationService,
    policy: IngestPolicy,
    reference: str,
    kind_label: str | None,
    sha256: str | None,
    overwrite: bool,
    *,
    hide_paths: bool,
    progress: Progress | None = None,
) -> str:
    """Download one file by Hub reference or https:// link, feeding `progress`; rescan on
    success. Returns one Markdown line: what was added, or why not."""
    kind = kind_of(kind_label)
    text = (reference or "").strip()

    def report(done: int, total: int | None) -> None:
        if progress is None:
            return
        if total:
            progress(min(done / total, 1.0), desc=f"{_megabytes(done)} of {_megabytes(total)}")
        else:
            progress((done, None), desc=f"{_megabytes(done)} received", unit="bytes")

    try:
        placed = policy.download(
            text,
            kind,
            overwrite=overwrite,
            expected_sha256=(sha256 or "").strip() or None,
            progress=report,
        )
    except (LorastackError, OSError) as error:
        return refused_line(text or "(nothing)", _reason(error))
    service.rescan()
    return placed_line(placed, hide_paths)


def storage_notes(policy: IngestPolicy, env: dict[str, str] | None = None) -> list[str]:
    """The temporary-disk warnings for the folders this tab can fill (none off a Space)."""
    kinds: list[Kind] = ["lora", "checkpoint"] if policy.checkpoints else ["lora"]
    notes = []
    for kind in kinds:
        warning = temporary_storage_warning(policy.folder(kind), env)
        if warning and warning not in notes:
            notes.append(warning)
    return notes


def _folder_text(policy: IngestPolicy, kind: Kind, hide_paths: bool) -> str:
    folder = policy.folder(kind)
    return f"`{folder.name}/`" if hide_paths else f"`{folder}`"


def build_files_tab(
    service: GenerationService,
    policy: IngestPolicy,
    checkpoint: gr.Dropdown,
    library_version: gr.State,
    checkpoint_choices: Callable[[], list[str]],
    *,
    hide_paths: bool = False,
    env: dict[str, str] | None = None,
    admin_check: Callable[[str, str], str | None] | None = None,
) -> None:
    """The tab's components and events (inside a `gr.Tab`). With `admin_check` (a shared
    server), adding files is an admin action: it asks for the admin credential and is
    refused with the check's reason."""
    hide = hide_paths
    labels = ["LoRA", "Checkpoint"] if policy.checkpoints else ["LoRA"]
    where = f"LoRAs go to {_folder_text(policy, 'lora', hide)}"
    if policy.checkpoints:
        where += f", checkpoints to {_folder_text(policy, 'checkpoint', hide)}"
    gr.Markdown(
        f"Add `.safetensors` files while the server runs. {where}. Each file is checked "
        f"(header, architecture, at most {_megabytes(policy.max_bytes)}) before it is moved "
        "into place; an existing file is replaced only when you tick *Overwrite*. New files "
        "appear in the LoRA list and the checkpoint menu right away."
        + ("" if policy.checkpoints else " Checkpoints cannot be added here (admin setting).")
    )
    for note in storage_notes(policy, env):
        gr.Markdown(f"⚠️ **Temporary disk.** {note}", elem_id="files_storage_warning")

    def refreshed(summary: str) -> tuple[str, gr.Dropdown, str]:
        return summary, gr.Dropdown(choices=checkpoint_choices()), library_signature(service)

    with gr.Row(visible=admin_check is not None):
        admin_user = gr.Textbox(label="Admin user", elem_id="files_admin_user")
        admin_password = gr.Textbox(
            label="Admin password", type="password", elem_id="files_admin_password"
        )
    with gr.Group():
        gr.Markdown("### Upload")
        if not policy.uploads:
            gr.Markdown("Uploads are disabled on this server (`--disable-uploads`).")
        with gr.Column(visible=policy.uploads):
            files = gr.File(
                label="Files (.safetensors)",
                file_count="multiple",
                file_types=[".safetensors"],
                type="filepath",
                elem_id="upload_files",
            )
            with gr.Row():
                upload_kind = gr.Radio(
                    labels, value="LoRA", label="Kind", visible=len(labels) > 1, scale=2
                )
                upload_overwrite = gr.Checkbox(
                    False, label="Overwrite an existing file of the same name", scale=2
                )
                upload = gr.Button("Add uploaded files", variant="primary", elem_id="upload_add")
        upload_result = gr.Markdown(elem_id="upload_result")

    with gr.Group():
        gr.Markdown("### Download by reference")
        if not policy.downloads:
            gr.Markdown("Downloads are disabled on this server (`--disable-downloads`).")
        with gr.Column(visible=policy.downloads):
            reference = gr.Textbox(
                label="Hub reference or link",
                placeholder="org/repo, org/repo/file.safetensors@revision, or https://…",
                elem_id="download_reference",
            )
            with gr.Row():
                download_kind = gr.Radio(
                    labels, value="LoRA", label="Kind", visible=len(labels) > 1, scale=1
                )
                sha256 = gr.Textbox(
                    label="sha256 (optional)", max_lines=1, scale=3, elem_id="download_sha256"
                )
                download_overwrite = gr.Checkbox(
                    False, label="Overwrite an existing file of the same name", scale=1
                )
            download = gr.Button("Download", variant="primary", elem_id="download_add")
        download_result = gr.Markdown(elem_id="download_result")

    def refusal(user: str, password: str) -> str | None:
        if admin_check is None:
            return None
        reason = admin_check(user or "", password or "")
        return None if reason is None else f"Not added: adding files is an admin action; {reason}"

    def on_upload(
        paths: list[str] | None, kind: str, overwrite: bool, user: str, password: str
    ) -> tuple[str, None, gr.Dropdown, str]:
        refused = refusal(user, password)
        if refused is not None:
            return refused, None, gr.skip(), gr.skip()
        summary = add_uploads(service, policy, paths, kind, overwrite, hide_paths=hide)
        text, models, version = refreshed(summary)
        return text, None, models, version

    def on_download(
        text: str,
        kind: str,
        digest: str,
        overwrite: bool,
        user: str,
        password: str,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 - Gradio injects it
    ) -> tuple[str, gr.Dropdown, str]:
        refused = refusal(user, password)
        if refused is not None:
            return refused, gr.skip(), gr.skip()
        summary = add_download(
            service, policy, text, kind, digest, overwrite, hide_paths=hide, progress=progress
        )
        return refreshed(summary)

    # Queued (they move files), two at a time; not part of the API.
    light: dict[str, Any] = {"concurrency_limit": 2, "api_visibility": "private"}
    upload.click(
        on_upload,
        [files, upload_kind, upload_overwrite, admin_user, admin_password],
        [upload_result, files, checkpoint, library_version],
        **light,
    )
    download.click(
        on_download,
        [reference, download_kind, sha256, download_overwrite, admin_user, admin_password],
        [download_result, checkpoint, library_version],
        **light,
    )
