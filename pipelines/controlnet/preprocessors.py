"""sd-webui-controlnet's preprocessors ("modules") that need no weights, and how a detected
map is fitted to the generation size.

Names, labels, sliders (range and default) and list order are sd-webui-controlnet 1.1.455's
(`scripts/preprocessor/model_free_preprocessors.py`, `legacy/preprocessor_compiled.py`,
`legacy/processor.py`, `supported_preprocessor.py`); each map is computed the way its
function there computes it, with OpenCV:

| name | map |
|---|---|
| `none` | the image as it is |
| `invert` | 255 - image (white background, black lines -> black background, white lines) |
| `canny` | `cv2.Canny(image, low, high)` at the processor resolution |
| `threshold` | white where every channel is above the threshold, black elsewhere |
| `scribble_xdog` | white where the difference of two Gaussians (0.5 and 5.0) passes the threshold |
| `tile_resample` | the image shrunk by the down-sampling rate (INTER_AREA); 1 (< 1.1): as it is |
| `blur_gaussian` | `cv2.GaussianBlur` with sigma = slider 1, at the processor resolution |
| `lineart_standard` | light lines where the image is darker than its blur (sigma 6), by median |

"At the processor resolution" is sd-webui-controlnet's `resize_image_with_pad`: the short side
scaled to the resolution (INTER_CUBIC up, INTER_AREA down). Preprocessors with weights
(`WEIGHTED`: the files each needs) are listed by `/controlnet/module_list` only when they can
run; `pipelines.controlnet.annotators` finds their files and runs them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np
from PIL import Image

from pipelines.errors import InvalidRequestError, UnusableFileError

T = TypeVar("T")

ImageArray = np.ndarray
"""uint8 [H, W, 3] RGB."""


@dataclass(frozen=True)
class Slider:
    """One preprocessor parameter as sd-webui-controlnet's `PreprocessorParameter`."""

    label: str = "EMPTY_LABEL"
    minimum: float = 0.0
    maximum: float = 1.0
    step: float = 0.01
    value: float = 0.5
    visible: bool = False

    def api_json(self) -> dict[str, object]:
        """`/controlnet/module_list`'s `module_detail` slider."""
        return {
            "name": self.label,
            "value": self.value,
            "min": self.minimum,
            "max": self.maximum,
            "step": self.step,
        }

    def effective(self, value: float) -> float:
        """sd-webui-controlnet's `bound_check_params`: a value outside the range (-1: not
        sent) becomes the default."""
        return self.value if not self.minimum <= value <= self.maximum else value


RESOLUTION = Slider("Resolution", 128, 2048, 8, 512, True)
"""The class default of sd-webui-controlnet's preprocessors (its legacy ones keep it, even
those whose own table hides the resolution)."""
HIDDEN = Slider()
FACE_ENCODER = "insightface"
"""The encoder of `ip-adapter_face_id`, the module of FaceID adapters."""


@dataclass(frozen=True)
class Preprocessor:
    """One module: its name (what the API sends), label (what the page shows), sliders and
    the function making its map from an RGB image."""

    name: str
    label: str
    run: Callable[[ImageArray, int, float, float], ImageArray]
    priority: int = 0
    resolution: Slider = RESOLUTION
    slider_1: Slider = HIDDEN
    slider_2: Slider = HIDDEN
    tags: tuple[str, ...] = ()
    encoder: str | None = None
    """IP-Adapter modules: the image encoder they ask for (`clip_h`, `clip_g`, or insightface
    for FaceID: FACE_ENCODER); their map is the image itself (the encoder runs with the
    model, `pipelines.controlnet.ipadapter`)."""

    def sliders(self) -> list[Slider]:
        return [s for s in (self.resolution, self.slider_1, self.slider_2) if s.visible]

    def detail(self) -> dict[str, object]:
        return {"model_free": False, "sliders": [s.api_json() for s in self.sliders()]}

    def __call__(self, image: ImageArray, resolution: int, a: float, b: float) -> ImageArray:
        """The map as uint8 RGB (`HWC3`)."""
        return hwc3(self.run(hwc3(image), resolution, a, b))


