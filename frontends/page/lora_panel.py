"""The LoRA panel: the session's stack (rows with weight sliders) and the card list."""

from __future__ import annotations

import hashlib
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from frontends.page.errors import user_error
from frontends.page.fewstep_panel import wire_use
from frontends.page.stack import (
    NO_PRESET,
    WEIGHT_MAX,
    WEIGHT_MIN,
    WEIGHT_STEP,
    add_row,
    blocks_value,
    card_html,
    conflict_notes,
    coverage_html,
    incompatibility,
    insert_text,
    matches,
    move_tags_to_stack,
    remove_row,
    rows_from_value,
    set_row,
    trigger_text,
)
from pipelines.errors import LorastackError
from pipelines.fewstep import suggest_for_lora
from pipelines.interface import GenerationService
from pipelines.schema import LBW_PRESETS

ONE_RENDER_AT_A_TIME: dict[str, Any] = {"concurrency_limit": 1, "concurrency_id": "render"}
"""For every `gr.render`: a render registers its components' events in the page's one
table of functions, and two renders at once (two tabs, or a checkpoint change during a
listing refresh) made Gradio iterate that table while it grew ("dictionary changed size
during iteration")."""

QUICK: dict[str, Any] = {
    "concurrency_limit": None,
    "api_visibility": "private",
    "show_progress": "hidden",
}
"""Light page events: never queued behind a generation, never part of the API."""

FILTERS = ("All", "Compatible", "SD1", "SD2", "SDXL")


@dataclass
class LoraPanel:
    """The components other parts of the page read or fill."""

    stack: gr.JSON  # the rows; the txt2img event's `loras` input
    rows_version: gr.State  # bumped when rows are added or removed (re-renders the rows)
    library_version: gr.State  # the listing's signature (re-renders the cards)


def library_signature(service: GenerationService) -> str:
    """Changes whenever a LoRA appears, disappears, changes, or gets its hash."""
    digest = hashlib.sha256()
    for entry in service.loras():
        digest.update(f"{entry.name}|{entry.mtime_ns}|{entry.error}|{entry.lora_hash}\n".encode())
        digest.update(f"{entry.preview}|{_mtime(entry.preview)}\n".encode())  # a new preview
    return digest.hexdigest()[:16]


def _mtime(path: Path | None) -> int | None:
    try:
        return path.stat().st_mtime_ns if path is not None else None
    except OSError:
        return None


def friendly(error: LorastackError) -> gr.Error:
    return user_error(error.message)


def build_stack(
    page: gr.Blocks,
    prompt: gr.Textbox,
    checkpoint: gr.Dropdown | None = None,
    fits: Callable[[str, list, str | None], list[str]] | None = None,
) -> LoraPanel:
    """The stack rows under the prompt: name, weight (−10..10, the range of every LoRA
    weight; typed or dragged), optional text-encoder weight, remove; plus the prompt-tag
    rule note and "tags → stack". With `checkpoint` and `fits` (prompt, rows, choice ->
    notes), the notes also flag rows and tags that do not fit the chosen checkpoint."""
    stack = gr.JSON(value=[], visible=False, label="loras", elem_id="lora_stack")
    rows_version = gr.State(0)
    library_version = gr.State("")
    conflicts = gr.Markdown(elem_id="stack_notes")
    with gr.Row():
        gr.Markdown(
            "**LoRA stack** — rows and `<lora:name:w>` prompt tags both apply; a LoRA "
            "named in both takes the tag's weight."
        )
        move = gr.Button("Move prompt tags into the stack", size="sm", scale=0)

    @gr.render(inputs=[stack], triggers=[rows_version.change, page.load], **ONE_RENDER_AT_A_TIME)
    def rows(value: Any) -> None:
        current = rows_from_value(value)
        if not current:
            gr.Markdown("*Empty: add LoRAs from the list below.*", elem_id="stack_empty")
        for row in current:
            _stack_row(row, stack, rows_version)

    def notes(text: str, value: Any, choice: str | None = None) -> str:
        rows = rows_from_value(value)
        try:
            found = conflict_notes(text, rows)
        except LorastackError as error:
            found = [error.message]
        if fits is not None:
            found += fits(text, rows, choice)
        return "\n\n".join(f"⚠ {html.escape(note)}" for note in found)

    sources = [prompt, stack] if checkpoint is None else [prompt, stack, checkpoint]
    prompt.change(notes, sources, conflicts, **QUICK)
    stack.change(notes, sources, conflicts, **QUICK)
    if checkpoint is not None:
        checkpoint.change(notes, sources, conflicts, **QUICK)

    def move_tags(text: str, value: Any, version: int) -> tuple[str, list, int]:
        try:
            text, moved = move_tags_to_stack(text, rows_from_value(value))
        except LorastackError as error:
            raise friendly(error) from error
        return text, moved, version + 1

    move.click(move_tags, [prompt, stack, rows_version], [prompt, stack, rows_version], **QUICK)
    return LoraPanel(stack, rows_version, library_version)


