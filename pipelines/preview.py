"""Live previews, by A1111's `show_progress_type`.

"Approx cheap" (the default): latents to RGB through one linear map per latent channel; no
VAE decode and no extra model, so a preview every few steps costs almost nothing. The
factors are the published least-squares fits of the SD1/SD2 VAE and of the SDXL VAE (one
RGB row per latent channel). "TAESD": the tiny decoder A1111 reads from
`models/VAE-approx/` (`taesd_decoder.pth`, `taesdxl_decoder.pth`, or an AutoencoderTiny
folder). "Full": the model's own VAE.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from pipelines.errors import InvalidRequestError, UnusableFileError
from pipelines.safeload import load_state_dict

log = logging.getLogger(__name__)

_SD_FACTORS = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
LATENT_RGB_FACTORS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "SD1": _SD_FACTORS,
    "SD2": _SD_FACTORS,
    "SDXL": (
        (0.3448, 0.4168, 0.4395),
        (-0.1953, -0.0290, 0.0250),
        (0.1074, 0.0886, -0.0163),
        (-0.3730, -0.2499, -0.2088),
    ),
}
"""Architecture family -> per-channel RGB factors (A1111 `sd_vae_approx.cheap_approximation`)."""


def latents_to_images(latents: torch.Tensor, family: str, scale: int = 8) -> list[Image.Image]:
    """Approximate RGB images of `[B, C, h, w]` latents, `scale` times the latent size.

    Returns [] when the family has no factors or the channel count differs (a preview is a
    nicety, never an error).
    """
    factors = LATENT_RGB_FACTORS.get(family)
    if factors is None or latents.ndim != 4 or latents.shape[1] != len(factors):
        return []
    coefs = torch.tensor(factors, dtype=torch.float32)
    rgb = torch.einsum("bcyx,cr->bryx", latents.detach().float().cpu(), coefs)  # [B, 3, h, w]
    rgb = ((rgb + 1.0) / 2.0).clamp(0.0, 1.0).mul(255).round().to(torch.uint8)
    images = []
    for item in rgb:
        image = Image.fromarray(item.permute(1, 2, 0).contiguous().numpy())  # [h, w, 3]
        images.append(image.resize((image.width * scale, image.height * scale)))
    return images


CHEAP = "Approx cheap"
TAESD = "TAESD"
FULL = "Full"
PREVIEW_METHODS = (CHEAP, TAESD, FULL)
"""A1111's `show_progress_type` choices we have ("Approx NN" needs A1111's own model)."""


def check_preview_method(method: object) -> str:
    """`method` when it is one of ours; else a 4xx naming A1111's option."""
    if method not in PREVIEW_METHODS:
        why = " (A1111's own model, not available here)" if method == "Approx NN" else ""
        raise InvalidRequestError(
            f"show_progress_type must be one of {', '.join(PREVIEW_METHODS)}, got {method!r}" + why,
            field="show_progress_type",
        )
    return str(method)


APPROX_FOLDER = "VAE-approx"
TAESD_NAMES = {"SD1": "taesd", "SD2": "taesd", "SDXL": "taesdxl"}
"""Family -> A1111's TAESD file stem (`taesd_decoder.pth`) or AutoencoderTiny folder."""


def _tiny_decoder() -> torch.nn.Module:
    """TAESD's decoder as diffusers builds it (the shape of every published TAESD)."""
    from diffusers.models.autoencoders.vae import DecoderTiny

    return DecoderTiny(
        in_channels=4,
        out_channels=3,
        num_blocks=(3, 3, 3, 1),
        block_out_channels=(64, 64, 64, 64),
        upsampling_scaling_factor=2,
        act_fn="relu",
        upsample_fn="nearest",
    )


