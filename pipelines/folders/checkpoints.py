"""The checkpoint kind: single files and diffusers folders, classified from headers."""

from __future__ import annotations

import os
import stat as stat_kinds
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.architecture import Architecture, detect_architecture
from pipelines.errors import UnusableFileError
from pipelines.folders.hashing import HashCache
from pipelines.folders.loras import preview_beside
from pipelines.loading import architecture_of_diffusers_folder
from pipelines.safeload import read_safetensors_header

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class CheckpointEntry:
    """One listed checkpoint. `error` is set (and `architecture` None) when unusable."""

    relpath: str  # relative to its models folder, with extension, "/" separators
    path: Path
    root: Path
    kind: str  # "single" or "diffusers"
    size: int
    mtime_ns: int
    architecture: Architecture | None = None
    error: str | None = None
    sha256: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    preview: Path | None = None  # `NAME.png` / `NAME.preview.png` beside it, for its card

    @property
    def key(self) -> str:
        """The registry's unique key (the relative path)."""
        return self.relpath

    @property
    def model_name(self) -> str:
        """Relative path without extension (A1111 `model_name`)."""
        if self.kind == "diffusers":
            return self.relpath
        return self.relpath.rsplit(".", 1)[0]

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.relpath} [{self.short_hash}]" if self.short_hash else self.relpath

    @property
    def infotext_name(self) -> str:
        """Basename without extension: A1111's infotext `Model:` value."""
        return Path(self.model_name).name

    @property
    def family(self) -> str | None:
        return self.architecture.family if self.architecture else None


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint's header says (cached by path + size + mtime)."""

    architecture: Architecture | None = None
    error: str | None = None


def classify_checkpoint(path: Path) -> CheckpointFacts:
    """Architecture from the safetensors header or diffusers config; pickles are
    classified when loaded (their architecture is learnt then)."""
    if path.is_dir():
        try:
            return CheckpointFacts(architecture_of_diffusers_folder(path))
        except UnusableFileError as error:
            return CheckpointFacts(error=error.message)
    if path.stat().st_size == 0:
        return CheckpointFacts(error=f"{path.name}: empty file (0 bytes)")
    if path.suffix.lower() != ".safetensors":
        return CheckpointFacts()
    try:
        header = read_safetensors_header(path)
        shapes = {name: info.shape for name, info in header.tensors.items()}
        return CheckpointFacts(detect_architecture(shapes, source=path.name).architecture)
    except UnusableFileError as error:
        return CheckpointFacts(error=error.message)
    except ValueError as error:
        return CheckpointFacts(error=str(error))


def checkpoint_entry(
    root: Path,
    path: Path,
    relpath: str,
    name: str,
    facts: CheckpointFacts,
    stat: os.stat_result,
    hashes: HashCache,
) -> CheckpointEntry:
    single = not stat_kinds.S_ISDIR(stat.st_mode)
    return CheckpointEntry(
        relpath=relpath,
        path=path,
        root=root,
        kind="single" if single else "diffusers",
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        architecture=facts.architecture,
        error=facts.error,
        sha256=hashes.get(path) if single else None,
        preview=preview_beside(path),
    )


def hash_checkpoint(entry: CheckpointEntry, hashes: HashCache) -> CheckpointEntry | None:
    """The entry with its sha256, or None when it has no file hash to compute."""
    if entry.kind != "single" or entry.sha256 or entry.error:
        return None
    return CheckpointEntry(**{**entry.__dict__, "sha256": hashes.compute(entry.path, "sha256")})


def checkpoint_matchers(entry: CheckpointEntry, wanted: str) -> tuple[bool, ...]:
    """Lookup tiers, tried in order: the exact title or relative path (always wins, so a
    listed title resolves even when a folder and a file share a model name), the exact
    model_name, case-insensitive, the file name or infotext name, a hash prefix."""
    low = wanted.lower()
    bare = low.strip("[]")
    return (
        wanted in (entry.title, entry.relpath),
        wanted == entry.model_name,
        low in (entry.title.lower(), entry.relpath.lower(), entry.model_name.lower()),
        wanted in (Path(entry.relpath).name, entry.infotext_name),
        bool(entry.sha256) and len(bare) >= 8 and (entry.sha256 or "").startswith(bare),
    )
