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


PLAIN_LORA_PARTS = frozenset({"up", "down", "alpha", "scale"})
"""The parts of a plain low-rank LoRA (no CP middle, no DoRA): its update is one product."""

LoraFactors = tuple[torch.Tensor, torch.Tensor, float]
"""(up [out, r], down [r, in*k*k], scale) in fp32: the update is scale * up @ down."""


def lora_factors(group: Group[torch.Tensor], device: torch.device) -> LoraFactors | None:
    """A plain LoRA's fp32 factors on `device` and its scale (`unit_delta`'s rules), so
    the stack can keep them between merges; None for every other kind (they go through
    `module_delta`)."""
    if group.kind != "lora" or not set(group.parts) <= PLAIN_LORA_PARTS:
        return None
    up = _f32(group.parts["up"], device).flatten(1)
    down = _f32(group.parts["down"], device).flatten(1)
    if up.shape[1] != down.shape[0]:
        return None  # mismatched ranks: `unit_delta` raises with its message
    scale = _scalar(group.parts, "scale")
    if scale is None:
        alpha = _scalar(group.parts, "alpha")
        rank = down.shape[0]
        scale = alpha / rank if alpha is not None and rank else 1.0
    return up, down, scale


def add_lora(
    total: torch.Tensor,
    key: str,
    factors: LoraFactors,
    multiplier: float,
    scratch: torch.Tensor | None = None,
) -> None:
    """`total += up @ down * scale * multiplier` in place, with `unit_delta` and
    `module_delta`'s operations in their order (the same bits as adding their result),
    the update built in `scratch` (a flat fp32 buffer of at least its size) when given.

    Raises:
        ValueError: the update does not have the layer's size.
    """
    up, down, scale = factors
    shape = (up.shape[0], down.shape[1])
    if shape[0] * shape[1] != total.numel():
        raise ValueError(f"{key}: update has shape {shape}, layer {tuple(total.shape)}")
    if scratch is None:
        delta = up @ down
    else:
        delta = torch.mm(up, down, out=scratch[: total.numel()].view(shape))
    delta.mul_(scale).mul_(multiplier)
    total += delta.view(total.shape)  # the product laid over the layer, as unit_delta's reshape


def _column_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each input column over all other axes, shaped (1, in, 1, ...)."""
    columns = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return columns.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


def _row_norm(weight: torch.Tensor) -> torch.Tensor:
    """Norm of each output row over all other axes, shaped (out, 1, ...)."""
    rows = weight.reshape(weight.shape[0], -1).norm(dim=1)
    return rows.reshape(weight.shape[0], *[1] * (weight.dim() - 1))


def _channel_shape(vector: torch.Tensor, weight: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along `axis` (0: outputs, 1: inputs)."""
    shape = [1] * weight.dim()
    shape[axis] = weight.shape[axis]
    return vector.reshape(shape)


