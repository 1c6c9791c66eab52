"""A1111 infotext: the "parameters" text every A1111-compatible tool reads and writes.

The layout, key order, quoting and parsing follow A1111 v1.10 (`create_infotext` in
`modules/processing.py`, `quote`/`unquote`/`parse_generation_parameters` in
`modules/infotext_utils.py`), so images made here replay in A1111, Forge, Civitai and
friends, and theirs replay here. Storage follows A1111 too: a PNG `parameters` text chunk
(iTXt when the text is not Latin-1), or for JPEG/WebP the EXIF UserComment.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from pipelines.schema import HiresFix

_FIXED_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "Tiling",
)
"""Keys A1111's `create_infotext` writes first, in its order; extra keys follow."""

_TRAILING_ORDER: tuple[str, ...] = ("Version", "User")
"""Keys A1111 writes after every extra key."""

NEGATIVE_PREFIX = "Negative prompt:"

_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
"""A1111's `re_param`: one `Key: value` pair; a value is JSON-quoted or runs to a comma."""

_RE_IMAGESIZE = re.compile(r"^(\d+)x(\d+)$")

_PARSE_DEFAULTS = {"Clip skip": "1", "Schedule type": "Automatic"}
"""What A1111 assumes for keys an infotext leaves out."""

_EXIF_IFD = 0x8769
_EXIF_USER_COMMENT = 0x9286


def quote(value: object) -> str:
    """A1111's `quote`: JSON-quote a value containing `,`, `:` or a newline, else as is."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    """A1111's `unquote`: undo `quote` for a `"..."` value; anything else as is."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        loaded = json.loads(text)
    except ValueError:
        return text
    return loaded if isinstance(loaded, str) else text


def _format_value(value: object) -> str:
    """Numbers as A1111's UI writes them: 7.0 -> "7", so every front end writes the same."""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


def _is_empty(key: str, value: object) -> bool:
    """Values A1111 leaves out: None, "", and Clip skip 1 (the default)."""
    if value is None or (isinstance(value, str) and value == ""):
        return True
    if key == "Clip skip":
        try:
            return int(str(value)) <= 1
        except ValueError:
            return False
    return False


def format_infotext(prompt: str, negative_prompt: str, params: Mapping[str, object]) -> str:
    """Write A1111's infotext: prompt, `Negative prompt: ...`, then one line of params.

    Args:
        prompt: the positive prompt, `<lora:...>` tags included; may span lines.
        negative_prompt: its line is left out when empty.
        params: `Key: value` pairs. A1111's known keys (Steps, Sampler, Schedule type,
            CFG scale, Seed, Size, Model hash, Model, ..., Clip skip) come first in A1111's
            order, other keys in insertion order, Version last. None/"" values and
            `Clip skip` <= 1 are dropped; values with `,`, `:` or a newline are JSON-quoted.

    Returns:
        The text, e.g. `"a cat\\nNegative prompt: dog\\nSteps: 20, Sampler: Euler, ..."`.
    """
    fixed = [k for k in _FIXED_ORDER if k in params]
    trailing = [k for k in _TRAILING_ORDER if k in params]
    extra = [k for k in params if k not in _FIXED_ORDER and k not in _TRAILING_ORDER]
    parts = []
    for key in (*fixed, *extra, *trailing):
        value = params[key]
        if _is_empty(key, value):
            continue
        text = _format_value(value)
        # A1111 writes a key alone when its value equals it (flags set by extensions).
        parts.append(key if text == key else f"{key}: {quote(text)}")
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}".strip()


def format_lora_hashes(items: Iterable[tuple[str, str]]) -> str:
    """A1111's `Lora hashes` value: `name1: hash1, name2: hash2`.

    Names lose `:` and `,` (they would break the pairs); a repeated name keeps its first
    position and last hash, as A1111's dict does.
    """
    hashes: dict[str, str] = {}
    for name, short_hash in items:
        hashes[name.replace(":", "").replace(",", "")] = short_hash
    return ", ".join(f"{name}: {short_hash}" for name, short_hash in hashes.items())


def parse_lora_hashes(value: str) -> dict[str, str]:
    """Read a `Lora hashes` value back into name -> hash; malformed pieces are skipped."""
    hashes: dict[str, str] = {}
    for piece in value.split(","):
        name, sep, short_hash = piece.partition(":")
        if sep and name.strip() and short_hash.strip():
            hashes[name.strip()] = short_hash.strip()
    return hashes


@dataclass(frozen=True)
class ParsedInfotext:
    """An infotext read back: prompts, raw `Key: value` strings, and the typed basics.

    `params` holds every pair of the last line, unquoted, plus A1111's defaults for
    missing `Clip skip` ("1") and `Schedule type` ("Automatic"); `Size` stays there as
    written and is also split into `width`/`height`.
    """

    prompt: str
    negative_prompt: str
    params: dict[str, str] = field(default_factory=dict)
    width: int | None = None
    height: int | None = None
    lora_hashes: dict[str, str] = field(default_factory=dict)

    def a1111_parameters(self) -> dict[str, str]:
        """The dict A1111's `png-info` returns: Prompt, Negative prompt, `WxH` split to -1/-2."""
        result = {"Prompt": self.prompt, "Negative prompt": self.negative_prompt}
        for key, value in self.params.items():
            size = _RE_IMAGESIZE.match(value)
            if size is None:
                result[key] = value
            else:
                result[f"{key}-1"], result[f"{key}-2"] = size.group(1), size.group(2)
        return result


