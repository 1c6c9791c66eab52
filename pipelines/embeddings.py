"""Which textual-inversion embeddings a model can use, loaded once per file version.

A1111 loads every embedding whose vectors fit the model's text encoders and skips the
rest with the reason (an SD1 embedding on SDXL, an SDXL one on SD1, ...); a prompt then
activates one by writing its name. Files are a few KB, so all fitting ones stay loaded.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

from pipelines.errors import UnusableFileError
from pipelines.folders.embeddings import Embedding, EmbeddingEntry, read_embedding
from pipelines.folders.registry import ModelFolders
from pipelines.prompt import EmbeddingLookup, PromptEncoder

log = logging.getLogger(__name__)

FAMILY_TEXT_WIDTHS = {"SD1": (768,), "SD2": (1024,), "SDXL": (768, 1280)}
"""Real checkpoints' text-encoder widths, for listing before a model is loaded."""
WIDTH_NAMES = {768: "CLIP-L (SD1, SDXL)", 1024: "OpenCLIP-H (SD2)", 1280: "OpenCLIP-G (SDXL)"}


@dataclass(frozen=True)
class EmbeddingListing:
    """A1111's `/embeddings` for one model: the usable ones and the skipped with why."""

    loaded: dict[str, tuple[EmbeddingEntry, Embedding]]
    skipped: dict[str, tuple[EmbeddingEntry, Embedding | None, str]]


def _describe(widths: Sequence[int]) -> str:
    return " + ".join(f"{w} ({WIDTH_NAMES.get(w, 'unknown')})" for w in widths)


def fit(embedding: Embedding, widths: Sequence[int]) -> str | None:
    """Why `embedding` cannot be used with text encoders of `widths` (None: it can)."""
    if sorted(embedding.vectors) == sorted(widths):  # A1111: the whole shape must match
        return None
    return (
        f"made for {_describe(sorted(embedding.vectors))}; this model's text encoders are "
        f"{_describe(widths)}"
    )


class EmbeddingStore:
    """The embeddings of the folders, read once per file version and sorted per model."""

    def __init__(self, folders: ModelFolders) -> None:
        self.folders = folders
        self._read: dict[tuple[str, int, int], Embedding] = {}
        # the last lookup made, by its encoder (not kept alive) and set of files
        self._lookup: (
            tuple[weakref.ref[PromptEncoder], tuple[object, ...], EmbeddingLookup] | None
        ) = None
        self._lock = threading.Lock()

    def _embedding(self, entry: EmbeddingEntry) -> Embedding:
        key = (str(entry.path), entry.size, entry.mtime_ns)
        with self._lock:
            found = self._read.get(key)
        if found is None:
            found = read_embedding(entry.path, entry.name)
            with self._lock:
                self._read[key] = found
        return found

    def listing(self, widths: Sequence[int]) -> EmbeddingListing:
        """Every listed embedding, usable with text encoders of `widths` or skipped with why;
        versions of files no longer listed are forgotten."""
        loaded: dict[str, tuple[EmbeddingEntry, Embedding]] = {}
        skipped: dict[str, tuple[EmbeddingEntry, Embedding | None, str]] = {}
        entries = self.folders.entries("embedding")
        current = {(str(e.path), e.size, e.mtime_ns) for e in entries}
        with self._lock:
            self._read = {key: value for key, value in self._read.items() if key in current}
        for entry in entries:
            if entry.error:
                skipped[entry.name] = (entry, None, entry.error)
                continue
            try:
                embedding = self._embedding(entry)
            except (UnusableFileError, OSError) as error:
                skipped[entry.name] = (entry, None, str(error))
                continue
            reason = fit(embedding, widths)
            if reason is None:
                loaded[entry.name] = (entry, embedding)
            else:
                skipped[entry.name] = (entry, embedding, reason)
        return EmbeddingListing(loaded, skipped)

    def lookup(self, encoder: PromptEncoder) -> tuple[EmbeddingLookup, dict[str, EmbeddingEntry]]:
        """The usable embeddings as the prompt encoder matches them, and their entries."""
        listing = self.listing(encoder.widths)
        key = tuple((e.name, str(e.path), e.size, e.mtime_ns) for e, _ in listing.loaded.values())
        entries = {name: entry for name, (entry, _) in listing.loaded.items()}
        cache_key = (tuple(encoder.widths), key)
        with self._lock:
            known = self._lookup
        if known is not None and known[0]() is encoder and known[1] == cache_key:
            return known[2], entries  # the names are tokenized once per set and model
        vectors = {name: embedding.vectors for name, (_, embedding) in listing.loaded.items()}
        made = EmbeddingLookup(vectors, encoder.token_ids, key)
        with self._lock:
            self._lookup = (weakref.ref(encoder), cache_key, made)
        return made, entries
