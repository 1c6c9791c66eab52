"""The VAE kind: single files (LDM/SGM keys, with or without `first_stage_model.`, or
diffusers keys) and diffusers `AutoencoderKL` folders, named by file name as A1111 names
them (`vae-ft-mse-840000-ema-pruned.safetensors`), classified from the header."""

from __future__ import annotations

import json
import os
import stat as stat_kinds
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.errors import UnusableFileError
from pipelines.folders.hashing import HashCache
from pipelines.safeload import is_file_quietly, load_state_dict, read_safetensors_header

VAE_EXTENSIONS = (".safetensors", ".pt", ".ckpt")
VAE_SUBFOLDER = "VAE"
SIDECAR_SUFFIXES = (".vae.pt", ".vae.ckpt", ".vae.safetensors")
"""A1111's VAE beside its checkpoint (`model.vae.safetensors`), used by `Automatic`; the
checkpoint scan never lists such a file as a checkpoint."""

PREFIXES = ("first_stage_model.", "vae.")
DROPPED = ("loss.", "model_ema.")
"""Keys A1111 drops from a VAE file before loading it (`load_vae_dict`)."""
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass(frozen=True)
class VaeEntry:
    """One listed VAE; `error` is set when it cannot be one."""

    relpath: str
    path: Path
    size: int
    mtime_ns: int
    kind: str = "single"  # or "diffusers"
    latent_channels: int | None = None  # None: a pickle, learnt when loaded
    error: str | None = None
    sha256: str | None = None

    @property
    def key(self) -> str:
        return self.relpath

    @property
    def name(self) -> str:
        """A1111's VAE name: the file (or folder) name."""
        return Path(self.relpath).name

    @property
    def title(self) -> str:
        return self.relpath

    @property
    def short_hash(self) -> str | None:
        """A1111's `VAE hash`: the first 10 hex digits of the file's sha256."""
        return self.sha256[:10] if self.sha256 else None


@dataclass(frozen=True)
class VaeFacts:
    latent_channels: int | None = None
    error: str | None = None


def is_sidecar_vae(path: Path) -> bool:
    return path.name.lower().endswith(SIDECAR_SUFFIXES)


def sidecar_vae(checkpoint: Path) -> Path | None:
    """A1111's `find_vae_near_checkpoint`: `NAME.vae.pt`, `.vae.ckpt`, `.vae.safetensors`."""
    if checkpoint.is_dir():
        return None
    stem = checkpoint.with_suffix("")
    for suffix in SIDECAR_SUFFIXES:
        candidate = stem.with_name(stem.name + suffix)
        if is_file_quietly(candidate):
            return candidate
    return None


def _strip(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def facts_from_shapes(name: str, shapes: dict[str, tuple[int, ...]]) -> VaeFacts:
    """What the tensor names and shapes say: a VAE's latent channels, or why it is none."""
    if any(key.startswith("model.diffusion_model.") for key in shapes):
        return VaeFacts(error=f"{name}: a full checkpoint, not a VAE (put it in models/)")
    stripped = {_strip(key): shape for key, shape in shapes.items()}
    conv_in = stripped.get("decoder.conv_in.weight")
    if conv_in is None or len(conv_in) != 4:
        return VaeFacts(error=f"{name}: not a VAE (no decoder.conv_in.weight tensor)")
    return VaeFacts(latent_channels=conv_in[1])


def classify_vae(path: Path) -> VaeFacts:
    """Latent channels from the safetensors header or the diffusers config; pickles are
    classified when loaded."""
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return VaeFacts(error=f"{path.name}: unreadable config.json ({error})")
        if not isinstance(config, dict) or config.get("_class_name") != "AutoencoderKL":
            return VaeFacts(error=f"{path.name}: config.json is not an AutoencoderKL's")
        if not any((path / name).is_file() for name in DIFFUSERS_WEIGHTS):
            return VaeFacts(error=f"{path.name}: no diffusion_pytorch_model weights")
        return VaeFacts(latent_channels=int(config.get("latent_channels", 4)))
    if path.stat().st_size == 0:
        return VaeFacts(error=f"{path.name}: empty file (0 bytes)")
    if path.suffix.lower() != ".safetensors":
        return VaeFacts()
    try:
        header = read_safetensors_header(path)
    except UnusableFileError as error:
        return VaeFacts(error=error.message)
    return facts_from_shapes(path.name, {k: v.shape for k, v in header.tensors.items()})


def vae_entry(
    root: Path,
    path: Path,
    relpath: str,
    name: str,
    facts: VaeFacts,
    stat: os.stat_result,
    hashes: HashCache,
) -> VaeEntry:
    single = not stat_kinds.S_ISDIR(stat.st_mode)
    return VaeEntry(
        relpath=relpath,
        path=path,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        kind="single" if single else "diffusers",
        latent_channels=facts.latent_channels,
        error=facts.error,
        sha256=hashes.get(path, "sha256") if single else None,
    )


def hash_vae(entry: VaeEntry, hashes: HashCache) -> VaeEntry | None:
    """The entry with its sha256 (A1111 hashes VAE files for the infotext's `VAE hash`)."""
    if entry.kind != "single" or entry.sha256 or entry.error:
        return None
    return VaeEntry(**{**entry.__dict__, "sha256": hashes.compute(entry.path, "sha256")})


def vae_matchers(entry: VaeEntry, wanted: str) -> tuple[bool, ...]:
    """The relative path or file name (A1111's name), then case-insensitive, then the name
    without its extension (clients that strip it), then a hash prefix."""
    low = wanted.lower()
    bare = low.strip("[]")
    stem = entry.name.rsplit(".", 1)[0] if entry.kind == "single" else entry.name
    return (
        wanted in (entry.relpath, entry.name),
        low in (entry.relpath.lower(), entry.name.lower()),
        low == stem.lower(),
        bool(entry.sha256) and len(bare) >= 8 and (entry.sha256 or "").startswith(bare),
    )


def read_vae_weights(entry: VaeEntry) -> dict[str, torch.Tensor]:
    """The VAE's tensors as a flat dict without A1111's dropped keys and prefixes, still in
    the file's layout (LDM or diffusers); a folder's from its diffusers weights file."""
    path = entry.path
    if entry.kind == "diffusers":
        path = next(
            (entry.path / name for name in DIFFUSERS_WEIGHTS if (entry.path / name).is_file()),
            entry.path / DIFFUSERS_WEIGHTS[0],
        )
    state = load_state_dict(path)
    facts = facts_from_shapes(entry.name, {k: tuple(v.shape) for k, v in state.items()})
    if facts.error:
        raise UnusableFileError(facts.error, field="sd_vae")
    stripped = {_strip(key): value for key, value in state.items()}
    return {key: value for key, value in stripped.items() if not key.startswith(DROPPED)}
