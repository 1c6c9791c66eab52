"""The LoRA folders: what each file is, A1111-compatible names and hashes, safe lookup.

A request can only ever name an entry the scan listed (exact name, then alias, then a
unique case-insensitive match), so no request reaches a path outside the listing. Files
are classified from their safetensors header alone (keys and shapes), so a scan never
loads tensors; the tensors themselves go through `LoraLibrary.cache` when applied.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipelines.errors import NotFoundError, UnusableFileError
from pipelines.lora import (
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    LoraFileCache,
    ParsedLora,
    detect_lora_architecture,
    file_format,
    group_keys,
    group_rank,
    not_a_lora_reason,
    parts_touched,
)
from pipelines.registry import HASH_CHUNK, HashCache, sha256_of_file, walk_files
from pipelines.safeload import (
    is_file_quietly,
    non_utf8_name_error,
    printable_name,
    read_safetensors_header,
)

log = logging.getLogger(__name__)

LORA_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
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


def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash: sha256 of a safetensors file's bytes after its header (metadata
    edits do not change it); other files hash whole."""
    if path.suffix.lower() != ".safetensors":
        return sha256_of_file(path)
    header = read_safetensors_header(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(header.data_offset)
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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


def _preview(path: Path) -> Path | None:
    stem = path.stem if path.is_file() else path.name
    for suffix in PREVIEW_SUFFIXES:
        candidate = path.parent / f"{stem}{suffix}"
        if is_file_quietly(candidate):
            return candidate
    return None


@dataclass(frozen=True)
class _Facts:
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
) -> _Facts:
    groups, _unknown = group_keys(shapes)
    if not any(g.kind != "unsupported" for g in groups.values()):
        return _Facts(error=not_a_lora_reason(shapes), metadata=metadata)
    arch = detect_lora_architecture(groups, metadata)
    ranks = sorted({r for g in groups.values() if (r := group_rank(g))})
    notes = (arch.disagreement,) if arch.disagreement else ()
    return _Facts(
        format=file_format(groups, folder=folder),
        families=arch.families,
        ranks=tuple(ranks),
        parts=parts_touched(groups),
        metadata=metadata,
        notes=notes,
    )


def classify(path: Path) -> _Facts:
    """Classify a file or PEFT folder from its header; pickles must be loaded (safely)."""
    try:
        if path.is_dir():
            weights = next((path / w for w in PEFT_WEIGHTS if (path / w).is_file()), None)
            if weights is None:
                return _Facts(error=f"{path.name}: PEFT folder without adapter weights")
            if weights.suffix == ".safetensors":
                header = read_safetensors_header(weights)
                shapes = {k: v.shape for k, v in header.tensors.items()}
                return _facts_from_shapes(shapes, {}, folder=True)
            parsed = LoraFileCache(0).get(path)
            return _facts_from_parsed(parsed, folder=True)
        if path.stat().st_size == 0:
            return _Facts(error=f"{path.name}: empty file (0 bytes)")
        if path.suffix.lower() == ".safetensors":
            header = read_safetensors_header(path)
            shapes = {k: v.shape for k, v in header.tensors.items()}
            facts = _facts_from_shapes(shapes, dict(header.metadata), folder=False)
            if facts.error:
                return replace(facts, error=f"{path.name}: {facts.error}")
            return facts
        return _facts_from_parsed(LoraFileCache(0).get(path), folder=False)
    except UnusableFileError as error:
        return _Facts(error=error.message)
    except OSError as error:
        return _Facts(error=f"{path.name}: cannot be read ({error.strerror})")


def _facts_from_parsed(parsed: ParsedLora, folder: bool) -> _Facts:
    ranks = sorted({r for g in parsed.groups.values() if (r := group_rank(g))})
    notes = (parsed.architecture.disagreement,) if parsed.architecture.disagreement else ()
    return _Facts(
        format=parsed.format if not folder else file_format(parsed.groups, folder=True),
        families=parsed.architecture.families,
        ranks=tuple(ranks),
        parts=parts_touched(parsed.groups),
        metadata=parsed.metadata,
        notes=notes,
    )


