"""The upscaler kind (ESRGAN, Real-ESRGAN, SwinIR, DAT, HAT, ... through spandrel): named
by file stem as A1111 names them; a file spandrel cannot use is listed with the reason."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipelines.errors import UnusableFileError
from pipelines.folders.hashing import HashCache

UPSCALER_EXTENSIONS = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
UPSCALER_SUBFOLDERS = ("ESRGAN", "RealESRGAN", "SwinIR", "DAT")
"""A1111's upscaler folders inside `models/` (CONTRACT "Model folders")."""


@dataclass(frozen=True)
class UpscalerEntry:
    """One listed upscaler file; `error` is set (and `architecture` None) when unusable."""

    name: str
    path: Path
    relpath: str
    size: int
    mtime_ns: int
    architecture: str | None = None  # spandrel's name: "ESRGAN", "SwinIR", "DAT", ...
    scale: int | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        return self.name

    @property
    def title(self) -> str:
        return self.name


@dataclass(frozen=True)
class UpscalerFacts:
    architecture: str | None = None
    scale: int | None = None
    error: str | None = None


def classify_upscaler(path: Path) -> UpscalerFacts:
    """Build the network once (on the CPU) to learn its architecture and scale."""
    from pipelines.upscalers import load_upscaler

    try:
        descriptor = load_upscaler(path)
    except UnusableFileError as error:
        return UpscalerFacts(error=error.message)
    except OSError as error:
        return UpscalerFacts(error=f"{path.name}: cannot be read ({error.strerror})")
    return UpscalerFacts(descriptor.architecture.name, descriptor.scale)


def upscaler_entry(
    root: Path,
    path: Path,
    relpath: str,
    name: str,
    facts: UpscalerFacts,
    stat: os.stat_result,
    hashes: HashCache,
) -> UpscalerEntry:
    return UpscalerEntry(
        name=name,
        path=path,
        relpath=relpath,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        architecture=facts.architecture,
        scale=facts.scale,
        error=facts.error,
    )


def upscaler_matchers(entry: UpscalerEntry, wanted: str) -> tuple[bool, ...]:
    """Exact name, then case-insensitive (A1111 compares names exactly; clients vary)."""
    return (entry.name == wanted, entry.name.lower() == wanted.lower())
