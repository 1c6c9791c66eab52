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
from dataclasses import replace

from PIL import Image

from pipelines.controlnet.annotators import Annotators
from pipelines.controlnet.models import ControlNetCache
from pipelines.devices import DevicePlan
from pipelines.embeddings import EmbeddingStore
from pipelines.errors import InvalidRequestError
from pipelines.folders.registry import ModelFolders
from pipelines.generation.img2img import Img2ImgRun
from pipelines.generation.run import RunControl
from pipelines.imageops import combine_grid, flatten, split_grid
from pipelines.model_manager import ActiveModel
from pipelines.preview import PreviewDecoders
from pipelines.schema import SEED_MAX, GenerationRequest, GenerationResult
from pipelines.upscalers import Upscaling


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

    def batch_finished(self, result: GenerationResult) -> None:
        """A tile's pass is not a batch the user asked for: nothing to show early."""


class SdUpscaleRun:
    """SD upscale on one loaded model: same constructor as the other runs.

    Example:
        >>> SdUpscaleRun(model, plan, folders, control)(request)  # doctest: +SKIP
    """

    previews: PreviewDecoders | None = None  # set by the engine, passed to each tile's run
    embeddings: EmbeddingStore | None = None
    controlnets: ControlNetCache | None = None
    annotators: Annotators | None = None

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
        else:  # A1111's Upscaler.upscale: the scaled size rounded down to 8
            upscaling = Upscaling(
                self.folders, self.plan.device, self.plan.dtype, lambda: self.control.interrupted
            )
            upscaled = upscaling.upscale(init, spec.scale, spec.upscaler)
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
                tile_run = Img2ImgRun(self.model, self.plan, self.folders, progress)
                tile_run.previews, tile_run.embeddings = self.previews, self.embeddings
                tile_run.controlnets, tile_run.annotators = self.controlnets, self.annotators
                result = tile_run(tile_request)
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
            detected_maps=[],  # sd-webui-controlnet shows no maps for SD upscale
        )
