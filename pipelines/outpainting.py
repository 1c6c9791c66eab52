"""Canvas preparation for A1111 1.10's two outpainting scripts (`scripts/outpainting_mk_2.py`
and `scripts/poor_mans_outpainting.py`), and the parsing of their API `script_args`.

The engine inpaints the canvas returned here with the mask returned here, at the request
size, in one "whole picture" pass; this module only does image work (numpy, Pillow, OpenCV).

What follows A1111:

- the canvas size: each extended axis is rounded up to a multiple of 64 and the extra
  pixels are shared between its two sides as the scripts share them; an axis with no
  direction keeps the original's size; the original sits at (left, up);
- the mask: white everywhere but the original, less an overlap on each extended side
  (mk2: `mask_blur`, poor man's: 2 x `mask_blur`), then Gaussian-blurred as the scripts
  make img2img blur it (mk2: 4 x `mask_blur` along the extended axes only, poor man's:
  2 x `mask_blur` along both);
- mk2's new area is the scripts' matched noise (`get_matched_noise`, from g-diffuser-bot):
  noise whose spectrum is shaped by the visible image's (`noise_q` is the fall-off
  exponent, `color_variation` how colourful the noise starts), then histogram-matched to
  the visible image's colours; the engine then keeps it as the content ("original");
- poor man's new area is black, as A1111 leaves it, for the engine's `inpainting_fill`.

What differs:

- A1111's mk2 extends and inpaints one direction at a time, each a separate img2img run
  on a crop, and poor man's inpaints the canvas in overlapping request-size tiles; here
  every direction is prepared at once and the engine inpaints the whole canvas in one pass;
- A1111 1.10's noise comes from `np.random.default_rng(0)`, the same for every seed;
  here it comes from `np.random.default_rng(seed)`, so it follows the request's seed
  (seed 0 draws A1111's noise);
- the scripts also give img2img a sharper "latent mask"; the engine rounds this one mask
  for the latent blend instead;
- Pillow's rectangle includes its last row and column, so A1111's mask leaves the first
  column (row) of a right (bottom) band unmasked when `mask_blur` is 0; here the
  original's box is half-open and every new pixel is masked;
- the noise is rounded to 8 bits (A1111 truncates), degenerate images (all black, or too
  small to keep any unmasked pixel) get finite noise instead of NaNs, and scikit-image's
  histogram matching is done here in numpy;
- a transparent original is composited over img2img's background colour first (the
  scripts paste it onto the black canvas, which drops its alpha).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.errors import InvalidRequestError
from pipelines.imageops import MASKED_CONTENT, blur_mask, flatten
from pipelines.schema import OUTPAINT_DIRECTIONS, OUTPAINT_METHODS, Outpaint

POOR_MANS, MK2 = OUTPAINT_METHODS
CANVAS_MULTIPLE = 64
"""A1111 rounds every extended side of the canvas up to this."""

Bands = tuple[int, int, int, int]
"""(left, right, up, down): the new pixels on each side of the original."""


def _bands(width: int, height: int, spec: Outpaint) -> Bands:
    """The scripts' band sizes: `pixels` per direction, each extended axis rounded up to
    64 with the first side taking its share of the extra (rounded down), the second the
    rest."""

    def axis(size: int, before: bool, after: bool) -> tuple[int, int]:
        if not (before or after):
            return 0, 0
        target = math.ceil((size + spec.pixels * (before + after)) / CANVAS_MULTIPLE)
        extra = target * CANVAS_MULTIPLE - size
        first = extra // (before + after) if before else 0
        return first, extra - first if after else 0

    left, right = axis(width, "left" in spec.directions, "right" in spec.directions)
    up, down = axis(height, "up" in spec.directions, "down" in spec.directions)
    return left, right, up, down


def outpaint_size(width: int, height: int, spec: Outpaint) -> tuple[int, int]:
    """The canvas size for a width x height image: what the request's size becomes, so the
    engine inpaints the canvas without stretching it."""
    left, right, up, down = _bands(width, height, spec)
    return width + left + right, height + up + down


def outpaint_canvas(
    image: Image.Image, spec: Outpaint, seed: int
) -> tuple[Image.Image, Image.Image]:
    """The extended canvas (RGB, the original at (left, up)) and its blurred mask (L, white
    = repaint), ready for one whole-picture inpainting pass. The same inputs give the same
    bytes: mk2's noise is drawn from `np.random.default_rng(seed)`."""
    if spec.method not in OUTPAINT_METHODS:
        raise InvalidRequestError(
            f"outpainting method must be one of {', '.join(OUTPAINT_METHODS)}, got {spec.method!r}",
            field="script_name",
        )
    original = flatten(image)
    left, right, up, down = _bands(original.width, original.height, spec)
    width, height = original.width + left + right, original.height + up + down
    canvas = Image.new("RGB", (width, height))
    canvas.paste(original, (left, up))
    mk2 = spec.method == MK2
    overlap = spec.mask_blur if mk2 else 2 * spec.mask_blur
    sharp = _band_mask(width, height, (left, right, up, down), overlap)
    if mk2:
        canvas = _fill_with_matched_noise(canvas, sharp, original, spec, seed)
        blur_x = 4 * spec.mask_blur if left or right else 0
        blur_y = 4 * spec.mask_blur if up or down else 0
    else:
        blur_x = blur_y = 2 * spec.mask_blur
    return canvas, blur_mask(Image.fromarray(sharp), blur_x, blur_y)


