"""PNG Info: read an image's generation parameters and turn them back into page values.

"Send to txt2img" fills every field `pipelines.recall` reads (shared with the API's
`infotext` field), the Hires fix section, the checkpoint and the styles: as A1111 ("Apply
if any"), the styles the prompts carry are taken out of them and selected instead. The
prompt keeps its `<lora:...>` tags as written (as A1111) and the stack is emptied, so the
image replays with exactly its LoRAs. Whatever is missing, and every parameter the page
does not apply, is reported, never silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frontends.page.controlnet_panel import recall_controlnet
from frontends.page.defaults import scheduler_label
from frontends.page.hires_panel import recall_hires
from frontends.page.refiner_panel import recall_refiner
from pipelines.images import open_image
from pipelines.infotext import parse_infotext, read_infotext
from pipelines.interface import GenerationService
from pipelines.recall import (
    CONTROLNET_KEY,
    HIRES_KEYS,
    UNDERSTOOD,
    listed_title,
    replay,
)

REPLAY_DEFAULTS: dict[str, Any] = {
    "subseed_strength": 0.0,
    "seed_resize_from_w": 0,
    "seed_resize_from_h": 0,
    "tiling": False,
    "eta_noise_seed_delta": 0,
}
"""What an infotext without these keys means, so a pasted one replays its image even when
the page held other values."""


@dataclass
class Recall:
    """Page values recovered from one infotext."""

    values: dict[str, Any] = field(default_factory=dict)  # schema.FIELDS name -> value
    checkpoint: str | None = None  # a listed title
    warnings: list[str] = field(default_factory=list)
    not_applied: list[str] = field(default_factory=list)  # infotext keys the page has no use for
    styles: list[str] = field(default_factory=list)  # styles.csv names, in applied order
    vae: str | None = None  # a listed VAE's name, when the infotext names one


@dataclass
class ImageInfo:
    """What an image carries: the A1111 infotext, and any other text chunks (raw)."""

    infotext: str | None
    other: dict[str, str]


def read_image_info(data: bytes | str | Path) -> ImageInfo:
    """Infotext (PNG chunk or EXIF UserComment) plus other text chunks, e.g. ComfyUI's
    `prompt`/`workflow` or InvokeAI's `invokeai_metadata`, shown as they are."""
    raw = Path(data).read_bytes() if isinstance(data, str | Path) else data
    infotext = read_infotext(raw)
    with open_image(raw) as image:
        chunks = dict(image.info)
    other = {
        str(key): value
        for key, value in chunks.items()
        if key != "parameters" and isinstance(value, str) and value
    }
    return ImageInfo(infotext, other)


def recall(text: str, service: GenerationService) -> Recall:
    """Page values for `text` (an A1111 infotext), with warnings for what is not here."""
    parsed = parse_infotext(text)
    found = replay(parsed, service)
    result = Recall(
        values={"prompt": found.prompt, "negative_prompt": found.negative_prompt, **found.values},
        checkpoint=found.checkpoint,
        warnings=[f"{problem}; left unchanged" for problem in found.malformed] + found.warnings,
        styles=found.styles,
        vae=found.vae,
    )
    if "scheduler" in result.values:
        result.values["scheduler"] = scheduler_label(result.values["scheduler"])
    result.values.update({k: v for k, v in REPLAY_DEFAULTS.items() if k not in result.values})

    def title(name: str) -> str | None:
        return listed_title(name, service)

    for recalled, warnings in (
        recall_hires(parsed.params, title),
        recall_refiner(parsed.params, title),
        recall_controlnet(parsed.params, service),
    ):
        result.values.update(recalled)
        result.warnings.extend(warnings)
    understood = UNDERSTOOD | (HIRES_KEYS if result.values.get("enable_hr") else set())
    # ControlNet units: recall_controlnet reports what each one could not restore
    understood |= {key for key in parsed.params if CONTROLNET_KEY.match(key)}
    result.not_applied = [key for key in parsed.params if key not in understood]
    return result
