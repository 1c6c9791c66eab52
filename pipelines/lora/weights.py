"""How strongly a LoRA acts where and when: block weights and per-step weight schedules.

Two extensions made these popular in A1111, and their tag syntax is what users paste:

- block weights, `<lora:x:1:in=0.5:mid=1:out=0.8>` (SD.Next's three UNet regions) or
  `<lora:x:1:lbw=INALL>` / `lbw=1,0,0,...` (hako-mikan/sd-webui-lora-block-weight's
  17/26 blocks for SD1/SD2 and 12/20 for SDXL; its first value, BASE, scales the text
  encoders);
- keyframe schedules, `<lora:x:0@0,1@0.5>` (cheald/sd-webui-loractl, also in SD.Next):
  `weight@position` pairs, linearly interpolated (`np.interp`) over the steps of a pass.

Everything here is pure data and arithmetic; the adapter stack multiplies each layer's
delta by `layer_ratio` and the denoising loop asks `weight_at` for each step.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from pipelines.errors import InvalidRequestError

# --------------------------------------------------------------------------- schedules


@dataclass(frozen=True)
class WeightSchedule:
    """loractl keyframes: `(weight, position)` pairs sorted by strictly rising position.

    Positions up to 1 (the last one ≤ 1) are fractions of the pass: 0 is its first step,
    1 its last. Larger positions are step numbers counted from 1, so `0@5,1@6` is off for
    the first five steps and on from the sixth. Before the first keyframe the weight is
    the first one's, after the last the last one's (`np.interp`).
    """

    keyframes: tuple[tuple[float, float], ...]

    @property
    def absolute(self) -> bool:
        """Whether positions are step numbers (loractl: the last position is above 1)."""
        return self.keyframes[-1][1] > 1

    @property
    def constant(self) -> bool:
        """Whether every keyframe has the same weight (then no step ever re-merges)."""
        return len({weight for weight, _ in self.keyframes}) == 1

    def at(self, step: int, steps: int) -> float:
        """The weight at 0-based `step` of a pass of `steps` steps."""
        position = float(step + 1) if self.absolute else step / max(steps - 1, 1)
        weights = [weight for weight, _ in self.keyframes]
        positions = [at for _, at in self.keyframes]
        return float(np.interp(position, positions, weights))

    def scaled(self, factor: float) -> WeightSchedule:
        """Every keyframe's weight times `factor` (a tag repeated n times acts n times)."""
        return WeightSchedule(tuple((w * factor, at) for w, at in self.keyframes))

    def text(self) -> str:
        """The keyframes as written in a tag: `0@0,1@0.5`."""
        return ",".join(f"{_number(w)}@{_number(at)}" for w, at in self.keyframes)


Weight = float | WeightSchedule
"""A multiplier: a number, or keyframes over the steps of a pass."""


def weight_at(weight: Weight, step: int, steps: int) -> float:
    """The multiplier `weight` stands for at 0-based `step` of `steps`."""
    return weight.at(step, steps) if isinstance(weight, WeightSchedule) else float(weight)


def weight_text(weight: Weight) -> str:
    """A weight as a tag writes it: `0.8` or `0@0,1@0.5`."""
    return weight.text() if isinstance(weight, WeightSchedule) else _number(weight)


def is_scheduled(weight: Weight | None) -> bool:
    """Whether a weight changes between steps (a constant schedule does not)."""
    return isinstance(weight, WeightSchedule) and not weight.constant


def parse_weight(text: str, where: str, field: str = "prompt") -> Weight:
    """A tag's multiplier: a number, or loractl keyframes `w@p,w@p,...` (`,` or `;`
    between them; a keyframe without `@p` sits at position 1, as in loractl).

    Raises InvalidRequestError naming `field` and quoting `where` for anything else.
    """
    if "@" not in text:
        return _finite(text, where, field)
    keyframes: list[tuple[float, float]] = []
    for item in re.split("[,;]", text):
        weight, _, at = item.partition("@")
        keyframes.append((_finite(weight, where, field), _finite(at, where, field) if at else 1.0))
    return schedule_from(keyframes, where, field)


def schedule_from(
    keyframes: list[tuple[float, float]], where: str, field: str = "prompt"
) -> WeightSchedule:
    """Sorted keyframes (loractl sorts by position); two at one position are refused, since
    `np.interp` gives no defined value there."""
    ordered = sorted(keyframes, key=lambda item: item[1])
    positions = [at for _, at in ordered]
    if any(at < 0 for at in positions):
        raise InvalidRequestError(f"{field}: {where} has a keyframe before position 0", field=field)
    if len(set(positions)) != len(positions):
        raise InvalidRequestError(
            f"{field}: {where} has two keyframes at one position; for a sudden change put "
            "them on neighbouring steps, e.g. 0@5,1@6",
            field=field,
        )
    return WeightSchedule(tuple(ordered))


