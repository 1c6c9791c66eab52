"""How much of a LoRA file reached the model: matched and skipped modules by region.

A file's modules are counted per region (text encoder(s), UNet down / mid / up / other),
so "lora key not loaded" is never silent: every applied LoRA gets a report, a file where
nothing matches is refused with it, and a partial match names what was skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipelines.lora.keys import Group

REGIONS: tuple[str, ...] = (
    "text encoder",
    "text encoder 2",
    "UNet down",
    "UNet mid",
    "UNet up",
    "UNet other",
)
SHOWN_KEYS = 3
"""Skipped keys quoted in a one-line summary (the API lists them all)."""

_TEXT_HINTS = re.compile(r"(text_model|encoder_layers|self_attn|mlp_fc|final_layer_norm)")


def unet_region(name: str) -> str:
    """A UNet module name, in any spelling (diffusers, LDM, `_` or `.`), -> its region."""
    if re.search(r"(down_blocks|input_blocks)", name):
        return "UNet down"
    if re.search(r"(mid_block|middle_block)", name):
        return "UNet mid"
    if re.search(r"(up_blocks|output_blocks)", name):
        return "UNet up"
    return "UNet other"


def region_of(component: str | None, name: str, key: str = "") -> str:
    """The region of a module: its component when known, else guessed from the key."""
    if component == "text_encoder_2" or key.startswith("lora_te2_"):
        return "text encoder 2"
    if component == "text_encoder" or key.startswith(("lora_te_", "lora_te1_")):
        return "text encoder"
    if component is None and _TEXT_HINTS.search(name):
        return "text encoder"
    return unet_region(name)


def group_region(group: Group[Any]) -> str:
    """The region a file's group claims to be in (used for groups that matched nothing)."""
    return region_of(group.component, group.name, group.key)


@dataclass(frozen=True)
class LoraCoverage:
    """One applied LoRA against one model: how many of its modules matched, by region.

    `regions` holds (region, matched, total) for the regions the file touches, in
    REGIONS order; `skipped` the file's module keys that match no layer; `ignored` keys of
    a kind we do not merge (or that no format uses).
    """

    name: str
    matched: int
    total: int
    regions: tuple[tuple[str, int, int], ...]
    skipped: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()

    @property
    def complete(self) -> bool:
        return self.matched == self.total and not self.ignored

    def breakdown(self) -> str:
        """`text encoder 4/4, UNet down 3/4, ...`."""
        return ", ".join(f"{region} {hit}/{of}" for region, hit, of in self.regions)

    def summary(self) -> str:
        """One line for notes, the CLI and the log."""
        return f"LoRA '{self.name}': {self.details()}"

    def details(self) -> str:
        """The summary without the LoRA's name."""
        text = f"{self.matched} of {self.total} modules matched ({self.breakdown()})"
        if self.skipped:
            shown = ", ".join(repr(k) for k in self.skipped[:SHOWN_KEYS])
            more = len(self.skipped) - SHOWN_KEYS
            text += f"; skipped {len(self.skipped)}: {shown}" + (
                f" and {more} more" if more > 0 else ""
            )
        if self.ignored:
            shown = ", ".join(repr(k) for k in self.ignored[:SHOWN_KEYS])
            more = len(self.ignored) - SHOWN_KEYS
            text += f"; {len(self.ignored)} keys of a kind we do not merge ignored: {shown}" + (
                f" and {more} more" if more > 0 else ""
            )
        return text

    def as_dict(self) -> dict[str, Any]:
        """The API's `lora_coverage` entry (plain JSON types)."""
        return {
            "name": self.name,
            "matched": self.matched,
            "total": self.total,
            "complete": self.complete,
            "regions": {region: {"matched": hit, "total": of} for region, hit, of in self.regions},
            "skipped": list(self.skipped),
            "ignored": list(self.ignored),
        }


def count_regions(matched: list[str], skipped: list[str]) -> tuple[tuple[str, int, int], ...]:
    """(region, matched, total) for every region that appears, from region labels."""
    out = []
    for region in REGIONS:
        hit = matched.count(region)
        total = hit + skipped.count(region)
        if total:
            out.append((region, hit, total))
    return tuple(out)
