"""The mergeable layers of a pipeline and every spelling a file may use for each."""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from pipelines.lora.keys import COMPONENTS, Group, shape_of

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- targets


_RESNET_LDM = {
    "norm1": "in_layers_0",
    "conv1": "in_layers_2",
    "norm2": "out_layers_0",
    "conv2": "out_layers_3",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}
MERGEABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.LayerNorm, torch.nn.GroupNorm)
"""Layers a network may change: Linear/Conv (every type) and norms (`norm`, `full`)."""


def ldm_unet_name(name: str, layers_per_block: int, up_has_attention: list[bool]) -> str | None:
    """A diffusers UNet module path -> its LDM/SGM name with `_` separators (kohya SDXL
    and old A1111 files use these), or None where there is no counterpart."""
    per = layers_per_block + 1
    m = re.match(r"^(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        side, i, what, j, tail = (
            m.group(1),
            int(m.group(2)),
            m.group(3),
            int(m.group(4)),
            m.group(5),
        )
        tail = _RESNET_LDM.get(tail, tail) if what == "resnets" else tail
        slot = 0 if what == "resnets" else 1
        index = 1 + i * per + j if side == "down" else i * (layers_per_block + 1) + j
        block = "input_blocks" if side == "down" else "output_blocks"
        return f"{block}_{index}_{slot}_{tail.replace('.', '_')}"
    m = re.match(r"^down_blocks\.(\d+)\.downsamplers\.0\.conv$", name)
    if m:
        return f"input_blocks_{(int(m.group(1)) + 1) * per}_0_op"
    m = re.match(r"^up_blocks\.(\d+)\.upsamplers\.0\.conv$", name)
    if m:
        i = int(m.group(1))
        slot = 2 if i < len(up_has_attention) and up_has_attention[i] else 1
        return f"output_blocks_{i * per + layers_per_block}_{slot}_conv"
    m = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", name)
    if m:
        what, j, tail = m.group(1), int(m.group(2)), m.group(3)
        if what == "resnets":
            return f"middle_block_{2 * j}_{_RESNET_LDM.get(tail, tail).replace('.', '_')}"
        return f"middle_block_1_{tail.replace('.', '_')}"
    fixed = {
        "conv_in": "input_blocks_0_0",
        "conv_out": "out_2",
        "conv_norm_out": "out_0",
        "time_embedding.linear_1": "time_embed_0",
        "time_embedding.linear_2": "time_embed_2",
        "add_embedding.linear_1": "label_emb_0_0",
        "add_embedding.linear_2": "label_emb_0_2",
    }
    return fixed.get(name)


@dataclass(frozen=True)
class Target:
    """One mergeable layer of the pipeline."""

    component: str
    module: str

    @property
    def is_text_encoder(self) -> bool:
        return self.component != "unet"


class TargetIndex:
    """Every spelling a LoRA file may use for each mergeable layer of the pipeline."""

    def __init__(self, pipe: Any) -> None:
        self.modules: dict[Target, torch.nn.Module] = {}
        self.aliases: dict[str, dict[str, Target]] = {}
        self.ldm_names: dict[Target, str] = {}  # UNet layer -> LDM name (block weights)
        for component in COMPONENTS:
            model = getattr(pipe, component, None)
            if not isinstance(model, torch.nn.Module):
                continue
            table: dict[str, Target] = {}
            ldm: dict[str, Target] = {}
            config = getattr(model, "config", None)
            per = getattr(config, "layers_per_block", 2) if component == "unet" else 0
            per = per if isinstance(per, int) else per[0]
            up_attn = ["CrossAttn" in t for t in (getattr(config, "up_block_types", None) or [])]
            for name, module in model.named_modules():
                if not isinstance(module, MERGEABLE) or getattr(module, "weight", None) is None:
                    continue
                target = Target(component, name)
                self.modules[target] = module
                table[name.replace(".", "_")] = target
                if component == "unet":
                    old = ldm_unet_name(name, per, up_attn)
                    if old:
                        self.ldm_names[target] = old
                        ldm[old] = target
                        ldm["diffusion_model_" + old] = target
                elif name.startswith("text_model."):
                    table[name[len("text_model.") :].replace(".", "_")] = target
                else:
                    table["text_model_" + name.replace(".", "_")] = target
            for alias, target in ldm.items():
                table.setdefault(alias, target)
            self.aliases[component] = table

    def find(self, group: Group[Any]) -> Target | None:
        """The layer a group names, checking that the shapes can fit."""
        components = [group.component] if group.component else list(self.aliases)
        for component in components:
            target = self.aliases.get(component, {}).get(group.name)
            if target is not None and _fits(group, self.modules[target]):
                return target
        return None


def _fits(group: Group[Any], module: torch.nn.Module) -> bool:
    """Cheap shape check: the group's tensors must fit the layer's weight."""
    weight = module.weight
    kind = group.kind
    is_norm = isinstance(module, torch.nn.LayerNorm | torch.nn.GroupNorm)
    if kind == "norm":
        return is_norm and math.prod(shape_of(group.parts["w_norm"])) == weight.numel()
    if kind == "full":
        return math.prod(shape_of(group.parts["diff"])) == weight.numel()
    if is_norm:
        return False
    if kind == "lora":
        up, down = shape_of(group.parts["up"]), shape_of(group.parts["down"])
        if "mid" in group.parts:
            return up[0] == weight.shape[0] and down[1] == weight.shape[1]
        numel = up[0] * math.prod(down[1:])
        return up[0] == weight.shape[0] and numel == weight.numel()
    if kind == "ia3":
        return math.prod(shape_of(group.parts["weight"])) in weight.shape[:2]
    if kind in ("oft", "boft"):
        blocks = shape_of(group.parts.get("oft_blocks", group.parts.get("oft_diag", ())))
        return blocks[-3] * blocks[-1] == weight.shape[0] if len(blocks) >= 3 else False
    return True
