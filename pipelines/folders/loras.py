"""The LoRA kind: A1111-compatible names, aliases, hashes, trigger words and previews.

Files are classified from their safetensors header alone (keys and shapes), so a scan never
loads tensors; the tensors themselves go through the adapter stack's file cache when applied.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines.errors import UnusableFileError
from pipelines.folders.hashing import HashCache
from pipelines.lora.family import detect_lora_architecture
from pipelines.lora.files import ParsedLora, not_a_lora_reason, read_lora_file
from pipelines.lora.keys import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    file_format,
    group_keys,
    group_rank,
    parts_touched,
)
from pipelines.safeload import is_file_quietly, read_safetensors_header

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")
"""A1111 lists the first three; `.bin` is diffusers' `pytorch_lora_weights.bin` (a pickle, read
with `weights_only` like the others)."""
LORA_MARKER = PEFT_CONFIG
PREVIEW_SUFFIXES = (".png", ".preview.png", ".jpg", ".jpeg", ".preview.jpg", ".webp")
TRIGGER_WORDS = 10


@dataclass(frozen=True)
class LoraEntry:
    """One listed LoRA. `error` is set (and `architecture` None) when it is unusable."""

    name: str
    alias: str
    path: Path
    relpath: str  # relative to its lora folder, "/" separators, with extension
    size: int
    mtime_ns: int
    format: str = "unknown"
    architecture: str | None = None  # "SD1" / "SD2" / "SDXL", or "SD1/SD2" when undecided
    families: tuple[str, ...] = ()
    error: str | None = None
    ranks: tuple[int, ...] = ()
    parts: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict, compare=False)
    trigger_words: tuple[str, ...] = ()
    preview: Path | None = None
    sidecar: dict[str, Any] = field(default_factory=dict, compare=False)
    lora_hash: str | None = None  # sshs_model_hash, else the addnet hash (full hex)
    sha256: str | None = None
    notes: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The registry's unique key (the listed name)."""
        return self.name

    @property
    def title(self) -> str:
        return self.name

    @property
    def short_hash(self) -> str | None:
        """The 12 hex digits A1111 writes into `Lora hashes`."""
        return self.lora_hash[:12] if self.lora_hash else None

    @property
    def activation_text(self) -> str:
        return str(self.sidecar.get("activation text", ""))

    @property
    def preferred_weight(self) -> float | None:
        value = self.sidecar.get("preferred weight")
        return float(value) if isinstance(value, int | float) and value else None

    @property
    def usable(self) -> bool:
        return self.error is None


def trigger_words(metadata: dict[str, str], limit: int = TRIGGER_WORDS) -> tuple[str, ...]:
    """The most frequent training tags of kohya's `ss_tag_frequency` (all datasets)."""
    raw = metadata.get("ss_tag_frequency")
    if not raw:
        return ()
    try:
        datasets = json.loads(raw)
    except ValueError:
        return ()
    counts: Counter[str] = Counter()
    if isinstance(datasets, dict):
        for tags in datasets.values():
            if isinstance(tags, dict):
                for tag, count in tags.items():
                    if isinstance(count, int | float):
                        counts[str(tag).strip()] += int(count)
    return tuple(tag for tag, _ in counts.most_common(limit) if tag)


def _sidecar(path: Path) -> tuple[dict[str, Any], str | None]:
    file = path.with_suffix(".json") if path.is_file() else path.parent / f"{path.name}.json"
    if not is_file_quietly(file):
        return {}, None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # refuses lone surrogates
    except (OSError, ValueError) as error:
        return {}, f"sidecar {file.name} is unreadable: {error}"
    return (data, None) if isinstance(data, dict) else ({}, f"sidecar {file.name} is no object")


def preview_beside(path: Path) -> Path | None:
    """A card's preview as A1111 finds it: `NAME.png`, `NAME.preview.png`, ... beside the
    file (or the folder)."""
    stem = path.stem if path.is_file() else path.name
    for suffix in PREVIEW_SUFFIXES:
        candidate = path.parent / f"{stem}{suffix}"
        if is_file_quietly(candidate):
            return candidate
    return None


@dataclass(frozen=True)
class LoraFacts:
    """What the file's header says (cached by path + size + mtime)."""

    format: str = "unknown"
    families: tuple[str, ...] = ()
    error: str | None = None
    ranks: tuple[int, ...] = ()
    parts: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict, compare=False)
    notes: tuple[str, ...] = ()


