"""`ModelFolders`: every kind of model file scanned, listed, resolved and hashed one way.

A request can only ever name an entry the scan listed, so no request reaches a path
outside the listing. Operator-made symlinks inside the folders are followed (people share
one model folder between tools); loops are cut. What the registry learns about a file after
the scan (a load failure, the architecture of a pickle) is kept by path + size + mtime, and
the operator's own paths (`--ckpt /elsewhere/model.safetensors`) are kept too, so a rescan
never forgets either. Hashes are computed by one background pass at a time, never by a
generation.
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from pipelines.errors import NotFoundError, UnusableFileError
from pipelines.folders.checkpoints import (
    CHECKPOINT_EXTENSIONS,
    CheckpointEntry,
    CheckpointFacts,
    checkpoint_entry,
    checkpoint_matchers,
    classify_checkpoint,
    hash_checkpoint,
)
from pipelines.folders.controlnets import (
    ANNOTATORS_SUBFOLDER,
    CONTROLNET_EXTENSIONS,
    CONTROLNET_SUBFOLDER,
    ControlNetEntry,
    ControlNetFacts,
    classify_controlnet,
    controlnet_entry,
    controlnet_matchers,
)
from pipelines.folders.embeddings import (
    EMBEDDING_EXTENSIONS,
    EMBEDDINGS_SUBFOLDER,
    EmbeddingEntry,
    EmbeddingFacts,
    classify_embedding,
    embedding_entry,
    embedding_matchers,
    hash_embedding,
)
from pipelines.folders.hashing import HashCache
from pipelines.folders.loras import (
    LORA_EXTENSIONS,
    LORA_MARKER,
    LoraEntry,
    LoraFacts,
    classify_lora,
    hash_lora,
    lora_entry,
    lora_matchers,
    lora_weights,
)
from pipelines.folders.upscalers import (
    UPSCALER_EXTENSIONS,
    UPSCALER_SUBFOLDERS,
    UpscalerEntry,
    UpscalerFacts,
    classify_upscaler,
    upscaler_entry,
    upscaler_matchers,
)
from pipelines.folders.vaes import (
    VAE_EXTENSIONS,
    VAE_SUBFOLDER,
    VaeEntry,
    VaeFacts,
    classify_vae,
    hash_vae,
    is_sidecar_vae,
    vae_entry,
    vae_matchers,
)
from pipelines.folders.walk import walk_files
from pipelines.safeload import non_utf8_name_error, printable_name

log = logging.getLogger(__name__)

OTHER_KIND_FOLDERS = (
    "Stable-diffusion",
    "Lora",
    "LyCORIS",
    "VAE",
    "VAE-approx",
    "embeddings",
    "ControlNet",
    "clip_vision",
    "ESRGAN",
    "RealESRGAN",
    "SwinIR",
    "DAT",
    "hypernetworks",
)
"""A1111's per-kind folders inside `models/`: the checkpoint scan never lists their files
(`Stable-diffusion` is a checkpoint root of its own, so its titles match A1111's)."""


class Entry(Protocol):
    """What the registry needs of every kind's entry."""

    @property
    def key(self) -> str: ...

    @property
    def title(self) -> str: ...

    path: Path
    size: int
    mtime_ns: int
    error: str | None


E = TypeVar("E", bound=Entry)


@dataclass(frozen=True)
class FolderKind(Generic[E]):
    """One kind of model file: how to find, classify, name, hash and look it up.

    `matchers(entry, wanted)` gives the lookup tiers in order; the first tier with exactly
    one match wins, a tier with several is an ambiguity error. With `stem_names`, entries
    are named by file stem unless two files share it (then by relative path, and the bare
    stem is ambiguous: A1111's LoRA rule); otherwise by relative path.
    """

    name: str
    label: str  # for messages: "checkpoint", "LoRA"
    field: str  # the request field an error names
    extensions: tuple[str, ...]
    marker: str | None
    classify: Callable[[Path], Any]
    build: Callable[[Path, Path, str, str, Any, os.stat_result, HashCache], E]
    identity: Callable[[Path], Path]  # the file whose size and mtime stand for the entry
    hash_entry: Callable[[E, HashCache], E | None]
    matchers: Callable[[E, str], tuple[bool, ...]]
    unusable: Callable[[str], Any]  # the kind's facts for a file it cannot read or name
    stem_names: bool = False
    skip_top: tuple[str, ...] = ()
    skip_file: Callable[[Path], bool] = lambda path: False  # found, but another kind's


CHECKPOINTS: FolderKind[CheckpointEntry] = FolderKind(
    name="checkpoint",
    label="checkpoint",
    field="checkpoint",
    extensions=CHECKPOINT_EXTENSIONS,
    marker="model_index.json",
    classify=classify_checkpoint,
    build=checkpoint_entry,
    identity=lambda path: path,
    hash_entry=hash_checkpoint,
    matchers=checkpoint_matchers,
    unusable=lambda reason: CheckpointFacts(error=reason),
    skip_top=OTHER_KIND_FOLDERS,
    skip_file=is_sidecar_vae,  # A1111's ext_blacklist: `model.vae.safetensors` is a VAE
)
LORAS: FolderKind[LoraEntry] = FolderKind(
    name="lora",
    label="LoRA",
    field="loras",
    extensions=LORA_EXTENSIONS,
    marker=LORA_MARKER,
    classify=classify_lora,
    build=lora_entry,
    identity=lora_weights,
    hash_entry=hash_lora,
    matchers=lora_matchers,
    unusable=lambda reason: LoraFacts(error=reason),
    stem_names=True,
)
UPSCALERS: FolderKind[UpscalerEntry] = FolderKind(
    name="upscaler",
    label="upscaler",
    field="upscaler",
    extensions=UPSCALER_EXTENSIONS,
    marker=None,
    classify=classify_upscaler,
    build=upscaler_entry,
    identity=lambda path: path,
    hash_entry=lambda entry, hashes: None,  # A1111 neither hashes nor records upscalers
    matchers=upscaler_matchers,
    unusable=lambda reason: UpscalerFacts(error=reason),
    stem_names=True,
)
VAES: FolderKind[VaeEntry] = FolderKind(
    name="vae",
    label="VAE",
    field="sd_vae",
    extensions=VAE_EXTENSIONS,
    marker="config.json",
    classify=classify_vae,
    build=vae_entry,
    identity=lambda path: path,
    hash_entry=hash_vae,
    matchers=vae_matchers,
    unusable=lambda reason: VaeFacts(error=reason),
)
EMBEDDINGS: FolderKind[EmbeddingEntry] = FolderKind(
    name="embedding",
    label="embedding",
    field="prompt",
    extensions=EMBEDDING_EXTENSIONS,
    marker=None,
    classify=classify_embedding,
    build=embedding_entry,
    identity=lambda path: path,
    hash_entry=hash_embedding,
    matchers=embedding_matchers,
    unusable=lambda reason: EmbeddingFacts(error=reason),
    stem_names=True,
)
CONTROLNETS: FolderKind[ControlNetEntry] = FolderKind(
    name="controlnet",
    label="ControlNet model",
    field="controlnet",
    extensions=CONTROLNET_EXTENSIONS,
    marker="config.json",
    classify=classify_controlnet,
    build=controlnet_entry,
    identity=lambda path: path,
    hash_entry=lambda entry, hashes: None,  # the old 8-digit hash is read while scanning
    matchers=controlnet_matchers,
    unusable=lambda reason: ControlNetFacts(error=reason),
    skip_top=(ANNOTATORS_SUBFOLDER,),
)
KINDS: tuple[FolderKind[Any], ...] = (
    CHECKPOINTS,
    LORAS,
    UPSCALERS,
    VAES,
    EMBEDDINGS,
    CONTROLNETS,
)


def default_roots(
    models_dirs: Sequence[Path],
    lora_dirs: Sequence[Path],
    upscaler_dirs: Sequence[Path] = (),
    vae_dirs: Sequence[Path] = (),
    embedding_dirs: Sequence[Path] = (),
    controlnet_dirs: Sequence[Path] = (),
) -> dict[str, tuple[Path, ...]]:
    """Each kind's roots (CONTRACT "Model folders"): its own folders, then the kind's
    A1111 subfolder inside every checkpoint folder, so an A1111 `models/` works as it is."""
    return {
        "checkpoint": (*models_dirs, *(d / "Stable-diffusion" for d in models_dirs)),
        "lora": (*lora_dirs, *(d / sub for d in models_dirs for sub in ("Lora", "LyCORIS"))),
        "upscaler": (
            *upscaler_dirs,
            *(d / sub for d in models_dirs for sub in UPSCALER_SUBFOLDERS),
        ),
        "vae": (*vae_dirs, *(d / VAE_SUBFOLDER for d in models_dirs)),
        "embedding": (*embedding_dirs, *(d / EMBEDDINGS_SUBFOLDER for d in models_dirs)),
        "controlnet": (*controlnet_dirs, *(d / CONTROLNET_SUBFOLDER for d in models_dirs)),
    }


@dataclass
class _Listing:
    entries: dict[str, Any]
    ambiguous: dict[str, list[str]]


class ModelFolders:
    """The registry of every kind's files.

    Args:
        roots: kind name -> folders to scan (see `default_roots`).
        hashes: the persistent hash cache (single-flight per file).
        kinds: the kind table (default: checkpoints and LoRAs).
    Example:
        >>> folders = ModelFolders(default_roots([Path("models")], [Path("loras")]),
        ...                        HashCache(None))  # doctest: +SKIP
        >>> folders.scan(); folders.resolve("lora", "ink").short_hash  # doctest: +SKIP
        '7c6bad76eb54'
    """

    def __init__(
        self,
        roots: Mapping[str, Iterable[Path]],
        hashes: HashCache,
        kinds: Sequence[FolderKind[Any]] = KINDS,
    ) -> None:
        self.kinds = {kind.name: kind for kind in kinds}
        self.roots = {name: tuple(roots.get(name, ())) for name in self.kinds}
        self.hashes = hashes
        self._lock = threading.Lock()
        self._listings = {name: _Listing({}, {}) for name in self.kinds}
        self._facts: dict[tuple[str, str, int, int], Any] = {}
        self._learnt: dict[tuple[str, str, int, int], dict[str, Any]] = {}
        self._operator_paths: dict[str, dict[str, Path]] = {name: {} for name in self.kinds}
        self._hashing = threading.Lock()
        self._hash_again = threading.Event()

    # -- scanning

    def scan(self, kind: str | None = None) -> None:
        """Rescan one kind (or all); unchanged files keep their classification and hashes."""
        for name in [kind] if kind else list(self.kinds):
            self._scan_kind(self.kinds[name])

    def _scan_kind(self, kind: FolderKind[Any]) -> None:
        found: list[tuple[Path, Path]] = []
        seen: set[Path] = set()
        for root in self.roots[kind.name]:
            if not root.is_dir():
                continue
            for path in walk_files(root, kind.extensions, kind.marker, kind.skip_top):
                if kind.skip_file(path):
                    continue
                real = path.resolve()
                if real not in seen:  # one file reachable from two roots is listed once
                    seen.add(real)
                    found.append((root, path))
        stems = Counter(_stem(path) for _, path in found)
        entries: dict[str, Any] = {}
        ambiguous: dict[str, list[str]] = {}
        for root, path in found:
            relpath = path.relative_to(root).as_posix()
            shared = kind.stem_names and stems[_stem(path)] > 1
            name = relpath if not kind.stem_names else _without_extension(path, relpath)
            if kind.stem_names and not shared:
                name = _stem(path)
            entry = self._entry(kind, root, path, relpath, name)
            if entry is None:
                continue
            if entry.key in entries:
                kept = entries[entry.key]
                log.warning("%s %s is hidden by %s", kind.label, path, kept.path)
                if hasattr(kept, "notes"):
                    note = f"name clash: {path} is hidden by {kept.path}"
                    entries[entry.key] = replace(kept, notes=(*kept.notes, note))
                continue
            entries[entry.key] = entry
            if shared:
                ambiguous.setdefault(_stem(path), []).append(entry.key)
        for key, path in self._operator_paths[kind.name].items():
            if key not in entries and path.exists():
                entry = self._entry(kind, path.parent, path, key, key)
                if entry is not None:
                    entries[key] = entry
        with self._lock:
            self._listings[kind.name] = _Listing(entries, ambiguous)

    def _entry(
        self, kind: FolderKind[Any], root: Path, path: Path, relpath: str, name: str
    ) -> Any | None:
        """The entry for one found file, with cached facts and what was learnt since."""
        try:
            stat = kind.identity(path).stat()
        except OSError:
            return None
        bad_name = non_utf8_name_error(relpath)
        relpath, name = printable_name(relpath), printable_name(name)
        fact_key = (kind.name, str(path), stat.st_size, stat.st_mtime_ns)
        if fact_key not in self._facts:
            if bad_name:
                self._facts[fact_key] = None
            else:
                try:
                    self._facts[fact_key] = kind.classify(path)
                except OSError as error:
                    self._facts[fact_key] = OSError(error.strerror)
        facts = self._facts[fact_key]
        if facts is None or isinstance(facts, OSError):
            facts = kind.unusable(bad_name or f"{path.name}: cannot be read ({facts})")
        entry = kind.build(root, path, relpath, name, facts, stat, self.hashes)
        learnt = self._learnt.get(fact_key)
        return replace(entry, **learnt) if learnt else entry

    def add_operator_path(self, kind: str, path: Path) -> Any:
        """List a file or folder outside the kind's folders. Only for the operator's own
        flags (`--ckpt PATH`); request-supplied names never reach this. The path stays
        listed across rescans, under its absolute path."""
        path = path.resolve()
        if not path.exists():
            raise NotFoundError(f"{kind} path {path} does not exist", field=self.kinds[kind].field)
        key = path.as_posix()
        found = self._entry(self.kinds[kind], path.parent, path, key, key)
        if found is None:
            raise NotFoundError(f"{kind} path {path} cannot be read", field=self.kinds[kind].field)
        with self._lock:
            self._operator_paths[kind][found.key] = path
            listing = self._listings[kind]
            listing.entries.setdefault(found.key, found)
            return listing.entries[found.key]

    def learn(self, kind: str, entry: Any, **facts: Any) -> Any:
        """Record facts learnt after the scan (a load failure's reason, a pickle's
        architecture, a hash); they stay with the file until it changes on disk."""
        fact_key = (kind, str(entry.path), entry.size, entry.mtime_ns)
        with self._lock:
            self._learnt.setdefault(fact_key, {}).update(facts)
            updated = replace(entry, **facts)
            listing = self._listings[kind]
            current = listing.entries.get(entry.key)
            if current is not None and current.mtime_ns == entry.mtime_ns:
                listing.entries[entry.key] = updated
        return updated

    # -- listing and lookup

    def entries(self, kind: str) -> list[Any]:
        """The kind's entries, sorted by key (case-insensitive)."""
        with self._lock:
            values = list(self._listings[kind].entries.values())
        return sorted(values, key=lambda e: e.key.lower())

    def resolve(self, kind: str, name: str) -> Any:
        """A request-supplied name -> the listed entry it names (never a path).

        Raises NotFoundError listing close matches, UnusableFileError when ambiguous.
        """
        spec = self.kinds[kind]
        wanted = name.strip() if isinstance(name, str) else ""
        with self._lock:
            listing = self._listings[kind]
            values = list(listing.entries.values())
            ambiguous = list(listing.ambiguous.get(wanted, ()))
        if ambiguous:
            raise UnusableFileError(
                f"{spec.label} name '{wanted}' is ambiguous: {', '.join(sorted(ambiguous))}; "
                "use the path",
                field=spec.field,
            )
        tiers = [(entry, spec.matchers(entry, wanted)) for entry in values] if wanted else []
        for tier in range(len(tiers[0][1]) if tiers else 0):
            hits = [entry for entry, matched in tiers if matched[tier]]
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise UnusableFileError(
                    f"{spec.label} name '{wanted}' is ambiguous: "
                    + ", ".join(sorted(e.key for e in hits)),
                    field=spec.field,
                )
        titles = sorted({e.title for e in values} | {getattr(e, "alias", e.title) for e in values})
        close = difflib.get_close_matches(wanted, titles, n=5, cutoff=0.3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        known = f"; known: {', '.join(titles[:20])}" if titles and not close else ""
        raise NotFoundError(f"unknown {spec.label} '{wanted}'{hint}{known}", field=spec.field)

    # -- hashing

    def hash_missing(self) -> None:
        """Compute every missing hash now (the background pass; tests call it directly)."""
        for kind in self.kinds.values():
            for entry in self.entries(kind.name):
                self.hash_one(kind.name, entry)

    def hash_one(self, kind: str, entry: Any) -> None:
        """Compute one entry's missing hashes and list them (a file changed meanwhile keeps
        its new listing). Concurrent calls for one file read it once (HashCache)."""
        spec = self.kinds[kind]
        try:
            hashed = spec.hash_entry(entry, self.hashes)
        except (OSError, UnusableFileError) as error:
            log.warning("cannot hash %s: %s", entry.path, error)
            return
        if hashed is None:
            return
        with self._lock:
            listing = self._listings[kind]
            current = listing.entries.get(entry.key)
            if current is not None and current.mtime_ns == entry.mtime_ns:
                listing.entries[entry.key] = replace(current, **_hash_fields(current, hashed))

    def hash_soon(self, kind: str, entry: Any) -> None:
        """Hash one entry in a thread of its own now (the checkpoint being loaded, so its
        infotexts get a Model hash soon), never in the caller's thread."""
        threading.Thread(
            target=self.hash_one, args=(kind, entry), name="hash-loaded", daemon=True
        ).start()

    def start_hashing(self) -> None:
        """Hash what is missing in one background thread; a request while a pass runs makes
        it run once more afterwards, so files found by a later scan are hashed too."""
        self._hash_again.set()
        if not self._hashing.acquire(blocking=False):
            return
        threading.Thread(target=self._hash_passes, name="hash-files", daemon=True).start()

    def _hash_passes(self) -> None:
        try:
            while self._hash_again.is_set():
                self._hash_again.clear()
                self.hash_missing()
        finally:
            self._hashing.release()
        if self._hash_again.is_set():  # asked for between the last pass and the release
            self.start_hashing()


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def _without_extension(path: Path, relpath: str) -> str:
    return relpath if path.is_dir() else relpath.rsplit(".", 1)[0]


def _hash_fields(current: Any, hashed: Any) -> dict[str, Any]:
    """The hash fields of `hashed` (so a concurrent `learn` of other facts survives)."""
    names = ("sha256", "lora_hash")
    return {n: getattr(hashed, n) for n in names if hasattr(hashed, n) and getattr(hashed, n)}
