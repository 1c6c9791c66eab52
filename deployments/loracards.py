"""A LoRA's card on disk: the sidecar files A1111 and its Civitai helpers use, written from
what a source (Civitai, a Hub model card) says about the file, or from a rendered image.

- `NAME.civitai.info`: Civitai's model-version record as the API returned it (Civitai
  Helper's cache), replaced on every fetch.
- `NAME.json`: A1111's user metadata (`description`, `sd version`, `activation text`,
  `preferred weight`, `notes`). Fetched values fill only the keys the user left empty, so a
  fetch never overwrites the user's own edits.
- `NAME.preview.png`: the source's first image, re-encoded as a PNG; written only when the
  LoRA has no preview yet. "Make preview" writes `NAME.png` and replaces it (A1111's
  "replace preview"), which the registry prefers over any other preview.

Every file is written to a hidden temporary name beside it and renamed into place, so a
reader sees the old file or the new one, never half of one. Nothing here knows a user's
token or key: callers hand in only the data.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from pipelines.errors import UnusableFileError
from pipelines.folders.loras import PREVIEW_SUFFIXES
from pipelines.images import open_image

log = logging.getLogger(__name__)

SD_VERSIONS = ("SD1", "SD2", "SDXL")
"""A1111's `sd version` values besides "Unknown"."""
MAX_PREVIEW_SIDE = 1024
"""Previews larger than this are scaled down (a card shows a thumbnail)."""


@dataclass(frozen=True)
class CardInfo:
    """What a source says about a LoRA, in the sidecars' terms."""

    source: str  # "Civitai" or "Hub"
    page_url: str
    trigger_words: tuple[str, ...] = ()
    base_model: str | None = None  # as the source names it: "SD 1.5", "SDXL 1.0", a repo id
    description: str = ""
    civitai_info: dict[str, Any] | None = None  # the raw version record, for NAME.civitai.info


def sd_version(base_model: str | None, families: tuple[str, ...] = ()) -> str:
    """A1111's `sd version`: the file's own family when its keys tell one, else what the
    source's base model says (Civitai's "SD 1.5", "SDXL 1.0"; a Hub base-model repo id),
    else "Unknown".

    Example:
        >>> sd_version("SDXL 1.0"), sd_version("SD 1.5", ("SD1", "SD2"))
        ('SDXL', 'SD1')
    """
    if len(families) == 1 and families[0] in SD_VERSIONS:
        return families[0]
    said = (base_model or "").lower().replace("-", " ").replace("_", " ")
    if "xl" in said:
        guess = "SDXL"
    elif "sd 1" in said or "v1 5" in said or "diffusion v1" in said or "1.5" in said:
        guess = "SD1"
    elif "sd 2" in said or "diffusion 2" in said or "2.1" in said:
        guess = "SD2"
    else:
        return "Unknown"
    return guess if not families or guess in families else "Unknown"


def sidecar_base(weights: Path) -> Path:
    """The path the sidecars share, without suffix: `loras/ink` for `loras/ink.safetensors`
    and for a PEFT folder `loras/ink/` (as the registry reads them)."""
    stem = weights.name if weights.is_dir() else weights.stem
    return weights.parent / stem


def _write_atomic(target: Path, data: bytes) -> None:
    """Write beside `target` under a hidden name, then rename over it."""
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as writer:
            writer.write(data)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict[str, Any]:
    """The user's `NAME.json`, or {} when missing; a damaged one is left alone (refused)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UnusableFileError(
            f"{path.name} is unreadable ({error}); fix or remove it first", field="name"
        ) from None
    if not isinstance(data, dict):
        raise UnusableFileError(
            f"{path.name} holds no JSON object; fix or remove it first", field="name"
        )
    return data


def has_preview(weights: Path) -> bool:
    """Whether the registry finds a preview for this LoRA."""
    base = sidecar_base(weights)
    return any(base.parent.joinpath(base.name + s).is_file() for s in PREVIEW_SUFFIXES)


def preview_png(data: bytes, *, infotext: str | None = None) -> bytes:
    """Any image the source sent, checked (size, pixel bombs) and re-encoded as a PNG no
    larger than MAX_PREVIEW_SIDE; `infotext` goes into its "parameters" chunk."""
    with open_image(data, field="preview") as image:
        image.load()
        picture = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    picture.thumbnail((MAX_PREVIEW_SIDE, MAX_PREVIEW_SIDE), Image.Resampling.LANCZOS)
    info = PngImagePlugin.PngInfo()
    if infotext:
        info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def write_card(
    weights: Path, card: CardInfo, families: tuple[str, ...], preview: bytes | None
) -> list[str]:
    """Write the sidecars for `weights` from `card`; returns the names written.

    Args:
        weights: the listed LoRA file (or PEFT folder).
        card: what the source said.
        families: the families the file's own keys tell (for `sd version`).
        preview: the source's image bytes, or None; written only when no preview exists.
    Raises:
        UnusableFileError naming the sidecar when the user's `NAME.json` cannot be read.
    """
    base = sidecar_base(weights)
    written: list[str] = []
    # 1. Civitai's record, as Civitai Helper keeps it
    if card.civitai_info is not None:
        info = base.parent / f"{base.name}.civitai.info"
        _write_atomic(info, json.dumps(card.civitai_info, indent=4).encode())
        written.append(info.name)
    # 2. A1111's user metadata: fill what the user left empty
    sidecar = base.parent / f"{base.name}.json"
    metadata = _read_json(sidecar)
    fetched = {
        "description": card.description,
        "sd version": sd_version(card.base_model, families),
        "activation text": ", ".join(card.trigger_words),
        "notes": f"{card.source}: {card.page_url}",
    }
    changed = False
    for key, value in fetched.items():
        empty = metadata.get(key) in (None, "", "Unknown")
        if (value and value != "Unknown" and empty) or key not in metadata:
            metadata[key] = value
            changed = True
    if changed:
        _write_atomic(sidecar, json.dumps(metadata, indent=4, ensure_ascii=False).encode())
        written.append(sidecar.name)
    # 3. the preview, unless the LoRA has one
    if preview is not None and not has_preview(weights):
        target = base.parent / f"{base.name}.preview.png"
        _write_atomic(target, preview_png(preview))
        written.append(target.name)
    log.info("card of %s: wrote %s", base.name, ", ".join(written) or "nothing new")
    return written


def replace_preview(weights: Path, image: Image.Image, infotext: str | None) -> Path:
    """A1111's "replace preview": `image` (with its infotext) becomes `NAME.png`."""
    base = sidecar_base(weights)
    target = base.parent / f"{base.name}.png"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    _write_atomic(target, preview_png(buffer.getvalue(), infotext=infotext))
    return target