def parse_infotext(text: str) -> ParsedInfotext:
    """Parse an infotext as A1111's `parse_generation_parameters` does.

    The last line holds the parameters only if at least 3 `Key: value` pairs match there;
    otherwise it belongs to the prompt. Lines before one starting `Negative prompt:` are
    the prompt, lines from it on the negative prompt; every line is stripped, as in A1111.

    Example: `parse_infotext("cat\\nSteps: 20, Seed: 1, Size: 512x768").height` -> 768.
    """
    # 1. Split off the parameter line.
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""

    # 2. Prompt lines, then negative prompt lines.
    prompt: list[str] = []
    negative: list[str] = []
    in_negative = False
    for raw in lines:
        line = raw.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        (negative if in_negative else prompt).append(line)

    # 3. Parameters: unquote; an empty value is skipped (A1111 fails on it and moves on).
    params: dict[str, str] = {}
    for key, value in _RE_PARAM.findall(last):
        if not value:
            continue
        params[key] = unquote(value) if value[0] == '"' and value[-1] == '"' else value
    for key, default in _PARSE_DEFAULTS.items():
        params.setdefault(key, default)

    size = _RE_IMAGESIZE.match(params.get("Size", ""))
    return ParsedInfotext(
        prompt="\n".join(prompt),
        negative_prompt="\n".join(negative),
        params=params,
        width=int(size.group(1)) if size else None,
        height=int(size.group(2)) if size else None,
        lora_hashes=parse_lora_hashes(params.get("Lora hashes", "")),
    )


def write_png_with_infotext(image: Image.Image, infotext: str) -> bytes:
    """PNG bytes of `image` with a `parameters` text chunk (iTXt when not Latin-1)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    # Pillow writes tEXt for Latin-1 text and falls back to iTXt (UTF-8) otherwise.
    info.add_text("parameters", infotext)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _decode_user_comment(data: bytes) -> str:
    """Decode an EXIF UserComment: an 8-byte charset prefix, then the text.

    A1111 writes it with piexif as `UNICODE\\0` + UTF-16 big-endian; some tools write
    little-endian, so the byte order is taken from a BOM, else from where the zero bytes
    of ASCII characters sit.
    """
    prefix, body = data[:8], data[8:]
    if prefix == b"UNICODE\x00":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            text = body.decode("utf-16")
        else:
            even_zeros = body[0::2].count(0)
            odd_zeros = body[1::2].count(0)
            text = body.decode("utf-16-le" if odd_zeros > even_zeros else "utf-16-be", "replace")
    elif prefix == b"ASCII\x00\x00\x00":
        text = body.decode("utf-8", "replace")
    elif prefix == b"JIS\x00\x00\x00\x00\x00":
        text = body.decode("shift_jis", "replace")
    elif prefix == b"\x00" * 8:
        text = body.decode("utf-8", "replace")
    else:
        text = data.decode("utf-8", "ignore")
    return text.rstrip("\x00")


def read_infotext(source: bytes | str | os.PathLike[str] | Image.Image) -> str | None:
    """The infotext stored in an image, wherever A1111 puts it, or None.

    Reads a PNG `parameters` chunk (tEXt or iTXt), else the EXIF UserComment (JPEG, WebP),
    else a GIF `comment`. `source` is image bytes, a path, or an open Pillow image.

    Raises:
        InvalidRequestError: the bytes or file are not an image Pillow can open.
    """
    from PIL import Image

    from pipelines.images import open_image

    if isinstance(source, Image.Image):
        return _read_open(source)
    with open_image(source) as image:
        return _read_open(image)


def _read_open(image: Image.Image) -> str | None:
    """`read_infotext` on an image Pillow has opened."""
    parameters = image.info.get("parameters")
    if isinstance(parameters, str) and parameters:
        return str(parameters)
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_EXIF_USER_COMMENT)
    if isinstance(comment, bytes) and comment:
        return _decode_user_comment(comment) or None
    if isinstance(comment, str) and comment:
        return comment
    gif_comment = image.info.get("comment")
    if isinstance(gif_comment, bytes) and gif_comment:
        return gif_comment.decode("utf-8", "ignore")
    return None


def hires_from_params(params: Mapping[str, str]) -> HiresFix | None:
    """The hires fix an infotext's `Hires ...` keys describe (None without them), so a
    pasted hires infotext replays its image. Raises ValueError on a malformed value."""
    from pipelines.schema import HiresFix

    if not any(key.startswith("Hires ") for key in params):
        return None
    resize_x = resize_y = 0
    if "Hires resize" in params:
        width, _, height = params["Hires resize"].partition("x")
        resize_x, resize_y = int(width), int(height)
    return HiresFix(
        scale=float(params.get("Hires upscale", "2")),
        resize_x=resize_x,
        resize_y=resize_y,
        upscaler=params.get("Hires upscaler", "Latent"),
        second_pass_steps=int(params.get("Hires steps", "0")),
        sampler_name=params.get("Hires sampler"),
        scheduler=params.get("Hires schedule type"),
        prompt=params.get("Hires prompt", ""),
        negative_prompt=params.get("Hires negative prompt", ""),
        # A1111 writes the checkpoint's short title, "name [hash]"; the name resolves it
        checkpoint=_without_hash(params["Hires checkpoint"])
        if "Hires checkpoint" in params
        else None,
    )


def refiner_from_params(params: Mapping[str, str]) -> tuple[str, float] | None:
    """(checkpoint name, switch at) of an infotext's `Refiner` keys (None without them),
    so a pasted refiner infotext replays its image. Raises ValueError on a malformed
    value."""
    if "Refiner" not in params:
        return None
    return _without_hash(params["Refiner"]), float(params.get("Refiner switch at", "0.8"))


def _without_hash(title: str) -> str:
    """`name [0123456789]` -> `name` (A1111's short titles)."""
    return re.sub(r"\s*\[[0-9a-fA-F]{8,}\]$", "", title.strip())