def _band_mask(width: int, height: int, bands: Bands, overlap: int) -> np.ndarray:
    """255 everywhere but the original's box, which each extended side eats into by
    `overlap` so the seam is repainted too."""
    left, right, up, down = bands
    x1 = left + (overlap if left else 0)
    x2 = max(width - right - (overlap if right else 0), 0)
    y1 = up + (overlap if up else 0)
    y2 = max(height - down - (overlap if down else 0), 0)
    mask = np.full((height, width), 255, dtype=np.uint8)
    mask[y1:y2, x1:x2] = 0
    return mask


def _fill_with_matched_noise(
    canvas: Image.Image, sharp: np.ndarray, original: Image.Image, spec: Outpaint, seed: int
) -> Image.Image:
    """mk2's canvas: the masked part (bands and overlap) replaced by matched noise, the
    rest untouched."""
    pixels = np.asarray(canvas, dtype=np.float64) / 255.0
    mask = sharp.astype(np.float64) / 255.0
    visible = sharp == 0
    # Colours to match: the visible image's, or the whole original's when the overlap
    # leaves nothing visible (a tiny image with a large blur).
    reference = pixels[visible] if visible.any() else np.asarray(original).reshape(-1, 3) / 255.0
    noised = _matched_noise(
        pixels,
        mask,
        reference,
        spec.noise_q,
        spec.color_variation,
        np.random.default_rng(seed),
    )
    return Image.fromarray(np.rint(noised * 255.0).astype(np.uint8), mode="RGB")


def _fft2(data: np.ndarray) -> np.ndarray:
    """Centred orthonormal 2-D FFT over the first two axes (the spectrum's zero frequency
    in the middle), as g-diffuser's helpers do per channel."""
    shifted = np.fft.fft2(np.fft.fftshift(data, axes=(0, 1)), axes=(0, 1), norm="ortho")
    return np.fft.ifftshift(shifted, axes=(0, 1))


def _ifft2(data: np.ndarray) -> np.ndarray:
    """The inverse of `_fft2`'s shape convention (same shifts around an inverse FFT)."""
    shifted = np.fft.ifft2(np.fft.fftshift(data, axes=(0, 1)), axes=(0, 1), norm="ortho")
    return np.fft.ifftshift(shifted, axes=(0, 1))


def _falloff_window(height: int, width: int) -> np.ndarray:
    """The noise's spectral envelope: 1 / ((x^2 + 1)(y^2 + 1)) over [-1, 1) coordinates
    stretched to the aspect ratio (the script's `_get_gaussian_window(mode=1)`)."""
    short = min(height, width)
    rows = (np.arange(height) / height * 2.0 - 1.0) * (height / short)
    cols = (np.arange(width) / width * 2.0 - 1.0) * (width / short)
    return np.outer(1.0 / (rows**2 + 1.0), 1.0 / (cols**2 + 1.0))


