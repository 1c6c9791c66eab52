"""Image bombs: a few KB whose header claims 50,000 x 50,000 pixels. Every image input
is sized from its header and refused with a 4xx naming the limit, never decoded and
never a 500."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from frontends.api import a1111
from frontends.page.recall import read_image_info
from frontends.page.stack import _thumbnail
from pipelines.errors import InvalidRequestError
from pipelines.images import MAX_IMAGE_PIXELS, open_image
from pipelines.infotext import read_infotext


def bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A valid small PNG whose IHDR claims `width` x `height`."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize(
    "read",
    [
        read_infotext,
        read_image_info,
        lambda raw: a1111.png_info({"image": base64.b64encode(raw).decode()}),
    ],
    ids=["read_infotext", "pnginfo_tab", "api_png_info"],
)
def test_bomb_is_a_4xx_naming_the_limit(read) -> None:
    with pytest.raises(InvalidRequestError, match=f"{MAX_IMAGE_PIXELS:,} pixels") as error:
        read(bomb())
    assert error.value.field == "image"


def test_just_over_the_limit_is_refused_and_under_it_opens() -> None:
    with pytest.raises(InvalidRequestError, match="8193x8192, more than 67,108,864 pixels"):
        open_image(bomb(8193, 8192))  # below Pillow's own limits: our check
    with open_image(bomb(64, 32)) as image:
        assert image.size == (64, 32)  # size from the header; nothing decoded yet


def test_a_bomb_lora_preview_gets_no_thumbnail(tmp_path: Path) -> None:
    preview = tmp_path / "style.preview.png"
    preview.write_bytes(bomb())
    assert _thumbnail(str(preview), preview.stat().st_mtime_ns) is None
