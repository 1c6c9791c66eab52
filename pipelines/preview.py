"""Cheap live previews: latents to RGB through one linear map per latent channel.

A1111's "Approx cheap" preview: no VAE decode and no extra model, so a preview every few
steps costs almost nothing. The factors are the published least-squares fits of the SD1/SD2
VAE and of the SDXL VAE (one RGB row per latent channel).
"""

from __future__ import annotations

import torch
from PIL import Image

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
