"""The Embeddings list beside the LoRA cards: the checkpoint's usable textual-inversion
embeddings, one card each (name, vectors, training step); a click writes the name into
the prompt, as A1111's Textual Inversion cards do. Skipped ones are listed with why."""

from __future__ import annotations

from typing import Any

import gradio as gr

from frontends.page.lora_panel import QUICK
from pipelines.embeddings import EmbeddingListing
from pipelines.interface import GenerationService

HEADERS = ["Embedding", "Vectors", "Step"]


def embedding_rows(listing: EmbeddingListing) -> list[list[Any]]:
    """One row per usable embedding: its name (the word to write), vectors, step."""
    return [
        [name, embedding.count, embedding.step if embedding.step is not None else ""]
        for name, (_, embedding) in sorted(listing.loaded.items(), key=lambda i: i[0].lower())
    ]


def skipped_text(listing: EmbeddingListing) -> str:
    if not listing.skipped:
        return ""
    lines = [f"- `{name}`: {reason}" for name, (_, _, reason) in sorted(listing.skipped.items())]
    return "Not usable with this checkpoint:\n" + "\n".join(lines)


def insert_word(prompt: str, name: str) -> str:
    """The prompt with `name` added at its end (separated as A1111 does: ", ")."""
    text = (prompt or "").rstrip()
    return f"{text}, {name}" if text else name


def build_embeddings(service: GenerationService, prompt: gr.Textbox) -> None:
    """The list (inside the caller's layout) and its events."""
    listing = service.embeddings()
    cards = gr.Dataset(
        components=[gr.Textbox(visible=False), gr.Number(visible=False), gr.Textbox(visible=False)],
        headers=HEADERS,
        samples=embedding_rows(listing) or [["(none)", "", ""]],
        label="Embeddings (click to add to the prompt)",
        samples_per_page=24,
        elem_id="embedding_cards",
    )
    skipped = gr.Markdown(skipped_text(listing), elem_id="embedding_skipped")
    refresh = gr.Button("Refresh embeddings", scale=0, elem_id="embedding_refresh")

    def chosen(row: list[Any], text: str) -> str:
        name = str(row[0]) if row else ""
        if not name or name == "(none)":
            return gr.skip()
        return insert_word(text, name)

    cards.click(chosen, [cards, prompt], prompt, **QUICK)

    def reload() -> tuple[Any, str]:
        service.rescan()
        current = service.embeddings()
        return gr.Dataset(samples=embedding_rows(current) or [["(none)", "", ""]]), skipped_text(
            current
        )

    refresh.click(reload, None, [cards, skipped], **QUICK)
