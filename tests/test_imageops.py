"""A1111's image operations for img2img, checked against their documented geometry and
against A1111's own examples (`modules/images.py`, `modules/masking.py`)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.imageops import (
    apply_overlay,
    binary_mask,
    blur_mask,
    crop_region,
    expand_crop_region,
    fill,
    flatten,
    overlay_of,
    resize_image,
)


def stripes(width: int, height: int) -> Image.Image:
    """Columns coloured by x (red) and rows by y (green), so positions can be read back."""
    y, x = np.mgrid[0:height, 0:width]
    array = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), x * 0], -1)
    return Image.fromarray(array.astype(np.uint8))


def test_just_resize_stretches() -> None:
    out = resize_image(0, stripes(200, 100), 64, 64)
    assert out.size == (64, 64)
    array = np.asarray(out).astype(int)
    assert array[:, 0, 0].max() < 10 and array[:, -1, 0].min() > 245  # whole width kept


def test_crop_and_resize_fills_the_frame_and_cuts_the_sides() -> None:
    out = resize_image(1, stripes(200, 100), 64, 64)
    assert out.size == (64, 64)
    red = np.asarray(out)[32, :, 0].astype(int)
    # the middle half of the width survives: red runs from ~64 to ~191 of 255
    assert 50 < red[0] < 80 and 175 < red[-1] < 205
    green = np.asarray(out)[:, 32, 1].astype(int)
    assert green[0] < 10 and green[-1] > 245  # the full height


def test_resize_and_fill_fits_inside_and_stretches_the_edges_into_the_bands() -> None:
    out = resize_image(2, stripes(200, 100), 64, 64)
    array = np.asarray(out).astype(int)
    assert out.size == (64, 64)
    # the image is 64x32 in the middle (rows 16..47); above and below repeat its edge rows
    assert np.abs(array[0] - array[16]).max() <= 2
    assert np.abs(array[63] - array[47]).max() <= 2
    assert array[32, 0, 0] < 10 and array[32, -1, 0] > 245  # full width inside


def test_tall_images_fill_left_and_right() -> None:
    out = resize_image(2, stripes(50, 100), 64, 64)
    array = np.asarray(out).astype(int)
    # 32x64 in the middle (columns 16..47); the side bands repeat the edge columns
    assert np.abs(array[:, 0] - array[:, 16]).max() <= 2
    assert np.abs(array[:, 63] - array[:, 47]).max() <= 2


def test_flatten_puts_transparency_on_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert flatten(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert flatten(Image.new("RGBA", (4, 4), (255, 0, 0, 255))).getpixel((0, 0)) == (255, 0, 0)


def test_binary_mask_reads_alpha_of_a_brush_layer() -> None:
    layer = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 200), (2, 2, 6, 6))
    layer.putpixel((0, 0), (255, 255, 255, 100))  # below the 128 threshold
    mask = np.asarray(binary_mask(layer))
    assert mask[3, 3] == 255 and mask[0, 0] == 0 and mask[7, 7] == 0
    assert np.asarray(binary_mask(layer, round_alpha=False))[0, 0] == 100
    opaque = Image.new("RGBA", (8, 8), (255, 255, 255, 255))
    assert np.asarray(binary_mask(opaque)).min() == 255  # no transparency: its luminance


def test_mask_blur_is_a1111s_separable_opencv_gaussian() -> None:
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (20, 20, 44, 44))
    blurred = np.asarray(blur_mask(mask, 4, 2))
    array = np.asarray(mask)
    expected = cv2.GaussianBlur(array, (2 * int(2.5 * 4 + 0.5) + 1, 1), 4)
    expected = cv2.GaussianBlur(expected, (1, 2 * int(2.5 * 2 + 0.5) + 1), 2)
    assert np.array_equal(blurred, expected)
    assert np.array_equal(np.asarray(blur_mask(mask, 0, 0)), array)


def test_crop_region_and_a1111s_expansion_example() -> None:
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (100, 200, 228, 232))  # a 128x32 stroke
    box = crop_region(mask, 0)
    assert box == (100, 200, 228, 232)
    # A1111's docstring: a 128x32 region processed at 512x512 grows to 128x128
    x1, y1, x2, y2 = expand_crop_region(box, 512, 512, 512, 512)
    assert (x2 - x1, y2 - y1) == (128, 128) and x1 == 100
    assert crop_region(mask, 8) == (92, 192, 236, 240)
    assert crop_region(Image.new("L", (8, 8), 0), 4) is None


def test_expansion_stays_inside_the_image() -> None:
    x1, y1, x2, y2 = expand_crop_region((0, 0, 100, 10), 64, 64, 120, 50)
    assert y1 >= 0 and y2 <= 50 and x1 >= 0 and x2 <= 120
    x1, y1, x2, y2 = expand_crop_region((110, 0, 120, 40), 64, 64, 120, 50)
    assert x2 <= 120 and x1 >= 0 and (x2 - x1) == 40


def test_fill_keeps_the_unmasked_pixels_and_paints_the_hole_from_them() -> None:
    image = Image.new("RGB", (64, 64), (200, 40, 40))
    image.paste((0, 0, 0), (16, 16, 48, 48))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    out = np.asarray(fill(image, mask)).astype(int)
    assert np.abs(out[0, 0] - [200, 40, 40]).max() <= 1
    assert out[32, 32, 0] > 150  # the hole took the surrounding red, not the black


@pytest.mark.parametrize("paste_to", [None, (10, 6, 32, 32)])
def test_overlay_puts_the_original_back_outside_the_mask(
    paste_to: tuple[int, int, int, int] | None,
) -> None:
    original = stripes(64, 48)
    mask = Image.new("L", original.size, 0)
    mask.paste(255, (12, 8, 40, 36))
    generated = Image.new("RGB", (32, 32) if paste_to else original.size, (0, 0, 255))
    out = np.asarray(apply_overlay(generated, paste_to, overlay_of(original, mask)))
    outside = np.asarray(mask) == 0
    assert out.shape[:2] == (48, 64)
    assert np.array_equal(out[outside], np.asarray(original)[outside])
    assert (out[20, 20] == [0, 0, 255]).all()
