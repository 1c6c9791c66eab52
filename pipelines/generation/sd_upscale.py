"""A1111's "SD upscale" img2img script (`scripts/sd_upscale.py`, `modules/images.py`
`split_grid`/`combine_grid`): upscale the init image, img2img it tile by tile at the
request's size, blend the overlapping tiles back.

As A1111: tiles go through img2img `batch_size` at a time; batch i of image n uses seeds
from `seed + n + i` (A1111 sets the next batch's seed to the last batch's first seed + 1);
every image's infotext is the first tile batch's. A last batch with fewer tiles runs only
those tiles (A1111 repeats a lone tile over the whole batch and keeps the first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from pipelines.devices import DevicePlan
from pipelines.errors import InvalidRequestError
from pipelines.folders.registry import ModelFolders
from pipelines.generation.hires import pixel_upscale
from pipelines.generation.img2img import Img2ImgRun
from pipelines.generation.run import RunControl
from pipelines.imageops import flatten
from pipelines.model_manager import ActiveModel
from pipelines.schema import SEED_MAX, GenerationRequest, GenerationResult


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


class _TileProgress:
    """The job's progress over all tile batches (each inner run reports one batch)."""

    def __init__(self, control: RunControl, total: int) -> None:
        self.control = control
        self.total = total
        self.done = 0

    @property
    def interrupted(self) -> bool:
        return self.control.interrupted

    @property
    def skipped(self) -> bool:
        return self.control.skipped

    def batch(self, job_no: int, job_count: int, steps: int) -> None:
        self.control.batch(self.done, self.total, steps)

    def step(self, step: int, preview: Callable[[], list[Image.Image]] | None = None) -> None:
        self.control.step(step, preview)


class SdUpscaleRun:
    """SD upscale on one loaded model: same constructor as the other runs.

    Example:
        >>> SdUpscaleRun(model, plan, folders, control)(request)  # doctest: +SKIP
    """

    def __init__(
        self, model: ActiveModel, plan: DevicePlan, folders: ModelFolders, control: RunControl
    ) -> None:
        self.model, self.plan, self.folders, self.control = model, plan, folders, control

    def __call__(self, request: GenerationRequest) -> GenerationResult:
        inputs = request.img2img
        assert inputs is not None and inputs.sd_upscale is not None
        spec = inputs.sd_upscale
        init = flatten(inputs.images[0])
        if spec.upscaler == "None":
            upscaled = init  # A1111: no upscaler, no scaling
        else:
            size = (int(init.width * spec.scale), int(init.height * spec.scale))
            upscaled = pixel_upscale(init, *size, spec.upscaler)
        if upscaled.width < request.width or upscaled.height < request.height:
            raise InvalidRequestError(
                f"the upscaled image ({upscaled.width}x{upscaled.height}) is smaller than "
                f"one tile ({request.width}x{request.height}): use a smaller width/height",
                field="width",
            )
        if spec.overlap >= min(request.width, request.height):
            raise InvalidRequestError(
                f"the tile overlap {spec.overlap} must be smaller than the tile "
                f"({request.width}x{request.height})",
                field="script_args",
            )
        grid = split_grid(upscaled, request.width, request.height, spec.overlap)
        tiles = [tile for _, row in grid.rows for tile in row]
        originals = [tile.image for tile in tiles]  # each image starts from these
        per_batch = request.batch_size
        batches = math.ceil(len(tiles) / per_batch)
        progress = _TileProgress(self.control, batches * request.n_iter)
        images: list[Image.Image] = []
        seeds: list[int] = []
        first: GenerationResult | None = None
        for n in range(request.n_iter):
            seed = (request.seed + n) % (SEED_MAX + 1)
            done: list[Image.Image] = []
            for i in range(batches):
                if self.control.interrupted:
                    break
                chunk = originals[i * per_batch : (i + 1) * per_batch]
                tile_inputs = replace(inputs, images=tuple(chunk), sd_upscale=None)
                tile_request = replace(
                    request,
                    img2img=tile_inputs,
                    n_iter=1,
                    batch_size=len(chunk),
                    seed=(seed + i) % (SEED_MAX + 1),
                )
                result = Img2ImgRun(self.model, self.plan, self.folders, progress)(tile_request)
                progress.done += 1
                first = first or result
                done.extend(result.images)
            if self.control.interrupted and len(done) < len(tiles):
                break
            for tile, image in zip(tiles, done, strict=True):
                tile.image = image
            images.append(combine_grid(grid))
            seeds.append(seed)
        if first is None:  # interrupted before the first tile
            return GenerationResult([], [], [], request, self.model.name, None, interrupted=True)
        infotext = first.infotexts[0]
        return replace(
            first,
            images=images,
            seeds=seeds,
            infotexts=[infotext] * len(images),
            request=request,
            interrupted=self.control.interrupted,
        )