def load_taesd_decoder(path: Path) -> torch.nn.Module:
    """A TAESD decoder from A1111's decoder-only state dict (`taesd_decoder.pth`, or
    `.safetensors`: keys `1.weight` ... of the original `nn.Sequential`, whose index 0 is
    the clamp that diffusers applies outside its `layers`) or an AutoencoderTiny folder.

    Raises UnusableFileError naming the file when it is not a TAESD decoder.
    """
    if path.is_dir():
        from diffusers import AutoencoderTiny

        try:
            tiny = AutoencoderTiny.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as error:
            message = f"{path.name}: not an AutoencoderTiny folder ({error})"
            raise UnusableFileError(message) from error
        return tiny.decoder.eval().requires_grad_(False)
    state = load_state_dict(path)
    renamed = {}
    for key, value in state.items():
        index, _, rest = key.removeprefix("decoder.").partition(".")
        if not index.isdigit() or int(index) < 1:
            raise UnusableFileError(f"{path.name}: not a TAESD decoder (unexpected key {key})")
        renamed[f"layers.{int(index) - 1}.{rest}"] = value
    decoder = _tiny_decoder()
    expected = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in renamed.items()}
    if expected != found:
        differ = sorted(set(expected) ^ set(found)) or [
            k for k in expected if expected[k] != found[k]
        ]
        raise UnusableFileError(f"{path.name}: not a TAESD decoder (first difference: {differ[0]})")
    decoder.load_state_dict(renamed)
    return decoder.eval().requires_grad_(False)


class PreviewDecoders:
    """Finds and keeps the TAESD decoders of `models/VAE-approx/` (one per family).

    Args:
        models_dirs: the checkpoint folders; `<dir>/VAE-approx/` is searched in each.
    """

    def __init__(self, models_dirs: Sequence[Path]) -> None:
        self.models_dirs = tuple(models_dirs)
        self._loaded: dict[str, tuple[Path, int, torch.nn.Module]] = {}
        self._lock = threading.Lock()

    def find(self, family: str) -> Path | None:
        stem = TAESD_NAMES.get(family)
        if stem is None:
            return None
        for folder in self.models_dirs:
            approx = folder / APPROX_FOLDER
            for name in (f"{stem}_decoder.safetensors", f"{stem}_decoder.pth", stem):
                candidate = approx / name
                if candidate.is_file() or (candidate / "config.json").is_file():
                    return candidate
        return None

    def decoder(self, family: str) -> torch.nn.Module | None:
        """The family's TAESD decoder, loaded once per file version (None: none here)."""
        path = self.find(family)
        if path is None:
            return None
        stamp = path.stat().st_mtime_ns
        with self._lock:
            known = self._loaded.get(family)
            if known is not None and known[:2] == (path, stamp):
                return known[2]
            decoder = load_taesd_decoder(path)
            self._loaded[family] = (path, stamp, decoder)
            return decoder


def _to_images(rgb01: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [0, 1] -> 8-bit images."""
    data = rgb01.detach().float().clamp(0.0, 1.0).mul(255).round().to(torch.uint8).cpu()
    return [Image.fromarray(item.permute(1, 2, 0).contiguous().numpy()) for item in data]


def taesd_images(decoder: torch.nn.Module, latents: torch.Tensor) -> list[Image.Image]:
    """TAESD decodes the sampler's (scaled) latents directly; it outputs [-1, 1]."""
    weight = next(decoder.parameters())
    with torch.no_grad():
        out = decoder(latents.detach().to(weight.device, weight.dtype))
    return _to_images((out + 1) / 2)


def full_images(vae: torch.nn.Module, latents: torch.Tensor) -> list[Image.Image]:
    """A preview decoded by the model's own VAE (A1111's "Full")."""
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    latents = latents.detach().to(vae.device, vae.dtype)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = latents * std_t / config.scaling_factor + mean_t
    else:
        latents = latents / config.scaling_factor
    with torch.no_grad():
        out = vae.decode(latents, return_dict=False)[0]
    return _to_images((out + 1) / 2)


def render_preview(
    method: str,
    latents: torch.Tensor,
    family: str,
    vae: torch.nn.Module,
    decoders: PreviewDecoders | None,
) -> list[Image.Image]:
    """Preview images of `latents` by `method`; TAESD without a decoder for the family
    falls back to Approx cheap (a preview is a nicety, never an error)."""
    if method == FULL:
        return full_images(vae, latents)
    if method == TAESD and decoders is not None:
        try:
            decoder = decoders.decoder(family)
        except UnusableFileError as error:
            log.warning("TAESD preview: %s; using Approx cheap", error.message)
            decoder = None
        if decoder is not None:
            return taesd_images(decoder, latents)
    return latents_to_images(latents, family)