def _finite(text: str, where: str, field: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise InvalidRequestError(
            f"{field}: {where} has the multiplier {text!r}; expected a number such as 0.8 "
            "or keyframes such as 0@0,1@0.5",
            field=field,
        )
    return value


def _number(value: float) -> str:
    """1, 0.8, -0.25: as A1111's UI writes a multiplier."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


# --------------------------------------------------------------------------- blocks

BLOCK_IDS: tuple[str, ...] = (
    "BASE",
    *(f"IN{i:02d}" for i in range(12)),
    "M00",
    *(f"OUT{i:02d}" for i in range(12)),
)
"""lora-block-weight's 26 block ids (`BLOCKID26`): the text encoders, then the LDM UNet's
`input_blocks.N`, `middle_block` and `output_blocks.N`."""

LAYOUTS: dict[int, tuple[str, ...]] = {
    17: (
        "BASE",
        "IN01",
        "IN02",
        "IN04",
        "IN05",
        "IN07",
        "IN08",
        "M00",
        *(f"OUT{i:02d}" for i in range(3, 12)),
    ),
    26: BLOCK_IDS,
    12: ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6))),
    20: ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9))),
}
"""lbw value counts and the blocks they name (`BLOCKID17/26/12/20`): 17 and 12 are the
blocks with attention (what a plain LoRA trains), 26 and 20 every block (LoCon)."""

FAMILY_LAYOUTS: dict[str, tuple[int, ...]] = {"SD1": (17, 26), "SD2": (17, 26), "SDXL": (12, 20)}

PRESETS: dict[int, dict[str, tuple[float, ...]]] = {
    17: {
        "NONE": (0,) * 17,
        "ALL": (1,) * 17,
        "INS": (1, 1, 1, 1, *(0,) * 13),
        "IND": (1, 0, 0, 0, 1, 1, 1, *(0,) * 10),
        "INALL": (1, 1, 1, 1, 1, 1, 1, *(0,) * 10),
        "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, *(0,) * 5),
        "OUTD": (1, *(0,) * 7, 1, 1, 1, 1, *(0,) * 5),
        "OUTS": (1, *(0,) * 11, *(1,) * 5),
        "OUTALL": (1, *(0,) * 7, *(1,) * 9),
        "ALL0.5": (0.5,) * 17,
    },
    12: {
        "NONE": (0,) * 12,
        "ALL": (1,) * 12,
        "INALL": (1, 1, 1, 1, 1, *(0,) * 7),
        "MIDALL": (1, 0, 0, 0, 0, 1, *(0,) * 6),
        "OUTALL": (1, *(0,) * 5, *(1,) * 6),
        "ALL0.5": (0.5,) * 12,
    },
}
"""Named lbw presets: SD1/SD2's are lora-block-weight's built-in `DEF_WEIGHT_PRESET`; the
extension ships none for SDXL, so SDXL's are ComfyUI-Inspire-Pack's `SDXL-*` presets
(`lbw-preset.txt`) without the prefix, plus ALL0.5."""

REGION_KEYS = ("in", "mid", "out")


@dataclass(frozen=True)
class BlockWeights:
    """Per-block multipliers of one LoRA, on top of its weight: either SD.Next's three UNet
    regions (`down` = `in=`, `mid`, `up` = `out=`; None = 1) or lora-block-weight's `lbw`
    (a preset name, or one value per block of a layout). Never both.

    A layer's multiplier is the LoRA's weight × the ratio of the layer's block, so
    `in=1:mid=1:out=1` is the plain LoRA at any weight. (SD.Next reads in/mid/out as the
    region's weight in place of the UNet weight; at weight 1 the two agree.)
    """

    down: float | None = None
    mid: float | None = None
    up: float | None = None
    lbw: str | tuple[float, ...] | None = None

    def check(self, field: str) -> BlockWeights:
        """Raise InvalidRequestError naming `field` when the two forms are mixed, a preset
        is unknown or a value list has no layout's length; else return self."""
        regions = (self.down, self.mid, self.up)
        if self.lbw is not None and any(value is not None for value in regions):
            raise InvalidRequestError(
                f"{field}: in/mid/out and lbw= both set block weights; use one of them",
                field=field,
            )
        for key, value in zip(REGION_KEYS, regions, strict=True):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
            ):
                raise InvalidRequestError(f"{field}: {key}= must be a finite number", field=field)
        if isinstance(self.lbw, str):
            if not any(self.lbw in presets for presets in PRESETS.values()):
                raise InvalidRequestError(
                    f"{field}: unknown lbw preset {self.lbw!r}; presets: "
                    f"{', '.join(preset_names())}, or one value per block "
                    f"({', '.join(str(n) for n in sorted(LAYOUTS))} values)",
                    field=field,
                )
        elif self.lbw is not None:
            if len(self.lbw) not in LAYOUTS:
                raise InvalidRequestError(
                    f"{field}: lbw= has {len(self.lbw)} values; lora-block-weight's layouts "
                    "have 17 or 26 (SD1, SD2) and 12 or 20 (SDXL)",
                    field=field,
                )
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in self.lbw):
                raise InvalidRequestError(f"{field}: lbw= values must be numbers", field=field)
        return self

    def values(self, family: str, field: str = "loras") -> dict[str, float] | None:
        """lbw's value of each of the 26 block ids for a `family` model (blocks its layout
        leaves out are 0, as the extension's `to26` makes them), or None for in/mid/out.

        Raises InvalidRequestError when the preset or the value count does not fit the
        family's layouts, naming those that do.
        """
        if self.lbw is None:
            return None
        counts = FAMILY_LAYOUTS.get(family, ())
        if isinstance(self.lbw, str):
            found = [PRESETS[n][self.lbw] for n in counts if self.lbw in PRESETS.get(n, {})]
            if not found:
                names = [name for n in counts for name in PRESETS.get(n, {})]
                raise InvalidRequestError(
                    f"{field}: lbw preset {self.lbw!r} has no {family} layout; {family} "
                    f"presets: {', '.join(names) or 'none'}",
                    field=field,
                )
            values = found[0]
        else:
            if len(self.lbw) not in counts:
                raise InvalidRequestError(
                    f"{field}: lbw= has {len(self.lbw)} values; a {family} model takes "
                    f"{' or '.join(str(n) for n in counts) or 'no block weights'}",
                    field=field,
                )
            values = self.lbw
        by_id = dict.fromkeys(BLOCK_IDS, 0.0)
        by_id.update(zip(LAYOUTS[len(values)], (float(v) for v in values), strict=True))
        return by_id

    def text(self) -> str:
        """The tag items for these block weights: `in=0.5:out=0.8` or `lbw=INALL`."""
        if self.lbw is not None:
            lbw = self.lbw if isinstance(self.lbw, str) else ",".join(map(_number, self.lbw))
            return f"lbw={lbw}"
        items = zip(REGION_KEYS, (self.down, self.mid, self.up), strict=True)
        return ":".join(f"{key}={_number(value)}" for key, value in items if value is not None)