class LoraLibrary:
    """The LoRA folders (registry) plus the parsed-file cache the appliers share.

    Example:
        >>> library = LoraLibrary([Path("loras")], HashCache(None))  # doctest: +SKIP
        >>> library.scan(); library.resolve("ink").short_hash  # doctest: +SKIP
        '7c6bad76eb54'
    """

    def __init__(
        self,
        roots: Iterable[Path],
        hashes: HashCache | None = None,
        cache_budget_bytes: int = 2 << 30,
    ) -> None:
        self.roots = tuple(roots)
        self.hashes = hashes if hashes is not None else HashCache(None)
        self.cache = LoraFileCache(cache_budget_bytes)
        self._lock = threading.Lock()
        self._entries: dict[str, LoraEntry] = {}
        self._ambiguous: dict[str, list[str]] = {}
        self._facts: dict[tuple[str, int, int], _Facts] = {}

    # -- scanning

    def scan(self) -> list[LoraEntry]:
        """Rescan every folder; unchanged files keep their classification and hashes."""
        found: list[tuple[Path, Path]] = []
        for root in self.roots:
            if root.is_dir():
                found.extend((root, p) for p in walk_files(root, LORA_EXTENSIONS, PEFT_CONFIG))
        stems: Counter[str] = Counter(self._stem(path) for _, path in found)
        entries: dict[str, LoraEntry] = {}
        ambiguous: dict[str, list[str]] = {}
        for root, path in found:
            entry = self._entry_for(root, path, unique=stems[self._stem(path)] == 1)
            if entry is None:
                continue
            if entry.name in entries:  # same relative path in two roots: first root wins
                log.warning("LoRA %s is hidden by %s", path, entries[entry.name].path)
                continue
            entries[entry.name] = entry
            if stems[self._stem(path)] > 1:
                ambiguous.setdefault(self._stem(path), []).append(entry.name)
        with self._lock:
            self._entries = entries
            self._ambiguous = ambiguous
        return self.entries()

    @staticmethod
    def _stem(path: Path) -> str:
        return path.name if path.is_dir() else path.stem

    def _entry_for(self, root: Path, path: Path, unique: bool) -> LoraEntry | None:
        try:
            stat = path.stat()
            if path.is_dir():
                weights = next((path / w for w in PEFT_WEIGHTS if (path / w).is_file()), path)
                stat = weights.stat()
        except OSError:
            return None
        relpath = path.relative_to(root).as_posix()
        name = (
            self._stem(path)
            if unique
            else relpath.rsplit(".", 1)[0]
            if path.is_file()
            else (relpath)
        )
        bad_name = non_utf8_name_error(relpath)
        name, relpath = printable_name(name), printable_name(relpath)
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._facts:
            self._facts[key] = _Facts(error=bad_name) if bad_name else classify(path)
        facts = self._facts[key]
        sidecar, sidecar_note = _sidecar(path)
        metadata = facts.metadata
        alias = str(metadata.get("ss_output_name") or name)
        lora_hash = metadata.get("sshs_model_hash") or self.hashes.get(path, "addnet")
        notes = facts.notes + ((sidecar_note,) if sidecar_note else ())
        return LoraEntry(
            name=name,
            alias=alias,
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
            preview=_preview(path),
            sidecar=sidecar,
            lora_hash=lora_hash,
            sha256=None if path.is_dir() else self.hashes.get(path, "sha256"),
            notes=notes,
        )

    def hash_all(self) -> None:
        """Compute missing LoRA and full-file hashes (run in a background thread)."""
        for entry in self.entries():
            if entry.path.is_dir() or entry.error:
                continue
            try:
                lora_hash = entry.lora_hash or self.hashes.compute(
                    entry.path, "addnet", addnet_hash
                )
                sha = entry.sha256 or self.hashes.compute(entry.path, "sha256", sha256_of_file)
            except (OSError, UnusableFileError) as error:
                log.warning("cannot hash %s: %s", entry.path, error)
                continue
            with self._lock:
                current = self._entries.get(entry.name)
                if current is not None and current.mtime_ns == entry.mtime_ns:
                    self._entries[entry.name] = replace(current, lora_hash=lora_hash, sha256=sha)

    def entries(self) -> list[LoraEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.name.lower())

    # -- lookup

    def resolve(self, name: str) -> LoraEntry:
        """A request-supplied name -> the listed entry it names (never a path).

        Exact name, then alias, then a unique case-insensitive match of either. Raises
        NotFoundError listing close matches; UnusableFileError when ambiguous.
        """
        wanted = name.strip() if isinstance(name, str) else ""
        with self._lock:
            entries = list(self._entries.values())
            ambiguous = dict(self._ambiguous)
        if wanted in ambiguous:
            raise UnusableFileError(
                f"LoRA name '{wanted}' is ambiguous: {', '.join(sorted(ambiguous[wanted]))}; "
                "use the path",
                field="loras",
            )
        for matcher in (
            lambda e: e.name == wanted,
            lambda e: e.alias == wanted,
            lambda e: wanted.lower() in (e.name.lower(), e.alias.lower()),
        ):
            found = [e for e in entries if matcher(e)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise UnusableFileError(
                    f"LoRA name '{wanted}' is ambiguous: "
                    + ", ".join(sorted(e.name for e in found)),
                    field="loras",
                )
        names = sorted({e.name for e in entries} | {e.alias for e in entries})
        close = difflib.get_close_matches(wanted, names, n=5, cutoff=0.4)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        raise NotFoundError(f"unknown LoRA '{wanted}'{hint}", field="loras")

    def load(self, entry: LoraEntry) -> ParsedLora:
        """The parsed tensors (cached); an unusable file raises UnusableFileError."""
        if entry.error:
            raise UnusableFileError(entry.error, field="loras")
        return self.cache.get(entry.path)
