"""The Embeddings cards beside the LoRA cards: every textual-inversion embedding, the ones
the session's checkpoint can use first; a card's buttons write its name into the prompt or
the negative prompt, or take it out again when it is there (A1111's card click toggles the
name, with its `extra_networks_add_text_separator`, a space). Embeddings made for other text
encoders are greyed out with the reason, as the LoRA cards grey out another family's."""

from __future__ import annotations

import hashlib
import html
import re
from typing import Any

import gradio as gr

from frontends.page.lora_panel import ONE_RENDER_AT_A_TIME, QUICK
from frontends.page.stack import human_size, preview_uri
from pipelines.embeddings import FAMILY_TEXT_WIDTHS, EmbeddingListing
from pipelines.folders.embeddings import Embedding, EmbeddingEntry
from pipelines.interface import GenerationService

SEPARATOR = " "
"""A1111's `extra_networks_add_text_separator` default: what goes before an added name."""


def toggle_word(prompt: str, name: str) -> str:
    """A1111's card click: `name` (and the separator before it) taken out of `prompt` where
    it stands as a word; when it is not there, added at the end after the separator.

    Example:
        >>> toggle_word("a hill", "ink"), toggle_word("a hill ink", "ink")
        ('a hill ink', 'a hill')
    """
    text = prompt or ""
    word = re.compile(rf"(?:{re.escape(SEPARATOR)})?(?<![\w-]){re.escape(name)}(?![\w-])")
    removed = word.sub("", text)
    if removed != text:
        return removed
    if text and not text[-1].isspace():
        return f"{text}{SEPARATOR}{name}"
    return f"{text}{name}"


def made_for(embedding: Embedding) -> str:
    """The family an embedding's vector widths are for ("SD1", "SDXL", ...), else the widths."""
    widths = tuple(sorted(embedding.vectors))
    for family, family_widths in FAMILY_TEXT_WIDTHS.items():
        if widths == family_widths:
            return family
    return "+".join(str(width) for width in widths)


def card_html(
    name: str, entry: EmbeddingEntry, embedding: Embedding | None, reason: str | None
) -> str:
    """One card: preview (`name.preview.png` beside the file), name, what it was made for,
    vectors, training step, size; for one this checkpoint cannot use, why."""
    uri = preview_uri(entry.preview)
    image = (
        f'<img class="lora-thumb" src="{uri}" alt="">'
        if uri
        else '<div class="lora-thumb lora-nothumb">no preview</div>'
    )
    facts = [human_size(entry.size)]
    if embedding is not None:
        vectors = f"{embedding.count} vector{'s' if embedding.count != 1 else ''}"
        facts[:0] = [made_for(embedding), vectors]
        if embedding.step is not None:
            facts.append(f"step {embedding.step}")
    why = f'<div class="lora-why">⚠ {html.escape(reason)}</div>' if reason else ""
    return (
        f'<div class="embedding-card-body" title="{html.escape(entry.relpath)}">'
        f'{image}<div class="embedding-name">{html.escape(name)}</div>'
        f'<div class="embedding-facts">{html.escape(" · ".join(facts))}</div>{why}</div>'
    )


def listing_signature(listing: EmbeddingListing) -> str:
    """Changes whenever an embedding appears, disappears, changes or becomes (un)usable."""
    digest = hashlib.sha256()
    for group, items in (("loaded", listing.loaded), ("skipped", listing.skipped)):
        for name, item in sorted(items.items()):
            entry = item[0]
            digest.update(f"{group}|{name}|{entry.mtime_ns}|{entry.preview}\n".encode())
    return digest.hexdigest()[:16]


def build_embeddings(
    service: GenerationService,
    prompt: gr.Textbox,
    negative_prompt: gr.Textbox,
    checkpoint: gr.Dropdown,
    refresh_seconds: float,
) -> None:
    """The searchable cards (inside the caller's layout) and their events; the list follows
    the session's checkpoint and picks up new files by itself."""
    # today's signature: the first poll re-renders (and loses a click) only on a change
    version = gr.State(listing_signature(service.embeddings()))
    with gr.Row():
        search = gr.Textbox(
            placeholder="search embeddings", show_label=False, elem_id="embedding_search", scale=4
        )
        refresh = gr.Button("Refresh", elem_id="embedding_refresh", scale=0, min_width=100)
    timer = gr.Timer(refresh_seconds)

    @gr.render(inputs=[search, checkpoint, version], **ONE_RENDER_AT_A_TIME)
    def cards(query: str, choice: str | None, _version: str) -> None:
        listing = service.embeddings(choice or None)
        wanted = (query or "").strip().lower()
        usable = sorted(name for name in listing.loaded if wanted in name.lower())
        other = sorted(name for name in listing.skipped if wanted in name.lower())
        total = len(listing.loaded) + len(listing.skipped)
        gr.Markdown(
            f"{len(usable) + len(other)} of {total} embeddings · {len(listing.loaded)} usable "
            "with this checkpoint"
            if total
            else "No embeddings: put `.pt`, `.safetensors` or `.bin` files in `embeddings/`.",
            elem_id="embedding_count",
        )
        with gr.Row(elem_classes=["embedding-cards"]):
            for name in usable:
                entry, embedding = listing.loaded[name]
                with gr.Column(elem_classes=["embedding-card"], min_width=160, scale=0):
                    gr.HTML(card_html(name, entry, embedding, None))
                    with gr.Row():
                        to_prompt = gr.Button("Prompt", size="sm", key=("emb-p", name))
                        to_negative = gr.Button("Negative", size="sm", key=("emb-n", name))
                _card_events(name, to_prompt, to_negative, prompt, negative_prompt)
            for name in other:
                entry, skipped, reason = listing.skipped[name]
                classes = ["embedding-card", "embedding-incompatible"]
                with gr.Column(elem_classes=classes, min_width=160, scale=0):
                    gr.HTML(card_html(name, entry, skipped, reason))

    def rescan() -> str:
        service.rescan()
        return listing_signature(service.embeddings())

    def poll(current: str) -> Any:
        signature = listing_signature(service.embeddings())
        return gr.skip() if signature == current else signature

    refresh.click(rescan, None, version, **QUICK)
    timer.tick(poll, version, version, **QUICK)


def _card_events(
    name: str,
    to_prompt: gr.Button,
    to_negative: gr.Button,
    prompt: gr.Textbox,
    negative_prompt: gr.Textbox,
) -> None:
    to_prompt.click(lambda text: toggle_word(text, name), prompt, prompt, **QUICK)
    to_negative.click(
        lambda text: toggle_word(text, name), negative_prompt, negative_prompt, **QUICK
    )
