"""The Extras tab's upscaling (A1111 1.10 `modules/postprocessing.py` with
`scripts/postprocessing_upscale.py`): scale by a factor or to a size, with an optional
second upscaler blended in. Face restoration is out of scope and refused by the callers.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from PIL import Image

from pipelines.errors import DeviceOutOfMemoryError, InvalidRequestError
from pipelines.infotext import quote, read_infotext
from pipelines.upscalers import Upscaling

if TYPE_CHECKING:
    from pipelines.devices import DevicePlan
    from pipelines.folders.registry import ModelFolders
    from pipelines.generation.run import RunControl

EXTRAS_PIXEL_FACTOR = 16
"""An Extras image may have up to this many times `Bounds.max_pixels` (1 MP on a CPU, 4 MP on
a GPU by default: 16 MP and 64 MP)."""
RESIZE_MODES = ("Scale by", "Scale to")


@dataclass(frozen=True)
class ExtrasRequest:
    """One Extras run over `images` (A1111's field names, API defaults).

    `resize_mode` 0 scales by `upscaling_resize` (shrunk to fit `max_side_length` when that
    is not 0); 1 scales to `upscaling_resize_w` x `upscaling_resize_h`, centred and cropped
    to exactly that size with `upscaling_crop`. `upscaler_1` "None" leaves images as they
    are (A1111 skips the step).
    """

    images: tuple[Image.Image, ...]
    resize_mode: int = 0
    upscaling_resize: float = 2.0
    max_side_length: int = 0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = "None"
    upscaler_2: str = "None"
    upscaler_2_visibility: float = 0.0

    def validated(self, max_pixels: int) -> ExtrasRequest:
        """Check the fields and that every output fits `max_pixels` (the Extras limit);
        raises InvalidRequestError naming the field."""
        if not self.images:
            raise InvalidRequestError("no image given", field="image")
        if self.resize_mode not in (0, 1):
            raise InvalidRequestError(
                f"resize_mode must be 0 (scale by) or 1 (scale to), got {self.resize_mode}",
                field="resize_mode",
            )
        if not 0.0 <= self.upscaler_2_visibility <= 1.0:
            raise InvalidRequestError(
                "extras_upscaler_2_visibility must be between 0 and 1",
                field="extras_upscaler_2_visibility",
            )
        if self.max_side_length < 0:
            raise InvalidRequestError("max_side_length must be 0 or more", field="max_side_length")
        field_name = "upscaling_resize" if self.resize_mode == 0 else "upscaling_resize_w"
        if self.resize_mode == 0 and not 0 < self.upscaling_resize <= 16:
            raise InvalidRequestError(
                f"upscaling_resize must be above 0 and at most 16, got {self.upscaling_resize}",
                field="upscaling_resize",
            )
        if self.resize_mode == 1 and min(self.upscaling_resize_w, self.upscaling_resize_h) < 1:
            raise InvalidRequestError(
                "upscaling_resize_w and upscaling_resize_h must be at least 1", field=field_name
            )
        for image in self.images:
            width, height = self.output_size(image)
            if width * height > max_pixels:
                raise InvalidRequestError(
                    f"the result would be {width}x{height} ({width * height} pixels), over the "
                    f"limit of {max_pixels} pixels for Extras: ask for a smaller size",
                    field=field_name,
                )
        return self

    def plan(self, image: Image.Image) -> tuple[float, int, int, bool, int]:
        """(scale, target width, target height, crop, max side) as A1111's `upscale`
        works them out for one image."""
        if self.resize_mode == 1:
            width, height = self.upscaling_resize_w, self.upscaling_resize_h
            scale = max(width / image.width, height / image.height)
            return scale, width, height, self.upscaling_crop, 0
        scale = self.upscaling_resize
        limit = self.max_side_length
        if limit and max(image.size) * scale > limit:
            width, height = _limit_size(image.width * scale, image.height * scale, limit)
            return max(width / image.width, height / image.height), width, height, False, limit
        return scale, 0, 0, False, 0

    def output_size(self, image: Image.Image) -> tuple[int, int]:
        """The size the result will have (before running anything)."""
        if self.upscaler_1 == "None":
            return image.size
        scale, width, height, crop, _ = self.plan(image)
        if crop:
            return width, height
        return int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8)


@dataclass
class ExtrasResult:
    images: list[Image.Image]
    infotexts: list[str]  # A1111's postprocessing text ("Postprocess upscale by: 2, ...")
    request: ExtrasRequest
    parameters: list[str | None] = field(default_factory=list)  # each source's infotext
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)


def _limit_size(width: float, height: float, limit: int) -> tuple[int, int]:
    """A1111's `limit_size_by_one_dimention`."""
    if height > width and height > limit:
        width, height = limit * width // height, limit
    elif width > limit:
        width, height = limit, limit * height // width
    return int(width), int(height)


def run_extras(
    request: ExtrasRequest,
    upscaling: Upscaling,
    *,
    progress: Callable[[int], None] = lambda _: None,
) -> ExtrasResult:
    """Upscale every image as A1111's Extras does; `progress(n)` after each image."""
    infotexts: list[str] = []
    results: list[Image.Image] = []
    for number, image in enumerate(request.images):
        info: dict[str, object] = {}
        if upscaling.stop():
            break
        result = image.convert("RGB")  # as A1111 (`PostprocessedImage(image.convert("RGB"))`)
        if request.upscaler_1 != "None":
            source = result
            result = _upscale(source, request, request.upscaler_1, upscaling, info)
            info["Postprocess upscaler"] = request.upscaler_1
            if request.upscaler_2 != "None" and request.upscaler_2_visibility > 0:
                second = _upscale(source, request, request.upscaler_2, upscaling, info)
                if second.mode != result.mode:
                    second = second.convert(result.mode)
                result = Image.blend(result, second, request.upscaler_2_visibility)
                info["Postprocess upscaler 2"] = request.upscaler_2
        results.append(result)
        infotexts.append(", ".join(f"{key}: {quote(value)}" for key, value in info.items()))
        progress(number + 1)
    return ExtrasResult(
        results,
        infotexts,
        request,
        parameters=[read_infotext(image) for image in request.images[: len(results)]],
        interrupted=len(results) < len(request.images),
    )


def extras_png(image: Image.Image, parameters: str | None, postprocessing: str) -> bytes:
    """PNG bytes as A1111 writes an Extras result: the source's `parameters` kept, the
    Extras text in a `postprocessing` chunk."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    if postprocessing:
        info.add_text("postprocessing", postprocessing)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _upscale(
    image: Image.Image,
    request: ExtrasRequest,
    name: str,
    upscaling: Upscaling,
    info: dict[str, object],
) -> Image.Image:
    """A1111's `ScriptPostprocessingUpscale.upscale` for one upscaler."""
    scale, width, height, crop, limit = request.plan(image)
    if request.resize_mode == 1:
        info["Postprocess upscale to"] = f"{width}x{height}"
    else:
        info["Postprocess upscale by"] = request.upscaling_resize
        if limit:
            info["Max side length"] = limit
    upscaled = upscaling.upscale(image, scale, name)
    if crop:
        cropped = Image.new("RGB", (width, height))
        cropped.paste(
            upscaled, (width // 2 - upscaled.width // 2, height // 2 - upscaled.height // 2)
        )
        upscaled = cropped
        info["Postprocess crop to"] = f"{width}x{height}"
    return upscaled


def postprocess_here(
    request: ExtrasRequest, folders: ModelFolders, plan: DevicePlan, control: RunControl
) -> ExtrasResult:
    """Run Extras in this process on `plan`'s device, reporting one step per image; an
    interrupt stops between images (and a model upscaler between tiles)."""
    try:
        upscaling = Upscaling(folders, plan.device, plan.dtype, lambda: control.interrupted)
        control.batch(0, 1, len(request.images))
        return run_extras(request, upscaling, progress=control.step)
    except torch.cuda.OutOfMemoryError as error:
        raise DeviceOutOfMemoryError(
            "out of device memory while upscaling: use a smaller size"
        ) from error
