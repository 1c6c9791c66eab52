"""The textual-inversion embedding kind: A1111 `.pt` (`string_to_param`), `.safetensors`
(`emb_params`, or SDXL's `clip_l` + `clip_g`) and diffusers `.bin` (`{token: tensor}`),
named by file stem (the word that activates it in a prompt, as in A1111)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines.errors import UnusableFileError
from pipelines.folders.hashing import HashCache
from pipelines.folders.loras import PREVIEW_SUFFIXES
from pipelines.safeload import (
    is_file_quietly,
    load_pickle,
    load_state_dict,
    read_safetensors_header,
)

EMBEDDING_EXTENSIONS = (".pt", ".safetensors", ".bin")
EMBEDDINGS_SUBFOLDER = "embeddings"
ROLE_WIDTHS = {"clip_l": 768, "clip_g": 1280, "clip_h": 1024}
"""The text-encoder width each vector set is for (SD1/SDXL CLIP-L, SDXL CLIP-G, SD2)."""


@dataclass(frozen=True)
class Embedding:
    """One embedding's vectors per text encoder width (`{768: [n, 768]}`, or SDXL's
    `{768: ..., 1280: ...}`), with A1111's training facts when the file has them."""

    name: str
    vectors: dict[int, torch.Tensor]
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None

    @property
    def count(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


@dataclass(frozen=True)
class EmbeddingEntry:
    """One listed embedding file; `error` is set when it is none."""

    name: str
    relpath: str
    path: Path
    size: int
    mtime_ns: int
    error: str | None = None
    sha256: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    preview: Path | None = None  # `name.preview.png` or `name.png` beside it, as A1111's cards

    @property
    def key(self) -> str:
        return self.name

    @property
    def title(self) -> str:
        return self.name

    @property
    def short_hash(self) -> str | None:
        """A1111's `TI hashes` value: the first 12 hex digits of the file's sha256."""
        return self.sha256[:12] if self.sha256 else None


@dataclass(frozen=True)
class EmbeddingFacts:
    error: str | None = None


def _as_matrix(value: object, where: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.ndim not in (1, 2) or 0 in value.shape:
        raise UnusableFileError(f"{where}: not an embedding vector set")
    matrix = value.detach().float()
    return matrix.unsqueeze(0) if matrix.ndim == 1 else matrix


def read_embedding(path: Path, name: str) -> Embedding:
    """The vectors of an embedding file (UnusableFileError naming the file if none)."""
    where = path.name
    if path.suffix.lower() == ".safetensors":
        names = set(read_safetensors_header(path).tensors)  # before reading any tensor data
        if not (len(names) == 1 or names <= {"clip_l", "clip_g", "emb_params"}):
            raise UnusableFileError(
                f"{where}: holds {len(names)} tensors, not a textual-inversion embedding "
                "(emb_params, clip_l + clip_g, or one {token: tensor}); a LoRA or a checkpoint "
                "belongs in its own folder"
            )
        state: dict[str, object] = dict(load_state_dict(path))
    else:
        loaded = load_pickle(path)
        if not isinstance(loaded, dict):
            raise UnusableFileError(f"{where}: holds a {type(loaded).__name__}, not an embedding")
        state = loaded
    facts: dict[str, object] = {}
    if "string_to_param" in state:  # A1111 / textual_inversion .pt
        params = state["string_to_param"]
        tensors = list(params.values()) if hasattr(params, "values") else []
        if len(tensors) != 1:
            raise UnusableFileError(f"{where}: string_to_param must hold one vector set")
        matrices = [_as_matrix(tensors[0], where)]
        facts = {k: state.get(k) for k in ("step", "sd_checkpoint", "sd_checkpoint_name")}
    elif "clip_l" in state or "clip_g" in state:  # SDXL
        matrices = [_as_matrix(state[k], where) for k in ("clip_l", "clip_g") if k in state]
    elif "emb_params" in state:
        matrices = [_as_matrix(state["emb_params"], where)]
    else:
        tensors = [v for v in state.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1 or len(state) != 1:  # diffusers: {token: tensor}
            raise UnusableFileError(
                f"{where}: not a textual-inversion embedding (no string_to_param, emb_params, "
                "clip_l/clip_g, or single {token: tensor})"
            )
        matrices = [_as_matrix(tensors[0], where)]
    vectors = {int(m.shape[1]): m for m in matrices}
    if len({m.shape[0] for m in matrices}) != 1 or len(vectors) != len(matrices):
        raise UnusableFileError(f"{where}: its vector sets disagree in count or width")
    step = facts.get("step")
    checkpoint, checkpoint_name = facts.get("sd_checkpoint"), facts.get("sd_checkpoint_name")
    return Embedding(
        name,
        vectors,
        step=step if isinstance(step, int) else None,
        sd_checkpoint=checkpoint if isinstance(checkpoint, str) else None,
        sd_checkpoint_name=checkpoint_name if isinstance(checkpoint_name, str) else None,
    )


def classify_embedding(path: Path) -> EmbeddingFacts:
    """Read the file once (embeddings are a few KB) to list it with its problem, if any."""
    try:
        read_embedding(path, path.stem)
    except UnusableFileError as error:
        return EmbeddingFacts(error=error.message)
    return EmbeddingFacts()


def embedding_entry(
    root: Path,
    path: Path,
    relpath: str,
    name: str,
    facts: EmbeddingFacts,
    stat: os.stat_result,
    hashes: HashCache,
) -> EmbeddingEntry:
    return EmbeddingEntry(
        name=name,
        relpath=relpath,
        path=path,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        error=facts.error,
        sha256=hashes.get(path, "sha256"),
        preview=next(
            (
                candidate
                for suffix in PREVIEW_SUFFIXES
                if is_file_quietly(candidate := path.parent / f"{path.stem}{suffix}")
            ),
            None,
        ),
    )


def hash_embedding(entry: EmbeddingEntry, hashes: HashCache) -> EmbeddingEntry | None:
    if entry.sha256 or entry.error:
        return None
    return EmbeddingEntry(**{**entry.__dict__, "sha256": hashes.compute(entry.path, "sha256")})


def embedding_matchers(entry: EmbeddingEntry, wanted: str) -> tuple[bool, ...]:
    return (entry.name == wanted, entry.name.lower() == wanted.lower())