def _stack_row(row: dict[str, Any], stack: gr.JSON, rows_version: gr.State) -> None:
    """One row; its events only touch this row's name."""
    name = row["name"]
    with gr.Row(elem_classes=["stack-row"], equal_height=True):
        gr.Markdown(f"**{name}**", elem_classes=["stack-name"])
        weight = gr.Slider(
            WEIGHT_MIN,
            WEIGHT_MAX,
            value=row["weight"],
            step=WEIGHT_STEP,
            label=f"{name} weight",
            key=("weight", name),
            elem_classes=["stack-weight"],
            scale=4,
            interactive=True,
        )
        te = gr.Number(
            value=row.get("te_weight"),
            label="text encoder (empty: same)",
            key=("te", name),
            scale=1,
            minimum=WEIGHT_MIN,
            maximum=WEIGHT_MAX,
            interactive=True,
        )
        remove = gr.Button("✕", key=("remove", name), size="sm", scale=0, min_width=40)
    blocks = row.get("blocks") or {}
    with (
        gr.Accordion(
            f"{name}: block weights",
            open=bool(blocks),
            key=("blocks", name),
            elem_classes=["stack-blocks"],
        ),
        gr.Row(),
    ):
        sliders = [
            gr.Slider(
                WEIGHT_MIN,
                WEIGHT_MAX,
                value=blocks.get(key, 1.0),
                step=WEIGHT_STEP,
                label=f"{name} {key}",
                info=info,
                key=(key, name),
                elem_classes=[f"stack-block-{key}"],
                interactive=True,
            )
            for key, info in (
                ("in", "UNet down blocks"),
                ("mid", "UNet mid block"),
                ("out", "UNet up blocks"),
            )
        ]
        lbw = blocks.get("lbw")
        preset = gr.Dropdown(
            [NO_PRESET, *LBW_PRESETS],
            value=lbw if isinstance(lbw, str) else NO_PRESET,
            label=f"{name} lbw preset",
            info="lora-block-weight preset (replaces the sliders)",
            key=("preset", name),
            elem_classes=["stack-block-preset"],
            interactive=True,
        )

    def set_weight(value: float, rows: Any) -> list:
        return set_row(rows_from_value(rows), name, "weight", float(value))

    def set_te(value: float | None, rows: Any) -> list:
        return set_row(rows_from_value(rows), name, "te_weight", value)

    def set_blocks(down: float, mid: float, up: float, chosen: str | None, rows: Any) -> list:
        return set_row(rows_from_value(rows), name, "blocks", blocks_value(down, mid, up, chosen))

    def drop(rows: Any, version: int) -> tuple[list, int]:
        return remove_row(rows_from_value(rows), name), version + 1

    weight.change(set_weight, [weight, stack], stack, **QUICK)
    te.change(set_te, [te, stack], stack, **QUICK)
    for control in (*sliders, preset):
        control.change(set_blocks, [*sliders, preset, stack], stack, **QUICK)
    remove.click(drop, [stack, rows_version], [stack, rows_version], **QUICK)