def preset_names() -> list[str]:
    """Every preset name, SD1/SD2's first."""
    return list(dict.fromkeys(name for presets in PRESETS.values() for name in presets))


_LDM_BLOCK = re.compile(r"^(?:diffusion_model_)?(input_blocks|middle_block|output_blocks)_(\d+)")


def block_id(is_text_encoder: bool, ldm_name: str | None) -> str | None:
    """A layer's lbw block id: BASE for the text encoders, `INnn`/`M00`/`OUTnn` for the
    UNet's LDM blocks, None for layers in none (time embedding, final norm and conv)."""
    if is_text_encoder:
        return "BASE"
    match = _LDM_BLOCK.match(ldm_name or "")
    if match is None:
        return None
    kind, number = match.group(1), int(match.group(2))
    if kind == "middle_block":
        return "M00"
    return f"{'IN' if kind == 'input_blocks' else 'OUT'}{number:02d}"


def layer_ratio(
    blocks: BlockWeights | None,
    lbw_values: dict[str, float] | None,
    is_text_encoder: bool,
    region: str,
    ldm_name: str | None,
) -> float:
    """The factor on one layer's delta.

    Args:
        blocks: the LoRA's block weights (None: 1 everywhere).
        lbw_values: `blocks.values(family)`, computed once per LoRA.
        is_text_encoder: the layer is in a text encoder.
        region: `coverage.unet_region` of a UNet layer ("UNet down", ...).
        ldm_name: the UNet layer's LDM name (`input_blocks_4_1_...`), None if it has none.
    Returns:
        lbw: the value of the layer's block (BASE for the text encoders; 1 for a layer in
        no block, as the extension leaves unmatched keys). in/mid/out: 1 for the text
        encoders, else the region's value; layers outside down/mid/up take `in`, as SD.Next.
    """
    if blocks is None:
        return 1.0
    if lbw_values is not None:
        found = block_id(is_text_encoder, ldm_name)
        return 1.0 if found is None else lbw_values[found]
    if is_text_encoder:
        return 1.0
    value = {"UNet mid": blocks.mid, "UNet up": blocks.up}.get(region, blocks.down)
    return 1.0 if value is None else float(value)


def base_ratio(blocks: BlockWeights | None, family: str) -> float:
    """The text encoders' factor: lbw's BASE value, else 1 (part of the prompt cache key)."""
    values = None if blocks is None else blocks.values(family)
    return 1.0 if values is None else values["BASE"]
