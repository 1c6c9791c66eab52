"""`pipelines.outpainting`: the canvas, mask and matched noise for A1111's outpainting
scripts, and the parsing of their API `script_args`. Pure image work, no model."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.errors import InvalidRequestError
from pipelines.outpainting import outpaint_canvas, outpaint_size, script_outpaint
from pipelines.schema import OUTPAINT_DIRECTIONS, Outpaint

MK2 = "outpainting mk2"
POOR = "poor man's outpainting"


def noisy_image(width: int, height: int, colour: tuple[int, int, int]) -> Image.Image:
    """`colour` with some grain, so the noise has a histogram to match."""
    rng = np.random.default_rng(0)
    pixels = np.array(colour) + rng.normal(0.0, 12.0, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def bands_of(image: Image.Image, spec: Outpaint) -> tuple[int, int, int, int]:
    """(left, right, up, down), from where the canvas puts the original."""
    width, height = outpaint_size(*image.size, spec)
    canvas, _ = outpaint_canvas(image, spec, 0)
    assert canvas.size == (width, height)
    original = np.asarray(image)
    found = np.asarray(canvas)
    for up in range(height - image.height + 1):
        for left in range(width - image.width + 1):
            window = found[up : up + image.height, left : left + image.width]
            if np.array_equal(window, original):
                return left, width - image.width - left, up, height - image.height - up
    raise AssertionError("the original is not on the canvas")


@pytest.mark.parametrize(
    ("size", "pixels", "directions", "expected"),
    [
        ((512, 512), 128, OUTPAINT_DIRECTIONS, (768, 768)),
        ((512, 512), 128, ("left",), (640, 512)),
        ((512, 512), 128, ("right",), (640, 512)),
        ((512, 512), 128, ("up", "down"), (512, 768)),
        ((512, 512), 64, ("down",), (512, 576)),
        # Extended axes are rounded up to 64; an axis with no direction is left alone.
        ((500, 300), 128, ("left", "right"), (768, 300)),
        ((500, 300), 64, ("up",), (500, 384)),
        ((100, 100), 8, ("right", "down"), (128, 128)),
    ],
)
def test_outpaint_size_per_direction_subset(
    size: tuple[int, int], pixels: int, directions: tuple[str, ...], expected: tuple[int, int]
) -> None:
    assert outpaint_size(*size, Outpaint(pixels=pixels, directions=directions)) == expected


def test_the_original_sits_at_left_up_with_the_extra_shared_as_a1111_shares_it() -> None:
    image = noisy_image(100, 60, (90, 140, 200))
    # 100 + 2 x 64 = 228 -> 256: left gets 156 // 2 = 78, right the rest (78).
    spec = Outpaint(pixels=64, directions=("left", "right"), method=POOR)
    assert bands_of(image, spec) == (78, 78, 0, 0)
    # 60 + 8 = 68 -> 128: the single side takes all 68 extra rows.
    spec = Outpaint(pixels=8, directions=("up",), method=POOR)
    assert bands_of(image, spec) == (0, 0, 68, 0)


@pytest.mark.parametrize("method", [MK2, POOR])
@pytest.mark.parametrize("directions", [OUTPAINT_DIRECTIONS, ("left",), ("up", "right")])
def test_original_pixels_are_unchanged_outside_the_mask(
    method: str, directions: tuple[str, ...]
) -> None:
    image = noisy_image(192, 160, (200, 120, 40))
    spec = Outpaint(pixels=64, directions=directions, method=method, mask_blur=4)
    left, _, up, _ = bands_of_spec(image, spec)
    canvas, mask = outpaint_canvas(image, spec, 3)
    box = (left, up, left + image.width, up + image.height)
    kept = np.asarray(mask.crop(box)) == 0
    assert kept.sum() > image.width * image.height // 4  # the check below is not vacuous
    assert np.array_equal(np.asarray(canvas.crop(box))[kept], np.asarray(image)[kept])


def bands_of_spec(image: Image.Image, spec: Outpaint) -> tuple[int, int, int, int]:
    """The bands, computed from the sizes alone (the same split for both methods)."""
    width, height = outpaint_size(*image.size, spec)
    extra_x, extra_y = width - image.width, height - image.height
    left = (extra_x // 2 if "right" in spec.directions else extra_x) * ("left" in spec.directions)
    up = (extra_y // 2 if "down" in spec.directions else extra_y) * ("up" in spec.directions)
    return left, extra_x - left, up, extra_y - up


@pytest.mark.parametrize("method", [MK2, POOR])
@pytest.mark.parametrize("directions", [OUTPAINT_DIRECTIONS, ("right",), ("up", "down")])
def test_mask_covers_every_new_band_and_not_the_original_middle(
    method: str, directions: tuple[str, ...]
) -> None:
    image = noisy_image(256, 256, (90, 140, 200))
    spec = Outpaint(pixels=64, directions=directions, method=method, mask_blur=8)
    left, right, up, down = bands_of_spec(image, spec)
    _, mask = outpaint_canvas(image, spec, 0)
    values = np.asarray(mask)
    height, width = values.shape
    new = np.ones_like(values, dtype=bool)
    new[up : height - down, left : width - right] = False
    assert new.any()
    # At least half white on every new pixel (the engine doubles the overlay mask and
    # rounds the latent one, so that is fully repainted) and white at the outer edges.
    assert values[new].min() >= 128
    edges = {"left": values[:, 0], "right": values[:, -1], "up": values[0], "down": values[-1]}
    for direction in directions:
        assert edges[direction].min() >= 250, direction
    # mk2 blurs by 4 x 8 = 32 px (kernel radius 80) from an 8 px overlap: the middle of a
    # 256 px original is untouched.
    middle = values[up + 100 : up + 156, left + 100 : left + 156]
    assert middle.max() == 0


@pytest.mark.parametrize(("method", "overlap", "sigma"), [(MK2, 6, 24), (POOR, 12, 12)])
def test_mask_reaches_into_the_original_by_the_scripts_overlap_and_blur(
    method: str, overlap: int, sigma: int
) -> None:
    image = noisy_image(256, 256, (90, 140, 200))
    spec = Outpaint(pixels=64, directions=("left", "up"), method=method, mask_blur=6)
    left, _, up, _ = bands_of_spec(image, spec)
    _, mask = outpaint_canvas(image, spec, 0)
    values = np.asarray(mask).astype(int)
    # The blur is symmetric, so the mask crosses half-white where the sharp box starts.
    row = values[up + 128]
    column = values[:, left + 128]
    assert abs(int(np.argmax(row < 128)) - (left + overlap)) <= 1
    assert abs(int(np.argmax(column < 128)) - (up + overlap)) <= 1
    # One blur sigma (mk2: 4 x mask_blur, poor man's: 2 x) past that, a Gaussian step is
    # down to 16% of white.
    assert 20 < row[left + overlap + sigma] < 60
    assert 20 < column[up + overlap + sigma] < 60


@pytest.mark.parametrize("method", [MK2, POOR])
def test_without_blur_the_mask_is_exactly_the_new_bands(method: str) -> None:
    image = noisy_image(100, 70, (90, 140, 200))
    spec = Outpaint(pixels=16, method=method, mask_blur=0)
    left, right, up, down = bands_of_spec(image, spec)
    _, mask = outpaint_canvas(image, spec, 0)
    width, height = mask.size
    expected = np.full((height, width), 255, dtype=np.uint8)
    expected[up : height - down, left : width - right] = 0
    assert np.array_equal(np.asarray(mask), expected)


def test_mk2_noise_is_deterministic_per_seed_and_differs_between_seeds() -> None:
    image = noisy_image(128, 128, (200, 120, 40))
    spec = Outpaint(pixels=64, method=MK2)
    first, first_mask = outpaint_canvas(image, spec, 1234)
    again, again_mask = outpaint_canvas(image, spec, 1234)
    other, other_mask = outpaint_canvas(image, spec, 1235)
    assert first.tobytes() == again.tobytes()
    assert first_mask.tobytes() == again_mask.tobytes() == other_mask.tobytes()
    assert first.tobytes() != other.tobytes()
    differing = np.any(np.asarray(first) != np.asarray(other), axis=2)
    assert differing.mean() > 0.3  # the whole new area, not a pixel here and there


@pytest.mark.parametrize("colour", [(200, 120, 40), (30, 90, 160)])
def test_mk2_noise_takes_the_image_colours(colour: tuple[int, int, int]) -> None:
    image = noisy_image(128, 128, colour)
    spec = Outpaint(pixels=64, directions=("left", "right"), method=MK2)
    left, right, _, _ = bands_of_spec(image, spec)
    canvas, _ = outpaint_canvas(image, spec, 7)
    pixels = np.asarray(canvas).astype(float)
    band = np.concatenate([pixels[:, :left], pixels[:, -right:]], axis=1).reshape(-1, 3)
    # Histogram matching gives the noise the visible image's colour distribution: its mean
    # within 10 levels of the image's, and grain rather than a flat fill.
    assert np.abs(band.mean(axis=0) - np.asarray(image).reshape(-1, 3).mean(axis=0)).max() < 10
    assert band.std(axis=0).min() > 4


def test_poor_mans_canvas_is_the_original_on_black() -> None:
    image = noisy_image(100, 80, (200, 120, 40))
    spec = Outpaint(pixels=32, directions=("left", "down"), method=POOR, mask_blur=4)
    left, right, up, down = bands_of_spec(image, spec)
    canvas, _ = outpaint_canvas(image, spec, 0)
    pixels = np.asarray(canvas)
    assert (right, up) == (0, 0) and left and down
    assert np.array_equal(pixels[: image.height, left:], np.asarray(image))
    assert not pixels[:, :left].any() and not pixels[image.height :].any()


def test_transparent_pixels_become_the_img2img_background() -> None:
    image = Image.new("RGBA", (64, 64), (10, 20, 30, 0))
    canvas, _ = outpaint_canvas(image, Outpaint(pixels=64, method=POOR), 0)
    assert canvas.mode == "RGB"
    assert canvas.getpixel((64 + 32, 64 + 32)) == (255, 255, 255)


def test_mk2_on_a_tiny_black_image_gives_finite_black_noise() -> None:
    # The overlap leaves nothing visible and the image's peak is 0: A1111 divides by 0
    # here; warnings are errors in this suite, so any NaN arithmetic would fail.
    canvas, mask = outpaint_canvas(Image.new("RGB", (4, 4)), Outpaint(pixels=8, mask_blur=64), 5)
    assert canvas.size == mask.size == (64, 64)
    assert not np.asarray(canvas).any()
    assert np.asarray(mask).min() > 0


def test_unknown_method_is_refused() -> None:
    with pytest.raises(InvalidRequestError) as error:
        outpaint_canvas(Image.new("RGB", (8, 8)), Outpaint(method="sd upscale"), 0)
    assert error.value.field == "script_name"


@pytest.mark.parametrize(
    ("name", "args", "expected", "fill"),
    [
        (
            "outpainting mk2",
            ["", 128, 8, ["left", "right"], 1.0, 0.05],
            Outpaint(128, ("left", "right"), MK2, 8, 1.0, 0.05),
            None,
        ),
        (
            "Outpainting MK2",
            [None, 64, 4, ["down", "up"], 0.5, 0.2],
            Outpaint(64, ("up", "down"), MK2, 4, 0.5, 0.2),
            None,
        ),
        # Missing trailing arguments take the script's UI defaults, as in A1111's API.
        ("outpainting mk2", [], Outpaint(128, OUTPAINT_DIRECTIONS, MK2, 8, 1.0, 0.05), None),
        ("outpainting mk2", ["<p>", 256.0], Outpaint(256, method=MK2), None),
        (
            "Poor man's outpainting",
            [96, 6, 1, ["right"]],
            Outpaint(96, ("right",), POOR, 6),
            1,
        ),
        (" poor man's outpainting ", [], Outpaint(128, OUTPAINT_DIRECTIONS, POOR, 4), 0),
        ("poor man's outpainting", [64, 0, 3], Outpaint(64, method=POOR, mask_blur=0), 3),
    ],
)
def test_script_outpaint_reads_a1111_argument_lists(
    name: str, args: list, expected: Outpaint, fill: int | None
) -> None:
    outpaint, inpainting_fill = script_outpaint(name, args)
    assert outpaint == expected
    assert inpainting_fill == fill
    assert type(outpaint.pixels) is int and type(outpaint.noise_q) is float


@pytest.mark.parametrize(
    ("name", "args", "field", "named"),
    [
        (MK2, ["", 300], "script_args", "script_args[1] (pixels)"),
        (MK2, ["", 4], "script_args", "script_args[1] (pixels)"),
        (MK2, ["", "128"], "script_args", "script_args[1] (pixels)"),
        (MK2, ["", True], "script_args", "script_args[1] (pixels)"),
        (MK2, ["", 128.5], "script_args", "script_args[1] (pixels)"),
        (MK2, ["", 128, 65], "script_args", "script_args[2] (mask_blur)"),
        (MK2, ["", 128, 8, "left"], "script_args", "script_args[3] (direction)"),
        (MK2, ["", 128, 8, ["north"]], "script_args", "script_args[3] (direction)"),
        (MK2, ["", 128, 8, []], "script_args", "script_args[3] (direction)"),
        (MK2, ["", 128, 8, ["left"], float("nan")], "script_args", "script_args[4] (noise_q)"),
        (MK2, ["", 128, 8, ["left"], 1.0, 1.5], "script_args", "[5] (color_variation)"),
        (MK2, ["", 128, 8, ["left"], 1.0, 0.05, 1], "script_args", "at most 6"),
        (POOR, [128, 4, 4], "script_args", "script_args[2] (inpainting_fill)"),
        (POOR, [128, 4, 0, ["left"], 0], "script_args", "at most 4"),
        (POOR, [None], "script_args", "script_args[0] (pixels)"),
        (POOR, "128", "script_args", "must be a list"),
        ("SD upscale", [], "script_name", "SD upscale"),
        (None, [], "script_name", "None"),
    ],
)
def test_script_outpaint_refuses_bad_arguments_naming_them(
    name: object, args: object, field: str, named: str
) -> None:
    with pytest.raises(InvalidRequestError) as error:
        script_outpaint(name, args)  # type: ignore[arg-type]
    assert error.value.field == field
    assert named in error.value.message
