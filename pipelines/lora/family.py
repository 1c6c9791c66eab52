"""Which Stable Diffusion family a LoRA is for, from its keys and shapes (metadata only
reported when it disagrees)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipelines.lora.keys import FAMILIES, Group, shape_of

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class LoraArchitecture:
    """The families a file can belong to, from keys and shapes, and why.

    `families` holds more than one family when keys and shapes cannot tell (a tiny test
    LoRA, a UNet-only file with unusual widths); compatibility is then decided by
    matching the file's modules against the model. `metadata_family` is what the kohya
    metadata claims; `disagreement` says so when it contradicts the keys.
    """

    families: tuple[str, ...]
    evidence: str
    metadata_family: str | None = None
    disagreement: str | None = None

    @property
    def family(self) -> str | None:
        return self.families[0] if len(self.families) == 1 else None

    @property
    def label(self) -> str:
        return "/".join(self.families)


def metadata_family(metadata: Mapping[str, str]) -> str | None:
    """A1111's reading of kohya metadata: sdxl_* -> SDXL, ss_v2 == "True" -> SD2."""
    version = str(metadata.get("ss_base_model_version", ""))
    if version.startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True" or version.startswith("sd_v2"):
        return "SD2"
    if version.startswith("sd_v1") or "ss_network_module" in metadata:
        return "SD1"
    return None


def detect_lora_architecture(
    groups: Mapping[str, Group[Any]], metadata: Mapping[str, str] | None = None
) -> LoraArchitecture:
    """Which families a LoRA can be for, from its key names and tensor shapes."""
    families: set[str] = set(FAMILIES)
    evidence: list[str] = []
    names = [g.key for g in groups.values()]
    components = {g.component for g in groups.values()}
    if any(k.startswith(("lora_te1_", "lora_te2_")) for k in names) or "text_encoder_2" in (
        components
    ):
        families &= {"SDXL"}
        evidence.append("two text encoders")
    elif any(k.startswith("lora_te_") for k in names):
        families &= {"SD1", "SD2"}
        evidence.append("one text encoder")
    if any(re.search(r"(add_embedding|label_emb)", g.name) for g in groups.values()):
        families &= {"SDXL"}
        evidence.append("size/crop embedding")
    widths = {768: "SD1", 1024: "SD2", 2048: "SDXL"}
    for group in groups.values():
        down = group.parts.get("down")
        if down is None:
            continue
        in_features = shape_of(down)[1] if len(shape_of(down)) >= 2 else 0
        if re.search(r"attn2_to_[kv]$", group.name) and in_features in widths:
            families &= {widths[in_features]}
            evidence.append(f"cross-attention context width {in_features}")
            break
        te = group.component in ("text_encoder", None) and "self_attn_q_proj" in group.name
        if te and group.key.startswith(("lora_te_", "text_encoder.")):
            if in_features == 768:
                families &= {"SD1", "SDXL"}
                evidence.append("text encoder width 768")
            elif in_features == 1024:
                families &= {"SD2"}
                evidence.append("text encoder width 1024")
    claimed = metadata_family(metadata or {})
    found = tuple(f for f in FAMILIES if f in families)
    disagreement = None
    if claimed and found and claimed not in found:
        disagreement = (
            f"metadata says {claimed} but keys and shapes say {'/'.join(found)}; "
            "the keys are trusted"
        )
    if not found:
        found = tuple(FAMILIES)
        evidence.append("contradictory evidence")
    return LoraArchitecture(found, ", ".join(evidence) or "no telling keys", claimed, disagreement)
