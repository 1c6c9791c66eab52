"""Tiny upscaler files for tests, written by hand in the published ESRGAN layout (the
"old architecture" keys of BasicSR's RRDBNet that A1111 and chaiNNer load), and an
independent forward pass of that network to check spandrel's output against."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

GROWTH = 32  # ESRGAN's growth channels (gc)


def esrgan_state_dict(scale: int = 2, filters: int = 8, blocks: int = 1, seed: int = 0) -> dict:
    """Random weights (small, so the output is not saturated) for an RRDBNet of `scale`
    2 or 4, keys as in the original ESRGAN `.pth` files."""
    generator = torch.Generator().manual_seed(seed)

    def conv(out_ch: int, in_ch: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = torch.randn(out_ch, in_ch, 3, 3, generator=generator) * (1.2 / (in_ch * 9) ** 0.5)
        return weight, torch.randn(out_ch, generator=generator) * 0.01

    state: dict[str, torch.Tensor] = {}

    def put(key: str, out_ch: int, in_ch: int) -> None:
        state[f"{key}.weight"], state[f"{key}.bias"] = conv(out_ch, in_ch)

    put("model.0", filters, 3)
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for index in range(1, 6):
                out_ch = filters if index == 5 else GROWTH
                put(
                    f"model.1.sub.{block}.RDB{rdb}.conv{index}.0",
                    out_ch,
                    filters + (index - 1) * GROWTH,
                )
    put(f"model.1.sub.{blocks}", filters, filters)
    ups = {2: [3], 4: [3, 6]}[scale]
    for key in ups:
        put(f"model.{key}", filters, filters)
    hr, last = ups[-1] + 2, ups[-1] + 4
    put(f"model.{hr}", filters, filters)
    put(f"model.{last}", 3, filters)
    state[f"model.{last}.bias"] += 0.5  # mid-grey, so little is clamped away
    return state


def write_esrgan(path: Path, **kwargs: int) -> Path:
    """`esrgan_state_dict` as a .safetensors (or, for a .pth path, a weights-only pickle
    wrapped in `params_ema` as Real-ESRGAN files are)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = esrgan_state_dict(**kwargs)
    if path.suffix == ".pth":
        torch.save({"params_ema": state}, path)
    else:
        save_file(state, path)
    return path


def esrgan_forward(state: dict, image: torch.Tensor) -> torch.Tensor:
    """RRDBNet's forward written out from the ESRGAN paper's layout (not spandrel's code):
    `image` is (1, 3, H, W) in 0..1; returns (1, 3, sH, sW) clamped to 0..1."""

    def conv(x: torch.Tensor, key: str) -> torch.Tensor:
        return F.conv2d(x, state[f"{key}.weight"], state[f"{key}.bias"], padding=1)

    def lrelu(x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(x, 0.2)

    blocks = sum(1 for k in state if k.endswith(".RDB1.conv1.0.weight"))
    fea = conv(image, "model.0")
    trunk = fea
    for block in range(blocks):
        rrdb_in = trunk
        x = trunk
        for rdb in (1, 2, 3):
            feats = [x]
            for index in range(1, 5):
                feats.append(
                    lrelu(conv(torch.cat(feats, 1), f"model.1.sub.{block}.RDB{rdb}.conv{index}.0"))
                )
            x = conv(torch.cat(feats, 1), f"model.1.sub.{block}.RDB{rdb}.conv5.0") * 0.2 + x
        trunk = x * 0.2 + rrdb_in
    fea = fea + conv(trunk, f"model.1.sub.{blocks}")
    ups = [3, 6] if "model.10.weight" in state else [3]
    for key in ups:
        fea = lrelu(conv(F.interpolate(fea, scale_factor=2, mode="nearest"), f"model.{key}"))
    out = conv(lrelu(conv(fea, f"model.{ups[-1] + 2}")), f"model.{ups[-1] + 4}")
    return out.clamp(0, 1)
