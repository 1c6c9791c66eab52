"""The update each module of a LoRA adds to a base weight (A1111's maths, in fp32)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import torch

from pipelines.errors import UnusableFileError
from pipelines.lora.keys import Group

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- maths


def _f32(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    return tensor.to(device=device, dtype=torch.float32)


def _scalar(parts: Mapping[str, torch.Tensor], name: str) -> float | None:
    return float(parts[name].item()) if name in parts else None


def _rebuild(up: torch.Tensor, down: torch.Tensor, mid: torch.Tensor | None) -> torch.Tensor:
    """up @ down (conv kernels flattened), or the CP/Tucker form with a middle tensor."""
    if mid is not None:
        # mid: (r_up, r_down, kh, kw); up: (out, r_up); down: (r_down, in) -> (out, in, kh, kw)
        return torch.einsum("n m k l, i n, m j -> i j k l", mid, up.flatten(1), down.flatten(1))
    return up.flatten(1) @ down.flatten(1)


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' Tucker weight: t (r, r, kh, kw), wa (r, out), wb (r, in) -> (out, in, kh, kw)."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb.flatten(1))
    return torch.einsum("i j k l, i r -> r j k l", temp, wa.flatten(1))


def _kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    if w2.dim() == 4:
        w1 = w1.reshape(*w1.shape, 1, 1)
    return torch.kron(w1, w2.contiguous())


def unit_delta(group: Group[torch.Tensor], shape: torch.Size, device: torch.device) -> torch.Tensor:
    """The update of one module at multiplier 1 before any DoRA step, in fp32.

    kohya/A1111: up @ down * (stored scale, else alpha / rank, else 1); LoHa:
    (w1a @ w1b) * (w2a @ w2b) * alpha / rank; LoKr: kron(w1, w2), scaled by alpha / rank
    only when a factor is low-rank (LyCORIS stores alpha = rank when both are full).
    """
    p = {k: _f32(v, device) for k, v in group.parts.items() if v.is_floating_point()}
    kind = group.kind
    rank: int | None = None
    if kind == "lora":
        rank = p["down"].shape[0]
        delta = _rebuild(p["up"], p["down"], p.get("mid"))
    elif kind == "loha":
        rank = p["hada_w1_b"].shape[0]
        if "hada_t1" in p and "hada_t2" in p:
            first = _tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
            second = _tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            first = _rebuild(p["hada_w1_a"], p["hada_w1_b"], None)
            second = _rebuild(p["hada_w2_a"], p["hada_w2_b"], None)
        delta = first * second
    elif kind == "lokr":
        if "lokr_w1" in p:
            w1 = p["lokr_w1"]
        else:
            w1, rank = p["lokr_w1_a"] @ p["lokr_w1_b"], p["lokr_w1_b"].shape[0]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2, rank = (
                _tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]),
                p["lokr_w2_b"].shape[0],
            )
        else:
            w2 = _rebuild(p["lokr_w2_a"], p["lokr_w2_b"], None)
            rank = p["lokr_w2_b"].shape[0]
        delta = _kron(w1, w2)
    else:
        raise UnusableFileError(f"{group.key}: not a module type we can merge")
    if delta.numel() != math.prod(shape):
        raise ValueError(
            f"{group.key}: update has shape {tuple(delta.shape)}, layer {tuple(shape)}"
        )
    scale = _scalar(group.parts, "scale")
    if scale is None:
        alpha = _scalar(group.parts, "alpha")
        scale = alpha / rank if alpha is not None and rank else 1.0
    return delta.reshape(shape) * scale


def _column_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each input column over all other axes, shaped (1, in, 1, ...)."""
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return columns.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each output row over all other axes, shaped (out, 1, ...)."""
    rows = weight.reshape(weight.shape[0], -1).norm(dim=1)
    return rows.reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def module_delta(group: Group[torch.Tensor], base: torch.Tensor, multiplier: float) -> torch.Tensor:
    """What one module of one LoRA adds to `base` (fp32) at `multiplier`.

    DoRA, LyCORIS `dora_scale` (also in kohya-named files): LyCORIS's own forward pass,
    W' = (W + delta) * (m * (dora / ||W + delta|| - 1) + 1), the norm per output row when
    the stored magnitude has the output's shape (LyCORIS's default `wd_on_output`, shape
    (out, 1, ...)) and per input column when it has the input's (1, in, ...); the shape
    tells them apart even on square layers. At m = 1 this is A1111's
    apply_weight_decompose; at other m A1111 scales the whole difference instead, which
    LyCORIS does not. PEFT `lora_magnitude_vector`: PEFT's row-wise definition,
    W' = m * (W + s*BA) / ||W + s*BA||_row, with the multiplier inside s.
    """
    delta = unit_delta(group, base.shape, base.device)
    if "magnitude" in group.parts:
        magnitude = _f32(group.parts["magnitude"], base.device)
        merged = base + delta * multiplier
        scale = magnitude.reshape(-1, *[1] * (base.dim() - 1)) / _row_norm(merged)
        return merged * scale - base
    if "dora_scale" in group.parts:
        dora = _f32(group.parts["dora_scale"], base.device)
        merged = base + delta
        per_output = dora.dim() >= 2 and dora.shape[0] == base.shape[0] and dora.shape[1] == 1
        if dora.dim() < 2:  # a flat vector: its length says which axis
            per_output = dora.numel() == base.shape[0] and dora.numel() != base.shape[1]
        norm = _row_norm(merged) if per_output else _column_norm(merged)
        scale = dora.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
        return merged * (multiplier * (scale - 1) + 1) - base
    return delta * multiplier