def hwc3(image: ImageArray) -> ImageArray:
    """sd-webui-controlnet's `HWC3`: grey -> three channels, RGBA -> composited on white."""
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 3:
        return image
    if channels == 1:
        return np.concatenate([image, image, image], axis=2)
    color = image[:, :, :3].astype(np.float32)
    alpha = image[:, :, 3:4].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def at_resolution(image: ImageArray, resolution: int) -> ImageArray:
    """The image with its short side scaled to `resolution` (INTER_CUBIC up, INTER_AREA
    down): `resize_image_with_pad` before its padding."""
    height, width = image.shape[:2]
    scale = float(resolution) / float(min(height, width))
    interpolation = cv2.INTER_CUBIC if scale > 1 else cv2.INTER_AREA
    size = (int(np.round(width * scale)), int(np.round(height * scale)))
    return cv2.resize(image, size, interpolation=interpolation)


def pad_to_64(image: ImageArray) -> tuple[ImageArray, Callable[[ImageArray], ImageArray]]:
    """The edge padding `resize_image_with_pad` adds (to a multiple of 64), and the cut back."""
    height, width = image.shape[:2]
    pad_h, pad_w = -height % 64, -width % 64
    padded = np.pad(image, [[0, pad_h], [0, pad_w], [0, 0]], mode="edge")
    return padded, lambda result: np.ascontiguousarray(result[:height, :width])


def _padded(image: ImageArray, resolution: int) -> tuple[ImageArray, Callable]:
    return pad_to_64(at_resolution(image, resolution))


def _none(image: ImageArray, resolution: int, a: float, b: float) -> ImageArray:
    return image


def _invert(image: ImageArray, resolution: int, a: float, b: float) -> ImageArray:
    return 255 - image


def _canny(image: ImageArray, resolution: int, a: float, b: float) -> ImageArray:
    padded, cut = _padded(image, resolution)
    return cut(cv2.Canny(padded, int(a), int(b))[:, :, None])


def _threshold(image: ImageArray, resolution: int, a: float, b: float) -> ImageArray:
    padded, cut = _padded(image, resolution)
    result = np.zeros_like(padded, dtype=np.uint8)
    result[np.min(padded, axis=2) > a] = 255
    return cut(result)


def _scribble_xdog(image: ImageArray, resolution: int, a: float, b: float) -> ImageArray:
    padded, cut = _padded(image, resolution)
    pixels = padded.astype(np.float32)
    fine = cv2.GaussianBlur(pixels, (0, 0), 0.5)
    coarse = cv2.GaussianBlur(pixels, (0, 0), 5.0)
    dog = (255 - np.min(coarse - fine, axis=2)).clip(0, 255).astype(np.uint8)
    result = np.zeros_like(padded, dtype=np.uint8)
    result[2 * (255 - dog) > a] = 255
    return cut(result)