def _facts_from_shapes(
    shapes: dict[str, tuple[int, ...]], metadata: dict[str, str], folder: bool
) -> LoraFacts:
    groups, _unknown = group_keys(shapes)
    if not any(g.kind != "unsupported" for g in groups.values()):
        return LoraFacts(error=not_a_lora_reason(shapes), metadata=metadata)
    arch = detect_lora_architecture(groups, metadata)
    ranks = sorted({r for g in groups.values() if (r := group_rank(g))})
    notes = (arch.disagreement,) if arch.disagreement else ()
    return LoraFacts(
        format=file_format(groups, folder=folder),
        families=arch.families,
        ranks=tuple(ranks),
        parts=parts_touched(groups),
        metadata=metadata,
        notes=notes,
    )


def classify_lora(path: Path) -> LoraFacts:
    """Classify a file or PEFT folder from its header; pickles must be loaded (safely)."""
    try:
        if path.is_dir():
            weights = next((path / w for w in PEFT_WEIGHTS if (path / w).is_file()), None)
            if weights is None:
                return LoraFacts(error=f"{path.name}: PEFT folder without adapter weights")
            if weights.suffix == ".safetensors":
                header = read_safetensors_header(weights)
                shapes = {k: v.shape for k, v in header.tensors.items()}
                return _facts_from_shapes(shapes, {}, folder=True)
            parsed = read_lora_file(path)
            return _facts_from_parsed(parsed, folder=True)
        if path.stat().st_size == 0:
            return LoraFacts(error=f"{path.name}: empty file (0 bytes)")
        if path.suffix.lower() == ".safetensors":
            header = read_safetensors_header(path)
            shapes = {k: v.shape for k, v in header.tensors.items()}
            facts = _facts_from_shapes(shapes, dict(header.metadata), folder=False)
            if facts.error:
                return replace(facts, error=f"{path.name}: {facts.error}")
            return facts
        return _facts_from_parsed(read_lora_file(path), folder=False)
    except UnusableFileError as error:
        return LoraFacts(error=error.message)
    except OSError as error:
        return LoraFacts(error=f"{path.name}: cannot be read ({error.strerror})")


def _facts_from_parsed(parsed: ParsedLora, folder: bool) -> LoraFacts:
    ranks = sorted({r for g in parsed.groups.values() if (r := group_rank(g))})
    notes = (parsed.architecture.disagreement,) if parsed.architecture.disagreement else ()
    return LoraFacts(
        format=parsed.format if not folder else file_format(parsed.groups, folder=True),
        families=parsed.architecture.families,
        ranks=tuple(ranks),
        parts=parts_touched(parsed.groups),
        metadata=parsed.metadata,
        notes=notes,
    )


def lora_entry(
    root: Path,
    path: Path,
    relpath: str,
    name: str,
    facts: LoraFacts,
    stat: os.stat_result,
    hashes: HashCache,
) -> LoraEntry:
    sidecar, sidecar_note = _sidecar(path)
    metadata = facts.metadata
    return LoraEntry(
        name=name,
        alias=str(metadata.get("ss_output_name") or name),
        path=path,
        relpath=relpath,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        format=facts.format,
        architecture="/".join(facts.families) if facts.families else None,
        families=facts.families,
        error=facts.error,
        ranks=facts.ranks,
        parts=facts.parts,
        metadata=metadata,
        trigger_words=trigger_words(metadata),
        preview=preview_beside(path),
        sidecar=sidecar,
        lora_hash=metadata.get("sshs_model_hash") or hashes.get(path, "addnet"),
        sha256=None if path.is_dir() else hashes.get(path, "sha256"),
        notes=facts.notes + ((sidecar_note,) if sidecar_note else ()),
    )


def lora_weights(path: Path) -> Path:
    """The file whose size and mtime stand for a LoRA (a PEFT folder: its weights)."""
    if path.is_dir():
        return next((path / w for w in PEFT_WEIGHTS if (path / w).is_file()), path)
    return path


def hash_lora(entry: LoraEntry, hashes: HashCache) -> LoraEntry | None:
    """The entry with its A1111 LoRA hash and full sha256, or None when there is nothing to
    hash (PEFT folders, unusable files)."""
    if entry.path.is_dir() or entry.error or (entry.lora_hash and entry.sha256):
        return None
    lora_hash = entry.lora_hash or hashes.compute(entry.path, "addnet")
    sha = entry.sha256 or hashes.compute(entry.path, "sha256")
    return replace(entry, lora_hash=lora_hash, sha256=sha)


def lora_matchers(entry: LoraEntry, wanted: str) -> tuple[bool, ...]:
    """Lookup tiers (CONTRACT): exact name, then alias, then a case-insensitive match."""
    return (
        entry.name == wanted,
        entry.alias == wanted,
        wanted.lower() in (entry.name.lower(), entry.alias.lower()),
    )