def _ia3(p: Mapping[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """IA3 at multiplier 1: W * w along the inputs (`on_input`) or the outputs."""
    on_input = bool(p["on_input"].reshape(-1)[0].item()) if p["on_input"].numel() else False
    axis = 1 if on_input else 0
    weight = p["weight"].to(device=base.device, dtype=torch.float32)
    if weight.numel() != base.shape[axis]:
        raise ValueError(
            f"IA3 vector has {weight.numel()} values, the layer {base.shape[axis]} "
            f"{'inputs' if on_input else 'outputs'}"
        )
    return base * _channel_shape(weight, base, axis)


def _glora(p: Mapping[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """GLoRA at multiplier 1: (W a1 a2 + b1 b2) * alpha / r in LyCORIS's current layout
    (a1 [in, r], a2 [r, in], b1 [out, r], b2 [r, in*k*k]); the old layout (a1 [r, in],
    a2 [in, r], b1 [r, in], b2 [out, r]; A1111's W a2 a1 + b2 b1) is told by its shapes."""
    a1, a2, b1, b2 = (p[k].flatten(1) for k in ("a1", "a2", "b1", "b2"))
    old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
    new = b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]
    if old and new:  # square shapes: A1111's rule (an old a2 [in, r] on a square layer)
        old = a2.shape[0] == base.shape[0] == base.shape[1]
    if old:
        a1, a2, b1, b2 = a2, a1, b2, b1
    rank = a2.shape[0]
    weighted = torch.einsum("o i ..., i j -> o j ...", base, a1)
    weighted = torch.einsum("o j ..., j i -> o i ...", weighted, a2)
    delta = (b1 @ b2).reshape(base.shape) + weighted
    alpha = _scalar(p, "alpha")
    return delta * (alpha / rank if alpha else 1.0)


def _cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    """LyCORIS's orthogonal blocks from skew parts: (I + Q)(I - Q)^-1, the norm of Q
    clamped to `constraint` when it is positive."""
    eye = torch.eye(blocks.shape[-1], device=blocks.device, dtype=blocks.dtype)
    q = blocks - blocks.transpose(-1, -2)
    if constraint > 0:
        norm = torch.norm(q) + 1e-8
        if norm > constraint:
            q = q * constraint / norm
    return (eye + q) @ (eye - q).inverse()


def _oft(p: Mapping[str, torch.Tensor], base: torch.Tensor, multiplier: float) -> torch.Tensor:
    """OFT (kohya and LyCORIS `oft_blocks`, old LyCORIS `oft_diag` = R itself): each block
    of output rows rotated, W' = R_m^T W with R_m = m R + (1 - m) I, then `rescale`."""
    if "oft_blocks" in p:
        alpha = _scalar(p, "alpha") or 0.0
        rotation = _cayley(p["oft_blocks"], alpha * base.shape[0])
    else:
        rotation = p["oft_diag"]
    count, size = rotation.shape[0], rotation.shape[1]
    if count * size != base.shape[0]:
        raise ValueError(f"OFT blocks {count} x {size} do not cover {base.shape[0]} outputs")
    eye = torch.eye(size, device=base.device, dtype=base.dtype)
    rotation = multiplier * rotation + (1 - multiplier) * eye
    # base (count * size, ...) -> (count, size, ...) -> rotated -> (count * size, ...)
    blocks = base.reshape(count, size, *base.shape[1:])
    merged = torch.einsum("k n m, k n ... -> k m ...", rotation, blocks).reshape(base.shape)
    if "rescale" in p:
        merged = merged * p["rescale"].reshape(-1, *[1] * (base.dim() - 1))
    return merged - base


def _boft(p: Mapping[str, torch.Tensor], base: torch.Tensor, multiplier: float) -> torch.Tensor:
    """Butterfly OFT (LyCORIS): m stages, stage i mixing rows 2^i * b/2 apart; the
    multiplier moves each stage toward identity (LyCORIS), then `rescale`."""
    blocks = p["oft_blocks"] if "oft_blocks" in p else p["oft_diag"]
    stages, _count, size, _ = blocks.shape
    if "oft_blocks" in p:
        rotations = _cayley(blocks, (_scalar(p, "alpha") or 0.0) * base.shape[0])
    else:
        rotations = blocks
    eye = torch.eye(size, device=base.device, dtype=base.dtype)
    rows = base
    for stage in range(stages):
        rotation = rotations[stage]
        if multiplier != 1:
            rotation = rotation * multiplier + (1 - multiplier) * eye
        step = 2**stage * (size // 2)
        # rows (c g k) -> (c k g) -> (d b): pair rows `step` apart into blocks of `size`
        rows = rows.unflatten(0, (-1, 2, step)).transpose(1, 2).flatten(0, 2)
        rows = torch.einsum("b i j, b j ... -> b i ...", rotation, rows.unflatten(0, (-1, size)))
        rows = rows.flatten(0, 1).unflatten(0, (-1, step, 2)).transpose(1, 2).flatten(0, 2)
    if "rescale" in p:
        rows = rows * p["rescale"].reshape(-1, *[1] * (base.dim() - 1))
    return rows - base


def module_delta(
    group: Group[torch.Tensor],
    base: torch.Tensor,
    multiplier: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What one module of one LoRA adds to `base` (fp32) and its `bias` at `multiplier`.

    Returns the weight's update and the bias's (None: the bias is unchanged). Every type
    follows the library that writes it (LyCORIS for IA3, full, norm, GLoRA, OFT, BOFT):
    IA3 W * (1 + m w); full and norm W + m diff, b + m diff_b; GLoRA
    W + m (W a1 a2 + b1 b2) alpha / r; OFT/BOFT rotations moved toward identity by m.

    DoRA, LyCORIS `dora_scale` (also in kohya-named files): LyCORIS's own forward pass,
    W' = (W + delta) * (m * (dora / ||W + delta|| - 1) + 1), the norm per output row when
    the stored magnitude has the output's shape (LyCORIS's default `wd_on_output`, shape
    (out, 1, ...)) and per input column when it has the input's (1, in, ...); the shape
    tells them apart even on square layers. At m = 1 this is A1111's
    apply_weight_decompose; at other m A1111 scales the whole difference instead, which
    LyCORIS does not. PEFT `lora_magnitude_vector`: PEFT's row-wise definition,
    W' = m * (W + s*BA) / ||W + s*BA||_row, with the multiplier inside s.
    """
    kind = group.kind
    if kind in ("ia3", "full", "norm", "glora", "oft", "boft"):
        p = {k: _f32(v, base.device) for k, v in group.parts.items()}
        bias_delta = None
        if kind == "ia3":
            delta = _ia3(p, base) * multiplier
        elif kind in ("full", "norm"):
            weight, extra = ("diff", "diff_b") if kind == "full" else ("w_norm", "b_norm")
            if p[weight].numel() != base.numel():
                raise ValueError(
                    f"{group.key}: update has shape {tuple(p[weight].shape)}, "
                    f"layer {tuple(base.shape)}"
                )
            delta = p[weight].reshape(base.shape) * multiplier
            if extra in p and bias is not None:
                bias_delta = p[extra].reshape(bias.shape) * multiplier
        elif kind == "glora":
            delta = _glora(p, base) * multiplier
        elif kind == "oft":
            delta = _oft(p, base, multiplier)
        else:
            delta = _boft(p, base, multiplier)
        return delta, bias_delta
    delta = unit_delta(group, base.shape, base.device)
    if "magnitude" in group.parts:
        magnitude = _f32(group.parts["magnitude"], base.device)
        merged = base + delta * multiplier
        scale = magnitude.reshape(-1, *[1] * (base.dim() - 1)) / _row_norm(merged)
        return merged * scale - base, None
    if "dora_scale" in group.parts:
        dora = _f32(group.parts["dora_scale"], base.device)
        merged = base + delta
        per_output = dora.dim() >= 2 and dora.shape[0] == base.shape[0] and dora.shape[1] == 1
        if dora.dim() < 2:  # a flat vector: its length says which axis
            per_output = dora.numel() == base.shape[0] and dora.numel() != base.shape[1]
        norm = _row_norm(merged) if per_output else _column_norm(merged)
        scale = dora.reshape(norm.shape) / (norm + torch.finfo(torch.float32).eps)
        return merged * (multiplier * (scale - 1) + 1) - base, None
    return delta * multiplier, None
