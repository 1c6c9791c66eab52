"""A1111's image operations for img2img and inpainting, with A1111 1.10's meanings.

Resize modes (`modules/images.py: resize_image`), binary masks, mask blur, the "only
masked" crop region (`modules/masking.py`), masked-content fill and the final overlay
(`modules/processing.py: apply_overlay`). Pure Pillow/OpenCV/numpy: no torch, no model,
so every geometry is unit-tested on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, ImageFilter, ImageOps

RESIZE_MODES = (
    "Just resize",
    "Crop and resize",
    "Resize and fill",
    "Just resize (latent upscale)",
)
"""`resize_mode` 0-3, A1111's labels."""
LATENT_RESIZE = 3
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
"""`inpainting_fill` 0-3, A1111's labels."""
FILL_ORIGINAL = 1
FILL_LATENT_NOISE = 2
FILL_LATENT_NOTHING = 3
BACKGROUND = "#ffffff"
"""A1111's `img2img_background_color`: what transparent pixels of an init image become."""

Box = tuple[int, int, int, int]
"""(x1, y1, x2, y2), right and bottom exclusive (Pillow's crop box)."""


def resize_image(mode: int, image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize to width x height as A1111 does (Lanczos):

    0 just resize (stretch); 1 crop and resize (fill the frame keeping the aspect ratio,
    centre, cut the excess); 2 resize and fill (fit inside keeping the aspect ratio, centre,
    fill the bands by stretching the image's edge rows/columns). Mode 3 (latent upscale)
    resizes in latent space instead; here it behaves as 2, as in A1111.
    """

    def resize(im: Image.Image, w: int, h: int) -> Image.Image:
        return im.resize((w, h), resample=Image.Resampling.LANCZOS)

    if mode == 0:
        return resize(image, width, height)
    ratio = width / height
    src_ratio = image.width / image.height
    if mode == 1:
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
        resized = resize(image, src_w, src_h)
        result = Image.new("RGB", (width, height))
        result.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        return result
    src_w = width if ratio < src_ratio else image.width * height // image.height
    src_h = height if ratio >= src_ratio else image.height * width // image.width
    resized = resize(image, src_w, src_h)
    result = Image.new("RGB", (width, height))
    result.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if ratio < src_ratio:
        fill_height = height // 2 - src_h // 2
        if fill_height > 0:
            top = resized.resize((width, fill_height), box=(0, 0, width, 0))
            bottom = resized.resize(
                (width, fill_height), box=(0, resized.height, width, resized.height)
            )
            result.paste(top, box=(0, 0))
            result.paste(bottom, box=(0, fill_height + src_h))
    elif ratio > src_ratio:
        fill_width = width // 2 - src_w // 2
        if fill_width > 0:
            left = resized.resize((fill_width, height), box=(0, 0, 0, height))
            right = resized.resize(
                (fill_width, height), box=(resized.width, 0, resized.width, height)
            )
            result.paste(left, box=(0, 0))
            result.paste(right, box=(fill_width + src_w, 0))
    return result


def flatten(image: Image.Image, background: str = BACKGROUND) -> Image.Image:
    """RGB, with transparent pixels composited over `background` (A1111's `flatten`)."""
    if image.mode == "RGBA" or (image.mode in ("LA", "P") and "transparency" in image.info):
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, background)
        base.alpha_composite(rgba)
        return base.convert("RGB")
    return image.convert("RGB")


def binary_mask(mask: Image.Image, round_alpha: bool = True) -> Image.Image:
    """An L mask, white = repaint. An RGBA mask with real transparency is read from its
    alpha channel (what a brush canvas sends), thresholded at 128 when `round_alpha`."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        alpha = mask.split()[-1].convert("L")
        return alpha.point(lambda v: 255 if v > 128 else 0) if round_alpha else alpha
    return mask.convert("L")


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """A1111's separable Gaussian mask blur (OpenCV, kernel 2*int(2.5*sigma+0.5)+1)."""
    array = np.array(mask)
    if blur_x > 0:
        size = 2 * int(2.5 * blur_x + 0.5) + 1
        array = cv2.GaussianBlur(array, (size, 1), blur_x)
    if blur_y > 0:
        size = 2 * int(2.5 * blur_y + 0.5) + 1
        array = cv2.GaussianBlur(array, (1, size), blur_y)
    return Image.fromarray(array)


def crop_region(mask: Image.Image, padding: int) -> Box | None:
    """The box around every non-black mask pixel, grown by `padding` and kept inside the
    image; None for an all-black mask (A1111's `get_crop_region_v2`)."""
    box = mask.getbbox()
    if not box:
        return None
    x1, y1, x2, y2 = box
    if not padding:
        return box
    width, height = mask.size
    return (
        max(x1 - padding, 0),
        max(y1 - padding, 0),
        min(x2 + padding, width),
        min(y2 + padding, height),
    )


def expand_crop_region(
    box: Box, process_width: int, process_height: int, image_width: int, image_height: int
) -> Box:
    """Grow `box` to the processing size's aspect ratio, shifted to stay inside the image
    (A1111's `expand_crop_region`)."""
    x1, y1, x2, y2 = box
    ratio_box = (x2 - x1) / (y2 - y1)
    ratio_process = process_width / process_height
    if ratio_box > ratio_process:
        desired_height = (x2 - x1) / ratio_process
        diff = int(desired_height - (y2 - y1))
        y1 -= diff // 2
        y2 += diff - diff // 2
        if y2 >= image_height:
            y1 -= y2 - image_height
            y2 = image_height
        if y1 < 0:
            y2 -= y1
            y1 = 0
        y2 = min(y2, image_height)
    else:
        desired_width = (y2 - y1) * ratio_process
        diff = int(desired_width - (x2 - x1))
        x1 -= diff // 2
        x2 += diff - diff // 2
        if x2 >= image_width:
            x1 -= x2 - image_width
            x2 = image_width
        if x1 < 0:
            x2 -= x1
            x1 = 0
        x2 = min(x2, image_width)
    return x1, y1, x2, y2


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """Masked content "fill": the masked area painted with blurred colours of the rest
    (A1111's `masking.fill`)."""
    result = Image.new("RGBA", image.size)
    kept = Image.new("RGBa", image.size)
    kept.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = kept.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(blurred)
    return result.convert("RGB")


def overlay_of(image: Image.Image, mask_for_overlay: Image.Image) -> Image.Image:
    """The original's pixels outside the mask, transparent inside (what `apply_overlay`
    puts back over a generated image)."""
    masked = Image.new("RGBa", image.size)
    masked.paste(
        image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L"))
    )
    return masked.convert("RGBA")


def apply_overlay(
    image: Image.Image, paste_to: tuple[int, int, int, int] | None, overlay: Image.Image
) -> Image.Image:
    """Put a generated image back: with "only masked", resized (crop and resize) into its
    box on a canvas of the original's size; then the original's unmasked pixels on top."""
    if paste_to is not None:
        x, y, w, h = paste_to
        base = Image.new("RGBA", overlay.size)
        base.paste(resize_image(1, image, w, h), (x, y))
        image = base
    composed = image.convert("RGBA")
    composed.alpha_composite(overlay)
    return composed.convert("RGB")


@dataclass
class Tile:
    x: int
    y: int
    image: Image.Image


@dataclass
class Grid:
    """A1111's `Grid`: rows of tiles of `tile_w` x `tile_h` covering the image."""

    rows: list[tuple[int, list[Tile]]]  # (y, tiles)
    tile_w: int
    tile_h: int
    width: int
    height: int
    overlap: int


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> Grid:
    """Tiles spread evenly so the last one ends at the edge (A1111's `split_grid`)."""
    width, height = image.size
    cols = max(1, math.ceil((width - overlap) / (tile_w - overlap)))
    rows = max(1, math.ceil((height - overlap) / (tile_h - overlap)))
    dx = (width - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (height - tile_h) / (rows - 1) if rows > 1 else 0
    grid = Grid([], tile_w, tile_h, width, height, overlap)
    for row in range(rows):
        y = min(int(row * dy), height - tile_h)
        tiles = []
        for col in range(cols):
            x = min(int(col * dx), width - tile_w)
            tiles.append(Tile(x, y, image.crop((x, y, x + tile_w, y + tile_h))))
        grid.rows.append((y, tiles))
    return grid


def combine_grid(grid: Grid) -> Image.Image:
    """Paste the tiles back, each overlap blended by a linear ramp (A1111's
    `combine_grid`)."""
    overlap = grid.overlap
    ramp = np.arange(overlap, dtype=np.float32) * 255 / max(overlap, 1)
    mask_w = Image.fromarray(np.repeat(ramp[None, :], grid.tile_h, 0).astype(np.uint8), "L")
    mask_h = Image.fromarray(np.repeat(ramp[:, None], grid.width, 1).astype(np.uint8), "L")
    combined = Image.new("RGB", (grid.width, grid.height))
    for y, tiles in grid.rows:
        row = Image.new("RGB", (grid.width, grid.tile_h))
        for tile in tiles:
            if tile.x == 0:
                row.paste(tile.image, (0, 0))
                continue
            row.paste(tile.image.crop((0, 0, overlap, grid.tile_h)), (tile.x, 0), mask=mask_w)
            row.paste(
                tile.image.crop((overlap, 0, grid.tile_w, grid.tile_h)), (tile.x + overlap, 0)
            )
        if y == 0:
            combined.paste(row, (0, 0))
            continue
        combined.paste(row.crop((0, 0, grid.width, overlap)), (0, y), mask=mask_h)
        combined.paste(row.crop((0, overlap, grid.width, grid.tile_h)), (0, y + overlap))
    return combined