def _match_histogram(source: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Map `source`'s values onto `template`'s distribution by quantile (scikit-image's
    `match_histograms` for one float channel), so the noise takes the image's colours."""
    _, inverse, counts = np.unique(source, return_inverse=True, return_counts=True)
    template_values, template_counts = np.unique(template, return_counts=True)
    quantiles = np.cumsum(counts) / source.size
    template_quantiles = np.cumsum(template_counts) / template.size
    return np.interp(quantiles, template_quantiles, template_values)[inverse]


def _matched_noise(
    pixels: np.ndarray,
    mask: np.ndarray,
    reference: np.ndarray,
    noise_q: float,
    color_variation: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """`pixels` (H x W x 3 in [0, 1]) blended towards noise where `mask` (H x W in [0, 1])
    is set: noise whose spectrum follows the visible image's (so its structure's scale
    resembles the picture's), then matched to `reference`'s colours (N x 3)."""
    height, width = mask.shape
    weight = mask[..., None]
    windowed = pixels * (1.0 - weight)
    peak = windowed.max()
    if peak > 0:
        windowed /= peak
    # The masked area gets the mean colour rather than black, for a cleaner spectrum.
    windowed += pixels.mean() * weight
    source_fft = _fft2(windowed)
    source_dist = np.abs(source_fft)
    source_phase = np.divide(
        source_fft, source_dist, out=np.ones_like(source_fft), where=source_dist > 0
    )

    noise = rng.random((height, width, 3))
    grey = noise.sum(axis=2, keepdims=True) / 3.0
    noise = noise * color_variation + (1.0 - color_variation) * grey
    noise = np.real(_ifft2(_fft2(noise) * _falloff_window(height, width)[..., None]))
    shaped_fft = np.abs(_fft2(noise)) ** 2 * source_dist**noise_q * source_phase
    shaped = np.real(_ifft2(shaped_fft))
    shaped -= shaped.min()
    span = shaped.max()
    if span > 0:
        shaped /= span
    masked = mask > 1e-6
    region = shaped[masked]
    for channel in range(3):
        region[:, channel] = _match_histogram(region[:, channel], reference[:, channel])
    shaped[masked] = region
    return np.clip(pixels * (1.0 - weight) + shaped * weight, 0.0, 1.0)


# -- the scripts' API arguments ---------------------------------------------------------


@dataclass(frozen=True)
class _Arg:
    """One parameter of a script's `run(self, p, ...)`, in A1111's order: its name, UI
    default, parser (None: ignored) and the Outpaint field it sets (None: not one)."""

    name: str
    default: Any
    parse: Callable[[str, Any], Any] | None
    field: str | None


def _integer(low: int, high: int) -> Callable[[str, Any], int]:
    def parse(where: str, value: Any) -> int:
        if isinstance(value, float) and value.is_integer():  # JSON sliders may send 128.0
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InvalidRequestError(
                f"{where} must be an integer from {low} to {high}, got {value!r}",
                field="script_args",
            )
        return value

    return parse


def _number(low: float, high: float) -> Callable[[str, Any], float]:
    def parse(where: str, value: Any) -> float:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not low <= value <= high
        ):
            raise InvalidRequestError(
                f"{where} must be a number from {low:g} to {high:g}, got {value!r}",
                field="script_args",
            )
        return float(value)

    return parse


def _directions(where: str, value: Any) -> tuple[str, ...]:
    """A list of direction names, returned in the canonical order."""
    if (
        not isinstance(value, list | tuple)
        or not value
        or any(item not in OUTPAINT_DIRECTIONS for item in value)
    ):
        raise InvalidRequestError(
            f"{where} must be a non-empty list of {', '.join(OUTPAINT_DIRECTIONS)}, got {value!r}",
            field="script_args",
        )
    return tuple(name for name in OUTPAINT_DIRECTIONS if name in value)


_PIXELS = _Arg("pixels", 128, _integer(8, 256), "pixels")
_DIRECTION = _Arg("direction", OUTPAINT_DIRECTIONS, _directions, "directions")
_SCRIPT_ARGS: dict[str, tuple[_Arg, ...]] = {
    MK2: (
        _Arg("info", None, None, None),  # the UI's HTML note; clients send "" or null
        _PIXELS,
        _Arg("mask_blur", 8, _integer(0, 64), "mask_blur"),
        _DIRECTION,
        _Arg("noise_q", 1.0, _number(0.0, 4.0), "noise_q"),
        _Arg("color_variation", 0.05, _number(0.0, 1.0), "color_variation"),
    ),
    POOR_MANS: (
        _PIXELS,
        _Arg("mask_blur", 4, _integer(0, 64), "mask_blur"),
        _Arg("inpainting_fill", 0, _integer(0, len(MASKED_CONTENT) - 1), None),
        _DIRECTION,
    ),
}
"""Each script's `run` parameters after `p`, with its UI defaults (what A1111's API uses
for trailing arguments a client leaves out)."""


def script_outpaint(script_name: str, script_args: list) -> tuple[Outpaint, int | None]:
    """The Outpaint an A1111 API client asks for with `script_name` + `script_args`, and
    poor man's `inpainting_fill` (None for mk2, whose noise is always kept as the content)."""
    method = script_name.strip().lower() if isinstance(script_name, str) else None
    if method not in _SCRIPT_ARGS:
        raise InvalidRequestError(
            f"unknown script {script_name!r}; the scripts this server runs are "
            f"{', '.join(OUTPAINT_METHODS)}",
            field="script_name",
        )
    params = _SCRIPT_ARGS[method]
    if not isinstance(script_args, list | tuple):
        raise InvalidRequestError(
            f"script_args must be a list, got {script_args!r}", field="script_args"
        )
    if len(script_args) > len(params):
        raise InvalidRequestError(
            f"script_args has {len(script_args)} values; {method} takes at most "
            f"{len(params)} ({', '.join(param.name for param in params)})",
            field="script_args",
        )
    values: dict[str, Any] = {}
    for index, param in enumerate(params):
        if param.parse is None:
            continue
        where = f"script_args[{index}] ({param.name})"
        given = index < len(script_args)
        values[param.name] = param.parse(where, script_args[index]) if given else param.default
    fields = {param.field: values[param.name] for param in params if param.field}
    return Outpaint(method=method, **fields), values.get("inpainting_fill")
