"""External VAEs, as A1111 uses them: weights loaded into the model's own VAE, the baked-in
weights put back for `None`, decodes retried in fp32 when half precision overflows.

A1111's `sd_vae` option: `Automatic` takes `NAME.vae.safetensors` (or `.vae.pt`,
`.vae.ckpt`) beside the checkpoint, else the baked-in VAE; `None` is the baked-in VAE;
any other value names a listed VAE. Loading into the existing module (rather than swapping
modules) keeps every memory mode's offload hooks valid, as for LoRA merges.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipelines.devices import stored_tensor
from pipelines.errors import UnusableFileError
from pipelines.folders.checkpoints import CheckpointEntry
from pipelines.folders.registry import ModelFolders
from pipelines.folders.vaes import VaeEntry, classify_vae, read_vae_weights, sidecar_vae
from pipelines.schema import VAE_AUTOMATIC as AUTOMATIC
from pipelines.schema import VAE_NONE as NONE

log = logging.getLogger(__name__)

SPECIAL_CHOICES = (AUTOMATIC, NONE)


def choose_vae(
    choice: str, checkpoint: CheckpointEntry | None, folders: ModelFolders
) -> VaeEntry | None:
    """The VAE file `choice` means for `checkpoint` (None: the baked-in VAE)."""
    if choice == NONE:
        return None
    if choice == AUTOMATIC:
        beside = sidecar_vae(checkpoint.path) if checkpoint is not None else None
        return _sidecar_entry(beside, folders) if beside is not None else None
    entry: VaeEntry = folders.resolve("vae", choice)
    if entry.error:
        raise UnusableFileError(f"VAE '{entry.name}': {entry.error}", field="sd_vae")
    return entry


def _sidecar_entry(path: Path, folders: ModelFolders) -> VaeEntry:
    """An entry for a `.vae.` file beside a checkpoint (not in a VAE folder's listing)."""
    stat = path.stat()
    facts = classify_vae(path)
    if facts.error:
        raise UnusableFileError(f"VAE '{path.name}': {facts.error}", field="sd_vae")
    return VaeEntry(
        relpath=path.name,
        path=path,
        size=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        latent_channels=facts.latent_channels,
        sha256=folders.hashes.compute(path, "sha256"),
    )


def _storages(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` by state-dict name, as the tensor that really
    holds it: the data, or under accelerate's sequential offload (`--lowvram`, tensors on
    `meta`) the CPU copy its hook loads before each call."""
    found: dict[str, torch.Tensor] = {}
    for prefix, owner in module.named_modules():
        for local, tensor in {**owner._parameters, **owner._buffers}.items():
            if tensor is not None:
                found[f"{prefix}.{local}" if prefix else local] = stored_tensor(owner, local)
    return found


def to_diffusers(
    weights: dict[str, torch.Tensor], config: dict[str, object]
) -> dict[str, torch.Tensor]:
    """LDM/SGM VAE keys -> diffusers `AutoencoderKL` keys (diffusers keys pass through)."""
    if any(key.startswith("encoder.down_blocks.") for key in weights):
        return dict(weights)
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(weights, dict(config))


@dataclass
class _Loaded:
    key: tuple[str, int]
    weights: dict[str, torch.Tensor]


class VaeWeights:
    """Keeps one model's VAE equal to its baked-in weights or to one external VAE file.

    The baked-in weights are copied to the CPU the first time another VAE is loaded; the
    last external VAE's converted weights stay cached, so alternating requests re-read no
    file (A1111's `sd_vae_checkpoint_cache` of one).
    """

    def __init__(self, vae: torch.nn.Module, learn: Callable[[VaeEntry, str], None]) -> None:
        self.vae = vae
        self.learn = learn
        self.current: VaeEntry | None = None
        self._base: dict[str, torch.Tensor] | None = None
        self._cached: _Loaded | None = None

    def use(self, entry: VaeEntry | None) -> None:
        """Make the model's VAE hold `entry`'s weights (None: the baked-in ones)."""
        if _same(entry, self.current):
            return
        storages = _storages(self.vae)
        if entry is None:
            assert self._base is not None
            _copy_into(storages, self._base)
            self.current = None
            log.info("VAE: back to the checkpoint's own")
            return
        weights = self._weights(entry, storages)
        if self._base is None:
            self._base = {name: t.detach().to("cpu", copy=True) for name, t in storages.items()}
        _copy_into(storages, weights)
        self.current = entry
        log.info("VAE: loaded %s", entry.relpath)

    def _weights(
        self, entry: VaeEntry, storages: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        key = (str(entry.path), entry.mtime_ns)
        if self._cached is not None and self._cached.key == key:
            return self._cached.weights
        try:
            raw = read_vae_weights(entry)
            weights = to_diffusers(raw, dict(self.vae.config))
        except UnusableFileError as error:
            self.learn(entry, error.message)
            raise UnusableFileError(f"VAE {error.message}", field="sd_vae") from error
        except (KeyError, IndexError, ValueError, RuntimeError) as error:
            message = f"its tensors are not a VAE's ({error!r})"
            self.learn(entry, message)
            raise UnusableFileError(f"VAE '{entry.name}': {message}", field="sd_vae") from error
        problem = _misfit(weights, storages)
        if problem:
            raise UnusableFileError(
                f"VAE '{entry.name}' does not fit this model's VAE: {problem}", field="sd_vae"
            )
        self._cached = _Loaded(key, weights)
        return weights


def _same(a: VaeEntry | None, b: VaeEntry | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.path, a.mtime_ns) == (b.path, b.mtime_ns)


def _misfit(weights: dict[str, torch.Tensor], storages: dict[str, torch.Tensor]) -> str | None:
    """Why `weights` cannot replace the model's VAE weights (another family's layout)."""
    latent = "decoder.conv_in.weight"
    if latent in weights and latent in storages:
        theirs, ours = weights[latent].shape[1], storages[latent].shape[1]
        if theirs != ours:
            return (
                f"it has {theirs} latent channels and the model's VAE has {ours} "
                "(a VAE for another model family)"
            )
    missing = [name for name in storages if name not in weights]
    mismatched = [
        f"{name}: file {tuple(weights[name].shape)} vs model {tuple(storages[name].shape)}"
        for name in storages
        if name in weights and weights[name].shape != storages[name].shape
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:3]))
    if missing:
        problems.append(f"{len(missing)} tensors missing (first: {', '.join(missing[:3])})")
    return "; ".join(problems) or None


def _copy_into(storages: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, storage in storages.items():
            storage.copy_(weights[name])


def decode_checked(
    vae: torch.nn.Module, decode: Callable[[torch.Tensor], torch.Tensor], latents: torch.Tensor
) -> torch.Tensor:
    """Decode; a half-precision decode that yields NaNs is done again in fp32 (A1111's
    `auto_vae_precision`), and the log says so."""
    with torch.no_grad():
        pixels = decode(latents)
    if latents.dtype not in (torch.float16, torch.bfloat16) or not torch.isnan(pixels).any():
        return pixels
    log.warning(
        "the VAE produced NaNs in %s; decoding again in float32 (start with --no-half-vae "
        "to always decode in float32)",
        str(latents.dtype).removeprefix("torch."),
    )
    dtype = vae.dtype
    vae.to(dtype=torch.float32)
    try:
        with torch.no_grad():
            return decode(latents.to(torch.float32))
    finally:
        vae.to(dtype=dtype)
