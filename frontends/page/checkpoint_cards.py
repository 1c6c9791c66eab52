"""Checkpoint cards beside the LoRA and embedding cards (A1111's "Checkpoints" extra
networks tab): preview, family, kind, size and hash of each checkpoint; **Use** makes it
the session's checkpoint; a file that cannot be used is greyed out with why."""

from __future__ import annotations

import html

import gradio as gr

from frontends.page.lora_panel import ONE_RENDER_AT_A_TIME, QUICK
from frontends.page.stack import human_size, preview_uri
from pipelines.folders.checkpoints import CheckpointEntry
from pipelines.interface import GenerationService


def card_html(entry: CheckpointEntry) -> str:
    """One card: preview, path, family, file or folder, size, short hash, or why it
    cannot be used."""
    uri = preview_uri(entry.preview)
    image = (
        f'<img class="lora-thumb" src="{uri}" alt="">'
        if uri
        else '<div class="lora-thumb lora-nothumb">no preview</div>'
    )
    kind = "diffusers folder" if entry.kind == "diffusers" else "single file"
    facts = [entry.family or "family unknown", kind]
    if entry.kind == "single":
        facts.append(human_size(entry.size))
    facts.append(f"[{entry.short_hash}]" if entry.short_hash else "hash pending")
    why = f'<div class="lora-why">⚠ {html.escape(entry.error)}</div>' if entry.error else ""
    return (
        f'<div class="checkpoint-card-body">{image}'
        f'<div class="lora-name">{html.escape(entry.relpath)}</div>'
        f'<div class="lora-facts">{html.escape(" · ".join(facts))}</div>{why}</div>'
    )


def matches(entry: CheckpointEntry, query: str) -> bool:
    words = (query or "").lower().split()
    haystack = f"{entry.relpath} {entry.family or ''} {entry.sha256 or ''}".lower()
    return all(word in haystack for word in words)


def listing_signature(service: GenerationService) -> str:
    """Changes when a checkpoint, its hash, preview or usability changes."""
    return repr([(e.title, e.error, e.preview) for e in service.checkpoints()])


def build_checkpoint_cards(service: GenerationService, checkpoint: gr.Dropdown) -> gr.State:
    """The searchable cards (inside the caller's layout). They re-render when the returned
    state takes a new `listing_signature`: the page's one poll of the checkpoint listing
    sets it, with the checkpoint dropdowns."""
    version = gr.State(listing_signature(service))  # a first poll changes nothing
    search = gr.Textbox(
        placeholder="search checkpoints (path, family, hash)",
        show_label=False,
        elem_id="checkpoint_search",
    )

    @gr.render(inputs=[search, version], **ONE_RENDER_AT_A_TIME)
    def cards(query: str, _version: str) -> None:
        everything = service.checkpoints()
        shown = [entry for entry in everything if matches(entry, query)]
        gr.Markdown(f"{len(shown)} of {len(everything)} checkpoints", elem_id="checkpoint_count")
        with gr.Row(elem_classes=["lora-cards"]):
            for entry in shown:
                classes = ["lora-card", "checkpoint-card"]
                if entry.error:
                    classes.append("lora-incompatible")
                with gr.Column(elem_classes=classes, min_width=180, scale=0):
                    gr.HTML(card_html(entry))
                    use = gr.Button(
                        "Use", size="sm", interactive=not entry.error, key=("ckpt", entry.key)
                    )
                use.click(lambda title=entry.title: title, None, checkpoint, **QUICK)

    return version
