"""ZeroGPU: run generation under `@spaces.GPU` when the Space has ZeroGPU hardware.

Read from the `spaces` package (0.51.3): ZeroGPU is on when `SPACES_ZERO_GPU` is true
(`spaces.config.Config.zero_gpu`); elsewhere `spaces.GPU` returns the function unchanged,
and `spaces` need not be installed at all, so this module imports it only when ZeroGPU is
on. `spaces` must be imported before anything initialises CUDA (it refuses otherwise), so
`main()` calls `prepare()` first. The decorated function runs in a forked worker: its
arguments and result must pickle, and weights changed there do not come back, hence
`Engine.generate(..., stateless=True)` inside it. `ZeroGpuRunner` is the service's runner
there: the local engine, with each generation under `spaces.GPU`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pipelines.folders.loras import LoraEntry
from pipelines.lora.coverage import LoraCoverage
from pipelines.schema import GenerationRequest

if TYPE_CHECKING:  # `prepare` must run before anything imports torch's CUDA side
    from pipelines.engine import Engine
    from pipelines.extras import ExtrasRequest, ExtrasResult
    from pipelines.folders.registry import ModelFolders
    from pipelines.generation.run import RunControl
    from pipelines.interface import DeviceInfo, ModelStatus
    from pipelines.schema import GenerationResult
    from pipelines.settings import Settings

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

MIN_SECONDS = 15
MAX_SECONDS = 300
"""ZeroGPU refuses longer requests ("illegal duration"); its maintainers give 5 minutes as
the most one call may ask for. Shorter requests get a GPU sooner."""
DEFAULT_SECONDS = 60  # `spaces`' own default, for calls that carry no request
OVERHEAD_SECONDS = 10.0  # LoRA merge, text encoders, moving weights to the GPU
STEP_SECONDS_PER_MEGAPIXEL = 0.25  # one denoising step (with CFG) per image megapixel
DECODE_SECONDS_PER_MEGAPIXEL = 1.0  # VAE decode per image megapixel
SAFETY_FACTOR = 1.5  # a call that overruns its duration is aborted


def estimate_duration(request: GenerationRequest) -> int:
    """Seconds of GPU time to ask ZeroGPU for, from the request's work.

    images = batch_size * n_iter; megapixels = width * height / 2^20;
    seconds = 1.5 * (10 + images * megapixels * (0.25 * steps + 1.0)),
    rounded up and clamped to 15..300. The rates are an SDXL-class UNet on an H200 slice
    with room to spare; SD1 models finish well inside them.

    Example:
        >>> estimate_duration(GenerationRequest(steps=20, width=512, height=512))
        18
    """
    images = max(1, request.batch_size) * max(1, request.n_iter)
    megapixels = max(1, request.width) * max(1, request.height) / (1 << 20)
    per_image = megapixels * (STEP_SECONDS_PER_MEGAPIXEL * max(1, request.steps))
    per_image += megapixels * DECODE_SECONDS_PER_MEGAPIXEL
    seconds = SAFETY_FACTOR * (OVERHEAD_SECONDS + images * per_image)
    return int(min(MAX_SECONDS, max(MIN_SECONDS, math.ceil(seconds))))


def duration_of_call(*args: Any, **kwargs: Any) -> int:
    """`spaces.GPU`'s dynamic duration: called with the wrapped function's arguments, it
    estimates from the first GenerationRequest among them."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, GenerationRequest):
            return estimate_duration(value)
    return DEFAULT_SECONDS


def zero_gpu_active(env: Mapping[str, str] | None = None) -> bool:
    """True on ZeroGPU hardware (the variable `spaces` itself reads)."""
    value = (os.environ if env is None else env).get("SPACES_ZERO_GPU")
    return value is not None and value.lower() in ("1", "t", "true")


def prepare(env: Mapping[str, str] | None = None) -> bool:
    """Import `spaces` early when ZeroGPU is on (before CUDA starts). Returns whether
    generation will run under `spaces.GPU`."""
    if not zero_gpu_active(env):
        return False
    try:
        import spaces  # noqa: F401
    except ImportError:
        log.warning("SPACES_ZERO_GPU is set but the spaces package is missing: no ZeroGPU")
        return False
    return True


def gpu_wrapper(
    function: F,
    *,
    duration: Callable[..., int] = duration_of_call,
    env: Mapping[str, str] | None = None,
) -> F:
    """`spaces.GPU(duration=...)(function)` on ZeroGPU; `function` itself elsewhere.

    Args:
        function: the call that needs the GPU (builds nothing, just calls the engine).
        duration: seconds to request, computed from the same arguments at each call.
        env: the environment (os.environ by default).
    Example:
        >>> run = gpu_wrapper(lambda request: engine.generate(request, stateless=True))
    """
    if not prepare(env):
        return function
    import spaces

    log.info("ZeroGPU: generation runs under spaces.GPU with an estimated duration")
    return spaces.GPU(duration=duration)(function)  # type: ignore[no-any-return]


class _Unobserved:
    """Run control for a call in ZeroGPU's forked worker: its steps cannot be reported back
    to this process, and it is never stopped (Interrupt still drops queued jobs)."""

    interrupted = False
    skipped = False

    def batch(self, job_no: int, job_count: int, steps: int) -> None:
        """Nothing to report across the fork."""

    def step(self, step: int, preview: Any = None) -> None:
        """Nothing to report across the fork."""


class ZeroGpuRunner:
    """The local engine with every generation under `spaces.GPU` (a `Runner`).

    Args:
        engine: the local engine (its pipeline stays in this process between calls).
        env: the environment (os.environ by default).
    """

    workers = 1

    def __init__(self, engine: Engine, env: Mapping[str, str] | None = None) -> None:
        self.engine = engine
        self._gpu_generate = gpu_wrapper(self._stateless, env=env)
        self._gpu_postprocess = gpu_wrapper(self._postprocess, env=env)

    def _stateless(self, request: GenerationRequest) -> GenerationResult:
        return self.engine.generate(request, _Unobserved(), stateless=True)

    def generate(self, request: GenerationRequest, control: RunControl) -> GenerationResult:
        return self._gpu_generate(request)

    def _postprocess(self, request: ExtrasRequest) -> ExtrasResult:
        return self.engine.postprocess(request, _Unobserved())

    def postprocess(self, request: ExtrasRequest, control: RunControl) -> ExtrasResult:
        return self._gpu_postprocess(request)

    def device(self) -> DeviceInfo:
        return self.engine.device()

    def load(self, name: str | None) -> ModelStatus:
        return self.engine.load(name)

    def loaded(self) -> ModelStatus | None:
        return self.engine.loaded()

    def rescanned(self) -> None:
        self.engine.rescanned()

    def lora_coverage(
        self, entries: Sequence[LoraEntry], checkpoint: str
    ) -> list[LoraCoverage] | None:
        return self.engine.lora_coverage(entries, checkpoint)  # the pipeline lives in this process


def zero_gpu_runner(settings: Settings, folders: ModelFolders) -> ZeroGpuRunner:
    """The runner factory `build_service` takes on a ZeroGPU Space."""
    from pipelines.engine import Engine

    return ZeroGpuRunner(Engine(settings, folders))