def build_library(
    service: GenerationService,
    panel: LoraPanel,
    prompt: gr.Textbox,
    checkpoint: gr.Dropdown,
    family_of: Any,
    refresh_seconds: float,
    settings: Sequence[Any] = (),
    make_preview: Callable[[gr.Button, str], None] | None = None,
) -> gr.Button:
    """The searchable card list; returns its refresh button (it also rescans checkpoints).
    With `settings` (the sampler, schedule, steps and CFG controls), a few-step LoRA's card
    gets "Use suggested settings"; with `make_preview` (wires a button to a LoRA name),
    every card gets "Make preview"."""
    with gr.Row():
        search = gr.Textbox(
            placeholder="search name, alias, trigger words",
            show_label=False,
            elem_id="lora_search",
            scale=4,
        )
        kind = gr.Radio(list(FILTERS), value="All", show_label=False, scale=3)
        refresh = gr.Button("Refresh", elem_id="lora_refresh", scale=0, min_width=100)
    timer = gr.Timer(refresh_seconds)
    # today's signature: the first poll re-renders (and loses a click) only on a change
    panel.library_version.value = library_signature(service)

    @gr.render(inputs=[search, kind, checkpoint, panel.library_version], **ONE_RENDER_AT_A_TIME)
    def cards(query: str, wanted: str, choice: str | None, _version: str) -> None:
        family = family_of(choice)
        everything = service.loras()
        shown = [e for e in everything if matches(e, query, wanted, family)]
        gr.Markdown(
            f"{len(shown)} of {len(everything)} LoRAs"
            + (f" · checkpoint family {family}" if family else ""),
            elem_id="lora_count",
        )
        with gr.Row(elem_classes=["lora-cards"]):
            for entry in shown:
                reason = incompatibility(entry, family)
                classes = ["lora-card", "lora-incompatible"] if reason else ["lora-card"]
                with gr.Column(elem_classes=classes, min_width=180, scale=0):
                    gr.HTML(card_html(entry, reason), js_on_load=None)
                    with gr.Row():
                        add = gr.Button("Add", size="sm", interactive=reason is None)
                        words = trigger_text(entry)
                        insert = gr.Button("Triggers", size="sm", visible=bool(words))
                        check = gr.Button("Coverage", size="sm", interactive=not entry.error)
                    report = gr.HTML("", elem_classes=["lora-coverage-report"])
                    _coverage_event(service, entry.name, check, report, checkpoint)
                    if make_preview is not None and not entry.error:
                        make = gr.Button("Make preview", size="sm", elem_classes=["lora-preview"])
                        make_preview(make, entry.name)
                    suggestion = suggest_for_lora(entry)
                    if suggestion is not None and settings:
                        use = gr.Button("Use suggested settings", size="sm")
                        wire_use(use, lambda found=suggestion: found, settings)
                _card_events(service, entry.name, words, add, insert, panel, prompt)

    def rescan() -> str:
        service.rescan()
        return library_signature(service)

    def poll(version: str) -> Any:
        signature = library_signature(service)
        return gr.skip() if signature == version else signature

    refresh.click(rescan, None, panel.library_version, **QUICK)
    timer.tick(poll, panel.library_version, panel.library_version, **QUICK)
    return refresh


def _coverage_event(
    service: GenerationService,
    name: str,
    check: gr.Button,
    report: gr.HTML,
    checkpoint: gr.Dropdown,
) -> None:
    """The card's Coverage button: the report against the session's checkpoint."""

    def show(choice: str | None) -> str:
        try:
            return coverage_html(service.lora_coverage(name, choice))
        except LorastackError as error:
            raise friendly(error) from error

    check.click(show, checkpoint, report, **QUICK)


def _card_events(
    service: GenerationService,
    name: str,
    words: str,
    add: gr.Button,
    insert: gr.Button,
    panel: LoraPanel,
    prompt: gr.Textbox,
) -> None:
    def add_to_stack(rows: Any, version: int) -> tuple[list, int]:
        try:
            entry = service.resolve_lora(name)
        except LorastackError as error:
            raise friendly(error) from error
        return add_row(rows_from_value(rows), entry), version + 1

    add.click(
        add_to_stack,
        [panel.stack, panel.rows_version],
        [panel.stack, panel.rows_version],
        **QUICK,
    )
    insert.click(lambda text: insert_text(text, words), prompt, prompt, **QUICK)
