"""sd-webui-controlnet's MiDaS file, `dpt_hybrid-midas-501f0c75.pt` (MiDaS v3 DPT-Hybrid in
the original MiDaS/timm key layout), as transformers' `DPTForDepthEstimation`.

Keys are renamed and each ViT block's fused `qkv` split into query, key and value as
transformers' `convert_dpt_hybrid_to_pytorch.py` does (timm's classifier head is dropped).
The config is that script's dpt-hybrid-midas one: 12 heads, the ViT layers 2, 5, 8, 11 feed
the neck, reassemble factors 1, 1, 1, 0.5, project readout, no batch norm in the fusion
blocks, a BiT bottleneck backbone with "same" padding and 32 groups; the widths and depths
are read from the tensors (the published file gives the script's 768 / 12 layers / BiT
3-4-9), so a file whose shapes disagree is refused by the strict load naming it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

HEADS = 12
OUT_INDICES = [2, 5, 8, 11]
PATCH = 16
VIT = "pretrained.model."
BIT = VIT + "patch_embed.backbone."

_RULES: tuple[tuple[str, str], ...] = (
    (r"pretrained\.model\.cls_token", "dpt.embeddings.cls_token"),
    (r"pretrained\.model\.pos_embed", "dpt.embeddings.position_embeddings"),
    (r"pretrained\.model\.patch_embed\.proj\.", "dpt.embeddings.projection."),
    (
        r"pretrained\.model\.patch_embed\.backbone\.stem\.conv\.",
        "dpt.embeddings.backbone.bit.embedder.convolution.",
    ),
    (
        r"pretrained\.model\.patch_embed\.backbone\.stem\.norm\.",
        "dpt.embeddings.backbone.bit.embedder.norm.",
    ),
    (
        r"pretrained\.model\.patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.",
        r"dpt.embeddings.backbone.bit.encoder.stages.\1.layers.\2.",
    ),
    (
        r"pretrained\.model\.blocks\.(\d+)\.attn\.proj\.",
        r"dpt.encoder.layer.\1.attention.output.dense.",
    ),
    (r"pretrained\.model\.blocks\.(\d+)\.mlp\.fc1\.", r"dpt.encoder.layer.\1.intermediate.dense."),
    (r"pretrained\.model\.blocks\.(\d+)\.mlp\.fc2\.", r"dpt.encoder.layer.\1.output.dense."),
    (r"pretrained\.model\.blocks\.(\d+)\.norm1\.", r"dpt.encoder.layer.\1.layernorm_before."),
    (r"pretrained\.model\.blocks\.(\d+)\.norm2\.", r"dpt.encoder.layer.\1.layernorm_after."),
    (r"pretrained\.model\.norm\.", "dpt.layernorm."),
    (r"scratch\.output_conv\.", "head.head."),
)
"""Original prefix -> transformers prefix, for the keys whose numbering is kept."""


def _shifted(key: str) -> str | None:
    """The keys whose numbers change: act_postprocessK (K from 1), layerK_rn (from 1),
    refinenetK (4 is the first fusion layer)."""
    found = re.fullmatch(r"pretrained\.act_postprocess(\d)\.0\.project\.0\.(\w+)", key)
    if found:
        return f"neck.reassemble_stage.readout_projects.{int(found[1]) - 1}.0.{found[2]}"
    found = re.fullmatch(r"pretrained\.act_postprocess(\d)\.([34])\.(\w+)", key)
    if found:
        part = "projection" if found[2] == "3" else "resize"
        return f"neck.reassemble_stage.layers.{int(found[1]) - 1}.{part}.{found[3]}"
    found = re.fullmatch(r"scratch\.layer(\d)_rn\.(\w+)", key)
    if found:
        return f"neck.convs.{int(found[1]) - 1}.{found[2]}"
    found = re.fullmatch(r"scratch\.refinenet(\d)\.(.+)", key)
    if found:
        rest = found[2].replace("out_conv", "projection")
        rest = re.sub(r"resConfUnit(\d)\.conv(\d)", r"residual_layer\1.convolution\2", rest)
        return f"neck.fusion_stage.layers.{4 - int(found[1])}.{rest}"
    return None


def original_to_transformers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original file's tensors under transformers' DPT-Hybrid names; raises KeyError
    naming a key it does not know."""
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(VIT + "head."):
            continue  # timm's classifier, unused by MiDaS
        qkv = re.fullmatch(r"pretrained\.model\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", key)
        if qkv:
            prefix = f"dpt.encoder.layer.{qkv[1]}.attention.attention."
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                converted[f"{prefix}{name}.{qkv[2]}"] = part
            continue
        renamed = _shifted(key)
        for pattern, replacement in _RULES:
            if renamed is None and re.match(pattern, key):
                renamed = re.sub(pattern, replacement, key, count=1)
        if renamed is None:
            raise KeyError(f"unknown MiDaS key {key}")
        converted[renamed] = value
    return converted


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    return len({m[1] for key in state if (m := re.match(pattern, key))})


def midas_config(state: Mapping[str, torch.Tensor]) -> Any:
    """The script's dpt-hybrid-midas `DPTConfig` with the widths and depths of `state`."""
    from transformers import DPTConfig

    positions = state[VIT + "pos_embed"].shape
    grid = round((positions[1] - 1) ** 0.5)
    stages = _count(state, re.escape(BIT) + r"stages\.(\d+)\.")
    depths = [
        _count(state, re.escape(f"{BIT}stages.{i}.blocks.") + r"(\d+)\.") for i in range(stages)
    ]
    widths = [int(state[f"{BIT}stages.{i}.blocks.0.conv3.weight"].shape[0]) for i in range(stages)]
    backbone = {
        "layer_type": "bottleneck",
        "global_padding": "same",
        "embedding_dynamic_padding": True,
        "embedding_size": int(state[BIT + "stem.conv.weight"].shape[0]),
        "depths": depths,
        "hidden_sizes": widths,
        "out_features": [f"stage{i + 1}" for i in range(stages)],
    }
    return DPTConfig(
        is_hybrid=True,
        backbone_config=backbone,
        backbone_featmap_shape=[1, widths[-1], grid, grid],
        hidden_size=int(positions[2]),
        num_hidden_layers=_count(state, re.escape(VIT) + r"blocks\.(\d+)\."),
        num_attention_heads=HEADS,
        intermediate_size=int(state[VIT + "blocks.0.mlp.fc1.weight"].shape[0]),
        image_size=grid * PATCH,
        patch_size=PATCH,
        backbone_out_indices=OUT_INDICES,
        neck_hidden_sizes=[
            int(state[f"scratch.layer{k}_rn.weight"].shape[1]) for k in (1, 2, 3, 4)
        ],
        fusion_hidden_size=int(state["scratch.layer1_rn.weight"].shape[0]),
        reassemble_factors=[1, 1, 1, 0.5],
        readout_type="project",
        use_batch_norm_in_fusion_residual=False,
    )
