"""LoRA key spellings: which module and which part each tensor of a file is.

kohya, LyCORIS, diffusers/PEFT and old attention-processor spellings are grouped by target
module; a group is model-independent, so parsing is done once per file.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

COMPONENTS: tuple[str, ...] = ("unet", "text_encoder", "text_encoder_2")
FAMILIES: tuple[str, ...] = ("SD1", "SD2", "SDXL")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# Key suffix -> part name. Longest suffixes first, so `.lora_down.weight` wins over `.weight`.
_SUFFIXES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {
            ".lora_down.weight": "down",
            ".lora_up.weight": "up",
            ".lora_mid.weight": "mid",
            ".lora_A.weight": "down",
            ".lora_B.weight": "up",
            ".lora_A.default.weight": "down",
            ".lora_B.default.weight": "up",
            ".lora.down.weight": "down",
            ".lora.up.weight": "up",
            ".lora_linear_layer.down.weight": "down",
            ".lora_linear_layer.up.weight": "up",
            ".lora_magnitude_vector": "magnitude",
            ".lora_magnitude_vector.weight": "magnitude",
            ".lora_magnitude_vector.default.weight": "magnitude",
            ".dora_scale": "dora_scale",
            ".alpha": "alpha",
            ".scale": "scale",
            ".wd_for_diff": "wd_for_diff",
            **{f".hada_{p}": f"hada_{p}" for p in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")},
            **{
                f".lokr_{p}": f"lokr_{p}"
                for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")
            },
            # IA3 (`weight` is the learned vector), full diffs, norms, GLoRA, OFT/BOFT
            ".weight": "weight",
            ".on_input": "on_input",
            ".diff": "diff",
            ".diff_b": "diff_b",
            ".w_norm": "w_norm",
            ".b_norm": "b_norm",
            **{f".{p}.weight": p for p in ("a1", "a2", "b1", "b2", "bm")},
            ".oft_blocks": "oft_blocks",
            ".oft_diag": "oft_diag",
            ".rescale": "rescale",
        }.items(),
        key=lambda item: -len(item[0]),
    )
)
KINDS: tuple[str, ...] = ("lora", "loha", "lokr", "ia3", "full", "norm", "glora", "oft", "boft")
"""Every network type we merge (A1111 1.10's network modules), in `file_format` order."""
_OLD_PROCESSOR = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_PREFIXES: tuple[tuple[str, str | None, str], ...] = (
    # (key prefix, component or None = "find it", naming style)
    ("lora_unet_", "unet", "kohya"),
    ("lora_te1_", "text_encoder", "kohya"),
    ("lora_te2_", "text_encoder_2", "kohya"),
    ("lora_te_", "text_encoder", "kohya"),
    ("lycoris_", None, "kohya"),
    ("unet.", "unet", "dotted"),
    ("text_encoder_2.", "text_encoder_2", "dotted"),
    ("text_encoder.", "text_encoder", "dotted"),
    ("base_model.model.", None, "dotted"),
)


# --------------------------------------------------------------------------- parsing


T = TypeVar("T")


@dataclass(frozen=True)
class Group(Generic[T]):
    """The parts of one target module in a file. `component` None: to be found by name.

    `name` is the module path as the file spells it, with `.` turned into `_`, so kohya,
    lycoris and diffusers/PEFT spellings all match the same aliases.
    """

    key: str
    component: str | None
    name: str
    parts: dict[str, T]

    @property
    def kind(self) -> str:
        """One of KINDS, or "unsupported" (missing halves, parts of no known type)."""
        keys = set(self.parts)
        if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys:
            return "loha"
        has_w1 = "lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys
        has_w2 = "lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys
        if has_w1 and has_w2:
            return "lokr"
        if {"up", "down"} <= keys:
            return "lora"
        if {"weight", "on_input"} <= keys:
            return "ia3"
        if "diff" in keys:
            return "full"
        if "w_norm" in keys:
            return "norm"
        if {"a1", "a2", "b1", "b2"} <= keys:
            return "glora"
        for blocks in ("oft_blocks", "oft_diag"):
            if blocks in keys:
                return "boft" if len(shape_of(self.parts[blocks])) == 4 else "oft"
        return "unsupported"


def _split_key(key: str) -> tuple[str, str] | None:
    """Full key -> (module part, part name), or None for keys no format we know uses."""
    old = _OLD_PROCESSOR.match(key)
    if old:
        module = f"{old.group(1)}.{old.group(2)}" + (".0" if old.group(2) == "to_out" else "")
        return module, old.group(3)
    for suffix, part in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _locate(module: str) -> tuple[str | None, str]:
    """Module part of a key -> (component or None, underscored module name)."""
    for prefix, component, _style in _PREFIXES:
        if module.startswith(prefix):
            return component, module[len(prefix) :].replace(".", "_")
    return None, module.replace(".", "_")


def group_keys(values: Mapping[str, T]) -> tuple[dict[str, Group[T]], list[str]]:
    """Group a state dict (tensors, or shapes from a header) by target module.

    Returns the groups and the keys that belong to no format we merge.
    """
    grouped: dict[str, dict[str, T]] = {}
    unknown: list[str] = []
    for key, value in values.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        module, part = split
        grouped.setdefault(module, {})[part] = value
    groups: dict[str, Group[T]] = {}
    for module, parts in grouped.items():
        component, name = _locate(module)
        groups[module] = Group(module, component, name, parts)
    return groups, unknown


def file_format(groups: Mapping[str, Group[Any]], folder: bool = False) -> str:
    """A short label of the file's format, for the registry and messages."""
    kinds = {g.kind for g in groups.values()} - {"unsupported"}
    dora = any({"dora_scale", "magnitude"} & set(g.parts) for g in groups.values())
    if folder:
        label = "peft-folder"
    elif any(g.key.startswith(("lora_", "lycoris_")) for g in groups.values()):
        label = "kohya"
    else:
        label = "diffusers"
    label += "".join(f"+{kind}" for kind in KINDS[1:] if kind in kinds)
    return label + ("+dora" if dora else "")


def shape_of(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def group_rank(group: Group[Any]) -> int | None:
    """The rank A1111 divides alpha by: rows of lora_down / hada_w1_b / a low-rank LoKr b."""
    for part in ("down", "hada_w1_b", "lokr_w1_b", "lokr_w2_b"):
        if part in group.parts:
            return shape_of(group.parts[part])[0]
    return None


def parts_touched(groups: Mapping[str, Group[Any]]) -> tuple[str, ...]:
    """Which pipeline parts a file touches: "unet", "te" (SD1/2), "te1"/"te2" (SDXL)."""
    found: set[str] = set()
    for group in groups.values():
        if (
            group.key.startswith("lora_te1_")
            or group.component == "text_encoder"
            and any(g.component == "text_encoder_2" for g in groups.values())
        ):
            found.add("te1")
        elif group.component == "text_encoder_2":
            found.add("te2")
        elif group.component == "text_encoder":
            found.add("te")
        elif group.component == "unet" or "blocks" in group.name or "conv_" in group.name:
            found.add("unet")
        elif "text_model" in group.name or "layers" in group.name:
            found.add("te")
        else:
            found.add("unet")
    return tuple(p for p in ("unet", "te", "te1", "te2") if p in found)
