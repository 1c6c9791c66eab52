"""Opening images that come from users: sized from the header before anything is decoded.

Pillow raises `DecompressionBombError` (not an OSError) past twice its own limit and only
warns below that, so a tiny file claiming 50,000 x 50,000 pixels became a 500. Every image
input goes through `open_image`, which refuses what is too large or unreadable with a 4xx
naming the field and the limit.
"""

from __future__ import annotations

import io
import os
import warnings

from PIL import Image, UnidentifiedImageError

from pipelines.errors import InvalidRequestError

MAX_IMAGE_PIXELS = 8192 * 8192
"""Largest width x height read from any image input (4x the largest generation size)."""


def open_image(source: bytes | str | os.PathLike[str], field: str = "image") -> Image.Image:
    """Open `source` lazily (header only) and refuse it when it is not an image or has
    more than MAX_IMAGE_PIXELS pixels. The caller closes it (use it in a `with`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InvalidRequestError(
            f"{field}: the image is larger than {MAX_IMAGE_PIXELS:,} pixels ({error})",
            field=field,
        ) from None
    except UnidentifiedImageError:
        raise InvalidRequestError(
            f"{field}: not a readable image (no image format recognised)", field=field
        ) from None
    except OSError as error:
        raise InvalidRequestError(f"{field}: not a readable image ({error})", field=field) from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise InvalidRequestError(
            f"{field}: the image is {width}x{height}, more than {MAX_IMAGE_PIXELS:,} pixels",
            field=field,
        )
    return image
