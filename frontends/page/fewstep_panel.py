"""Few-step models on the page: the suggestion beside the checkpoint choice and the
one-click "Use suggested settings" (sampler, schedule type, steps, CFG) it and the LoRA
cards share. The rule table itself is the engine's (`pipelines.fewstep`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from pipelines.errors import LorastackError
from pipelines.fewstep import FewStepSettings, suggest_for_checkpoint
from pipelines.interface import GenerationService
from pipelines.samplers import SCHEDULER_LABELS, SCHEDULER_NAMES

TARGETS = ("sampler_name", "scheduler", "steps", "cfg_scale")
"""The txt2img controls "Use suggested settings" fills, in `suggested_values` order."""

QUICK: dict[str, Any] = {
    "concurrency_limit": None,
    "api_visibility": "private",
    "show_progress": "hidden",
}


def suggested_values(suggestion: FewStepSettings) -> tuple[str, str, int, float]:
    """(sampler, schedule type label, steps, CFG) as the page's controls hold them."""
    label = dict(zip(SCHEDULER_NAMES, SCHEDULER_LABELS, strict=True))[suggestion.scheduler]
    return suggestion.sampler_name, label, suggestion.steps, suggestion.cfg_scale


def checkpoint_suggestion(service: GenerationService, choice: str | None) -> FewStepSettings | None:
    """The suggestion for the chosen checkpoint (empty choice: the loaded one), or None."""
    if not choice:
        model = service.current_model()
        choice = model.title if model is not None else None
    if not choice:
        return None
    try:
        entry = service.resolve_checkpoint(choice)
    except LorastackError:
        return None
    return suggest_for_checkpoint(entry)


def checkpoint_note(suggestion: FewStepSettings | None) -> str:
    """Markdown beside the checkpoint choice ("" for a plain checkpoint)."""
    if suggestion is None:
        return ""
    note = f" — {suggestion.note}" if suggestion.note else ""
    return f"⚡ **{suggestion.summary()}**{note} ([model card]({suggestion.source}))"


def build_checkpoint_suggestion(service: GenerationService) -> tuple[gr.Markdown, gr.Button]:
    """The note and button under the checkpoint choice (wired by `wire_checkpoint`)."""
    with gr.Row():
        note = gr.Markdown("", elem_id="checkpoint_fewstep")
        button = gr.Button(
            "Use suggested settings",
            size="sm",
            scale=0,
            min_width=180,
            visible=False,
            elem_id="checkpoint_fewstep_use",
        )
    return note, button


def wire_checkpoint(
    service: GenerationService,
    page: gr.Blocks,
    checkpoint: gr.Dropdown,
    note: gr.Markdown,
    button: gr.Button,
    targets: Sequence[Any],
) -> None:
    """Show the chosen checkpoint's suggestion; the button applies it to `targets`."""

    def show(choice: str | None) -> tuple[str, Any]:
        suggestion = checkpoint_suggestion(service, choice)
        return checkpoint_note(suggestion), gr.Button(visible=suggestion is not None)

    def use(choice: str | None) -> tuple[Any, ...]:
        suggestion = checkpoint_suggestion(service, choice)
        if suggestion is None:
            return tuple(gr.skip() for _ in TARGETS)
        return suggested_values(suggestion)

    checkpoint.change(show, checkpoint, [note, button], **QUICK)
    page.load(show, checkpoint, [note, button], **QUICK)
    button.click(use, checkpoint, list(targets), **QUICK)


def wire_use(
    button: gr.Button, suggestion: Callable[[], FewStepSettings | None], targets: Sequence[Any]
) -> None:
    """A LoRA card's button: the suggestion's values into `targets`."""

    def use() -> tuple[Any, ...]:
        found = suggestion()
        return suggested_values(found) if found else tuple(gr.skip() for _ in TARGETS)

    button.click(use, None, list(targets), **QUICK)