def _tile_resample(image: ImageArray, resolution: int, a: float, b: float) -> ImageArray:
    if a < 1.1:
        return image
    height, width = image.shape[:2]
    size = (int(float(width) / float(a)), int(float(height) / float(a)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _blur_gaussian(image: ImageArray, resolution: int, a: float, b: float) -> ImageArray:
    return cv2.GaussianBlur(at_resolution(image, resolution), (0, 0), float(a))


def _lineart_standard(image: ImageArray, resolution: int, a: float, b: float) -> ImageArray:
    padded, cut = _padded(image, resolution)
    pixels = padded.astype(np.float32)
    surroundings = cv2.GaussianBlur(pixels, (0, 0), 6.0)
    strength = np.min(surroundings - pixels, axis=2).clip(0, 255)
    strong = strength[strength > 8]
    median = float(np.median(strong)) if strong.size else 0.0  # numpy: nan -> max(16, nan)
    strength /= max(16.0, median)
    strength *= 127
    return cut(strength.clip(0, 255).astype(np.uint8)[:, :, None])


BUILT_IN: tuple[Preprocessor, ...] = (
    Preprocessor("none", "none", _none, priority=10),
    Preprocessor(
        "canny",
        "canny",
        _canny,
        priority=100,
        slider_1=Slider("Low Threshold", 1, 255, 1, 100, True),
        slider_2=Slider("High Threshold", 1, 255, 1, 200, True),
        tags=("Canny",),
    ),
    Preprocessor(
        "invert",
        "invert (from white bg & black line)",
        _invert,
        priority=20,
        resolution=HIDDEN,
        tags=("Canny", "Lineart", "Scribble", "MLSD"),
    ),
    Preprocessor(
        "threshold",
        "threshold",
        _threshold,
        slider_1=Slider("Binarization Threshold", 0, 255, 0.01, 127, True),
    ),
    Preprocessor(
        "scribble_xdog",
        "scribble_xdog",
        _scribble_xdog,
        slider_1=Slider("XDoG Threshold", 1, 64, 0.01, 32, True),
        tags=("Scribble", "SparseCtrl"),
    ),
    Preprocessor(
        "tile_resample",
        "tile_resample",
        _tile_resample,
        priority=100,
        slider_1=Slider("Down Sampling Rate", 1.0, 8.0, 0.01, 1.0, True),
        tags=("Tile",),
    ),
    Preprocessor(
        "blur_gaussian",
        "blur_gaussian",
        _blur_gaussian,
        slider_1=Slider("Sigma", 0.01, 64.0, 0.01, 9.0, True),
        tags=("Tile",),
    ),
    Preprocessor(
        "lineart_standard",
        "lineart_standard (from white bg & black line)",
        _lineart_standard,
        priority=100,
        tags=("Lineart",),
    ),
    *(
        Preprocessor(name, name, _none, resolution=HIDDEN, tags=("IP-Adapter",), encoder=encoder)
        for name, encoder in (
            ("ip-adapter_clip_sd15", "clip_h"),
            ("ip-adapter_clip_sdxl", "clip_g"),
            ("ip-adapter_clip_sdxl_plus_vith", "clip_h"),
            ("ip-adapter_face_id", FACE_ENCODER),
        )
    ),
)


@dataclass(frozen=True)
class WeightedPreprocessor:
    """A preprocessor that needs weights: where they go, and why this build cannot run it
    at all (`unsupported`), if so."""

    name: str
    label: str
    folder: str  # under models/ControlNet/annotators/
    files: tuple[str, ...]
    source: str = ""
    """Where the files come from, for the message naming them."""
    other_files: tuple[str, ...] = ()
    """Another form of the weights, used when `files` are not all there."""
    unsupported: str | None = None
    priority: int = 0
    tags: tuple[str, ...] = ()


WEIGHTED: tuple[WeightedPreprocessor, ...] = (
    WeightedPreprocessor(
        "depth_midas",
        "depth_midas",
        "midas",
        ("config.json", "model.safetensors"),
        source=(
            "the transformers folder Intel/dpt-hybrid-midas, or instead "
            "sd-webui-controlnet's dpt_hybrid-midas-501f0c75.pt"
        ),
        other_files=("dpt_hybrid-midas-501f0c75.pt",),
        priority=100,
        tags=("Depth",),
    ),
    WeightedPreprocessor(
        "openpose",
        "openpose",
        "openpose",
        ("body_pose_model.pth",),
        source=(
            "lllyasviel/Annotators, the file sd-webui-controlnet downloads; or the same "
            "tensors as body_pose_model.safetensors"
        ),
        other_files=("body_pose_model.safetensors",),
        priority=100,
        tags=("OpenPose",),
    ),
)
"""sd-webui-controlnet's names, priorities and tags; `annotators.Annotators` says which run."""


def sorted_preprocessors(modules: Sequence[Preprocessor] = BUILT_IN) -> list[Preprocessor]:
    """sd-webui-controlnet's order: `none` first, then by priority and label, descending."""
    rest = [p for p in modules if p.name != "none"]
    rest.sort(key=lambda p: str(p.priority).zfill(8) + p.label, reverse=True)
    return [BUILT_IN[0], *rest]


_BY_NAME = {p.name: p for p in BUILT_IN} | {p.label: p for p in BUILT_IN}


def find_preprocessor(name: str, field: str = "module") -> Preprocessor:
    """A module without weights by name or label (`annotators.Annotators.find` also finds
    the ones with weights)."""
    found = _BY_NAME.get(name)
    if found is not None:
        return found
    known = ", ".join(p.name for p in sorted_preprocessors())
    raise InvalidRequestError(
        f"{field}: unknown preprocessor '{name}'; known: {known}", field=field
    )


def detect_maps(
    module: Preprocessor, images: list[Image.Image], resolution: int, a: float, b: float
) -> list[Image.Image]:
    """sd-webui-controlnet's `/controlnet/detect`: each image's map at the processor
    resolution (out-of-range values: the module's defaults), not fitted to any size."""
    res = int(module.resolution.effective(resolution))
    a, b = module.slider_1.effective(a), module.slider_2.effective(b)
    return [
        Image.fromarray(module(np.asarray(image.convert("RGB")), max(res, 1), a, b))
        for image in images
    ]


def pixel_perfect_resolution(image: ImageArray, height: int, width: int, resize_mode: str) -> int:
    """sd-webui-controlnet's `pixel_perfect_resolution`: the processor resolution that maps
    the image's short side onto the target exactly (Resize and Fill: the smaller scale)."""
    raw_h, raw_w = image.shape[:2]
    k0, k1 = float(height) / float(raw_h), float(width) / float(raw_w)
    scale = min(k0, k1) if resize_mode == "Resize and Fill" else max(k0, k1)
    return int(np.round(scale * float(min(raw_h, raw_w))))


# ------------------------------------------------------------------ fitting to the size


def _unique_colors(pixels: ImageArray) -> int:
    flat = pixels.reshape(-1, pixels.shape[2])
    return len(np.unique(flat, axis=0))


def _thin_kernels() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Lvmin Zhang's hit-or-miss kernels for one-pixel edges (thinning, then pruning), in
    the four rotations."""
    thinning = [
        np.array([[-1, -1, -1], [0, 1, 0], [1, 1, 1]], dtype=np.int32),
        np.array([[0, -1, -1], [1, 1, -1], [0, 1, 0]], dtype=np.int32),
    ]
    pruning = [
        np.array([[-1, -1, -1], [-1, 1, -1], [0, 0, -1]], dtype=np.int32),
        np.array([[-1, -1, -1], [-1, 1, -1], [-1, 0, 0]], dtype=np.int32),
    ]

    def rotations(kernels: list[np.ndarray]) -> list[np.ndarray]:
        return [np.rot90(kernel, k=turn) for turn in range(4) for kernel in kernels]

    return rotations(thinning), rotations(pruning)


def _thin_once(edges: ImageArray, kernels: list[np.ndarray]) -> bool:
    """Remove every pixel one kernel matches, in place; whether any was removed."""
    changed = False
    for kernel in kernels:
        hits = cv2.morphologyEx(edges, cv2.MORPH_HITMISS, kernel) > 127
        if hits.any():
            edges[hits] = 0
            changed = True
    return changed


def _thin(edges: ImageArray, prune: bool) -> ImageArray:
    thinning, pruning = _thin_kernels()
    for _ in range(32):
        if not _thin_once(edges, thinning):
            break
    if prune:
        _thin_once(edges, pruning)
    return edges


def _line_nms(grey: ImageArray) -> ImageArray:
    """Keep a pixel where it is the maximum along one of four directions."""
    lines = [
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
    ]
    kept = np.zeros_like(grey)
    for line in lines:
        np.putmask(kept, cv2.dilate(grey, kernel=line) == grey, grey)
    return kept


def high_quality_resize(pixels: ImageArray, width: int, height: int) -> ImageArray:
    """sd-webui-controlnet's `high_quality_resize` (by Lvmin Zhang) for control maps: few
    colours (segmentation) nearest; shrinking INTER_AREA, growing INTER_CUBIC; two-colour
    (binary) maps are thresholded again with Otsu, one-pixel edges thinned back to one pixel."""
    if pixels.shape[:2] == (height, width):
        return pixels
    area, old_area = width * height, pixels.shape[0] * pixels.shape[1]
    colors = _unique_colors(pixels)
    binary = colors == 2 and int(pixels.min()) < 16 and int(pixels.max()) > 240
    one_pixel_edge = False
    if binary:
        box = np.ones((3, 3), dtype=np.uint8)
        opened = cv2.dilate(cv2.erode(pixels, box, iterations=1), box, iterations=1)
        thin_count = np.where(opened < pixels)[0].shape[0]
        edge_count = np.where(pixels > 127)[0].shape[0]
        one_pixel_edge = thin_count * 2 > edge_count
    if 2 < colors < 200:
        interpolation = cv2.INTER_NEAREST
    elif area < old_area:
        interpolation = cv2.INTER_AREA
    else:
        interpolation = cv2.INTER_CUBIC
    resized = cv2.resize(pixels, (width, height), interpolation=interpolation)
    if not binary:
        return resized
    grey = np.mean(resized.astype(np.float32), axis=2).clip(0, 255).astype(np.uint8)
    if one_pixel_edge:
        grey = _line_nms(grey)
        _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
        grey = _thin(grey, prune=area > old_area)
    else:
        _, grey = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return np.stack([grey] * 3, axis=2)


def fit_map(detected: ImageArray, resize_mode: str, width: int, height: int) -> ImageArray:
    """sd-webui-controlnet's `detectmap_proc`: the map at the generation size. Just Resize
    stretches; Crop and Resize covers the size and cuts the centre; Resize and Fill fits
    inside it on the median colour of the map's border."""
    detected = hwc3(detected)
    if resize_mode == "Just Resize":
        return high_quality_resize(detected, width, height)
    old_h, old_w = detected.shape[:2]
    k0, k1 = float(height) / old_h, float(width) / old_w
    if resize_mode == "Resize and Fill":
        scale = min(k0, k1)
        border = np.concatenate(
            [detected[0, :, :], detected[-1, :, :], detected[:, 0, :], detected[:, -1, :]]
        )
        color = np.median(border, axis=0).astype(detected.dtype)
        canvas = np.tile(color[None, None], [height, width, 1])
        inner = high_quality_resize(
            detected, int(np.round(old_w * scale)), int(np.round(old_h * scale))
        )
        new_h, new_w = inner.shape[:2]
        top, left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
        canvas[top : top + new_h, left : left + new_w] = inner
        return np.ascontiguousarray(canvas)
    scale = max(k0, k1)
    covering = high_quality_resize(
        detected, int(np.round(old_w * scale)), int(np.round(old_h * scale))
    )
    new_h, new_w = covering.shape[:2]
    top, left = max(0, (new_h - height) // 2), max(0, (new_w - width) // 2)
    return np.ascontiguousarray(covering[top : top + height, left : left + width])


def read_annotator_file(module: str, shown_folder: str, path: Path, read: Callable[[Path], T]) -> T:
    """`read(path)` for preprocessor `module`; a file it refuses is refused again naming the
    preprocessor and the folder (`shown_folder`), as the request's `module` field's fault."""
    try:
        return read(path)
    except UnusableFileError as error:  # the error starts with the file's name
        raise type(error)(
            f"preprocessor {module}: {shown_folder}/{error}", field="module"
        ) from error
