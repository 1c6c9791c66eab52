"""ZeroGPU: run generation under `@spaces.GPU` when the Space has ZeroGPU hardware.

Read from the `spaces` package (0.51.3): ZeroGPU is on when `SPACES_ZERO_GPU` is true
(`spaces.config.Config.zero_gpu`); elsewhere `spaces.GPU` returns the function unchanged,
and `spaces` need not be installed at all, so this module imports it only when ZeroGPU is
on. `spaces` must be imported before anything initialises CUDA (it refuses otherwise), so
`main()` calls `prepare()` first.

`spaces.zero.wrappers` runs the decorated function in a worker forked from the main
process (`multiprocessing` "fork"), passes its arguments and result by pickling, and keeps
the worker for the next call while the scheduler reports the GPU idle; the scheduler aborts
a call that outruns its requested duration. So `ZeroGpuRunner` does everything that is not
sampling in the main process first, on the CPU (DiffuseCraft's "load LoRAs on CPU"):
`Engine.prepare` loads the checkpoint and merges the LoRA stack and VAE, and does the same
for a hires fix's `hr_checkpoint_name` and a refiner (the model cache grows to hold every
checkpoint of a request); a freshly forked worker inherits those weights, only makes each
model current in turn (no file read, no merge), samples and decodes. A kept worker forked
before a later load or merge still holds the old weights: its `Engine.generate` brings them
up to date itself (correct, but paid in GPU time), and the runner logs it and counts it. `ForkGuard`
makes sure no background thread (hashing, a listing) holds a lock the worker needs at the
moment of the fork. The duration asked for comes from `DurationModel`, calibrated from the
recorded GPU time of earlier calls on the same hardware.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
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
OVERHEAD_SECONDS = 10.0  # starting the worker, moving the weights to the GPU, text encoders
STEP_SECONDS_PER_MEGAPIXEL = 0.25  # one denoising step (with CFG) per image megapixel
DECODE_STEPS = 4.0  # a VAE decode costs about as much as this many steps
SAFETY_FACTOR = 1.5  # a call that overruns its duration is aborted
RECORDS_KEPT = 20  # recent runs per hardware that calibrate the rate


def work_units(request: GenerationRequest) -> float:
    """images x megapixels x (steps + a decode's worth), plus the same for a hires fix's
    second pass at its target size (its steps, or the first pass's: with A1111's fixed
    img2img steps the second pass runs exactly that many): what GPU time grows with."""
    images = max(1, request.batch_size) * max(1, request.n_iter)
    units = (
        images * megapixels(request.width, request.height) * (max(1, request.steps) + DECODE_STEPS)
    )
    hires = request.hires
    if hires is not None:
        to_x, to_y, _, _ = hires.target(request.width, request.height)
        steps = hires.second_pass_steps or request.steps
        units += images * megapixels(to_x, to_y) * (max(1, steps) + DECODE_STEPS)
    return units


def megapixels(width: int, height: int) -> float:
    return max(1, width) * max(1, height) / (1 << 20)


@dataclass
class DurationModel:
    """Seconds of GPU time to ask ZeroGPU for, from a request's `work_units`.

    seconds = safety x (overhead + rate x units), rounded up and clamped to
    minimum..maximum. `rate` (seconds per unit) starts at 0.25, an SDXL-class UNet on an
    H200 slice with room to spare; once runs are recorded on this hardware, it is the
    largest rate among the last RECORDS_KEPT (never below what they showed, so a call is
    not cut short). Records persist in `path` (JSON, by hardware name) across restarts.

    Example:
        >>> DurationModel().estimate(GenerationRequest(steps=20, width=512, height=512))
        18
    """

    hardware: str = "default"
    path: Path | None = None
    overhead: float = OVERHEAD_SECONDS
    default_rate: float = STEP_SECONDS_PER_MEGAPIXEL
    safety: float = SAFETY_FACTOR
    minimum: int = MIN_SECONDS
    maximum: int = MAX_SECONDS
    records: list[tuple[float, float]] = field(default_factory=list)  # (units, seconds)

    def __post_init__(self) -> None:
        if self.path is not None and self.path.is_file():
            try:
                saved = json.loads(self.path.read_text()).get(self.hardware, [])
                self.records = [(float(u), float(s)) for u, s in saved][-RECORDS_KEPT:]
            except (ValueError, TypeError, AttributeError) as error:
                log.warning("ignoring %s: %s", self.path, error)

    @property
    def rate(self) -> float:
        """Seconds per work unit: measured on this hardware once runs are recorded."""
        measured = [seconds / units for units, seconds in self.records if units > 0]
        return max(measured) if measured else self.default_rate

    def estimate(self, request: GenerationRequest) -> int:
        seconds = self.safety * (self.overhead + self.rate * work_units(request))
        return int(min(self.maximum, max(self.minimum, math.ceil(seconds))))

    def record(self, request: GenerationRequest, seconds: float) -> None:
        """Remember how long a call's sampling and decoding took on this hardware."""
        self.records = [*self.records, (work_units(request), seconds)][-RECORDS_KEPT:]
        if self.path is None:
            return
        try:
            saved = json.loads(self.path.read_text()) if self.path.is_file() else {}
            saved[self.hardware] = self.records
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staged = self.path.with_suffix(".tmp")
            staged.write_text(json.dumps(saved))
            staged.replace(self.path)
        except (OSError, ValueError) as error:
            log.warning("could not keep ZeroGPU timings in %s: %s", self.path, error)


def estimate_duration(request: GenerationRequest) -> int:
    """Seconds to ask for with the built-in (uncalibrated) rates.

    images = batch_size * n_iter; megapixels = width * height / 2^20;
    seconds = 1.5 * (10 + images * megapixels * 0.25 * (steps + 4)), with a hires fix's
    second pass added at its size and steps, rounded up and clamped to 15..300.

    Example:
        >>> estimate_duration(GenerationRequest(steps=20, width=512, height=512))
        18
    """
    return DurationModel().estimate(request)


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


GpuDecorator = Callable[..., Callable[[F], F]]
"""`spaces.GPU`'s shape: `GPU(duration=...)` returns a decorator."""


def gpu_decorator(env: Mapping[str, str] | None = None) -> GpuDecorator | None:
    """`spaces.GPU` on ZeroGPU, else None (the function runs here, unchanged)."""
    if not prepare(env):
        return None
    import spaces

    log.info("ZeroGPU: generation runs under spaces.GPU with an estimated duration")
    return spaces.GPU  # type: ignore[no-any-return]


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
        >>> run = gpu_wrapper(lambda request: engine.generate(request, control))
    """
    decorator = gpu_decorator(env)
    return function if decorator is None else decorator(duration=duration)(function)


class ForkGuard:
    """While armed, a fork made by the armed thread first takes every lock of `locks`
    (all or none, retrying, so no lock order can deadlock) and frees them right after in
    both processes: no background thread holds one of them across the fork, so the worker
    never waits on a lock whose owner does not exist there. The `logging` module protects
    its own locks the same way (`os.register_at_fork`).
    """

    _guards: weakref.WeakSet[ForkGuard] = weakref.WeakSet()
    _installed = False

    def __init__(self, locks: Sequence[Any]) -> None:
        self.locks = list(locks)
        self._armed: int | None = None
        self._held: list[Any] = []
        ForkGuard._guards.add(self)
        if not ForkGuard._installed:
            os.register_at_fork(
                before=ForkGuard._before_all,
                after_in_parent=ForkGuard._after_all,
                after_in_child=ForkGuard._after_all,
            )
            ForkGuard._installed = True

    @contextmanager
    def armed(self) -> Iterator[None]:
        """Guard forks made by this thread inside the block (the GPU call)."""
        self._armed = threading.get_ident()
        try:
            yield
        finally:
            self._armed = None

    @staticmethod
    def _before_all() -> None:
        for guard in list(ForkGuard._guards):
            if guard._armed == threading.get_ident():
                guard._take()

    @staticmethod
    def _after_all() -> None:
        for guard in list(ForkGuard._guards):
            while guard._held:
                guard._held.pop().release()

    def _take(self) -> None:
        while True:
            for lock in self.locks:
                if not lock.acquire(timeout=0.01):
                    while self._held:
                        self._held.pop().release()
                    break
                self._held.append(lock)
            else:
                return
            time.sleep(0.001)


def _single_cpu_thread() -> None:
    """In a forked worker (its own process): one torch CPU thread. GNU OpenMP's thread pool
    does not survive a fork, and the first parallel CPU op in the child hangs for good."""
    from pipelines.settings import Settings, apply_threads

    apply_threads(Settings(threads=1))


@dataclass(frozen=True)
class GpuCall:
    """What one GPU call hands back across the fork: the result, the checkpoint loads and
    merges the worker had to do itself (0 when the main process prepared everything; making
    a prepared model current again is not counted), and the seconds it took (the duration
    model's record)."""

    result: Any
    loads: int
    merges: int
    seconds: float


class _Unobserved:
    """Run control for a call in ZeroGPU's forked worker: its steps cannot be reported back
    to this process, and it is never stopped (Interrupt still drops queued jobs)."""

    interrupted = False
    skipped = False

    def batch(self, job_no: int, job_count: int, steps: int) -> None:
        """Nothing to report across the fork."""

    def step(self, step: int, preview: Any = None) -> None:
        """Nothing to report across the fork."""

    def batch_finished(self, result: Any) -> None:
        """Nothing to report across the fork: every batch comes with the result."""


class ZeroGpuRunner:
    """The local engine, each generation sampled under `spaces.GPU` (a `Runner`).

    Args:
        engine: the local engine; its weights live in this (the main) process.
        env: the environment (os.environ by default).
        gpu: a `spaces.GPU`-shaped decorator (default: `spaces.GPU` on ZeroGPU, else none:
            calls run here).
        durations: the duration model (default: built-in rates, records kept in memory).
    Attributes:
        inside: (checkpoint loads, merges) each GPU call did itself, in call order.
    """

    workers = 1

    def __init__(
        self,
        engine: Engine,
        env: Mapping[str, str] | None = None,
        *,
        gpu: GpuDecorator | None = None,
        durations: DurationModel | None = None,
    ) -> None:
        self.engine = engine
        self.durations = durations or DurationModel()
        self.guard = ForkGuard(engine.fork_locks())
        self.inside: list[tuple[int, int]] = []
        self._lock = threading.Lock()  # one prepare-and-sample at a time
        self._main_pid = os.getpid()
        decorator = gpu if gpu is not None else gpu_decorator(env)
        self.billed = decorator is not None  # calls go through spaces.GPU
        self._gpu_generate: Callable[[GenerationRequest], GpuCall] = self._on_gpu
        self._gpu_postprocess: Callable[[ExtrasRequest], ExtrasResult] = self._postprocess
        if decorator is not None:
            self._gpu_generate = decorator(duration=self.duration)(self._on_gpu)
            self._gpu_postprocess = decorator(duration=DEFAULT_SECONDS)(self._postprocess)

    def duration(self, request: GenerationRequest) -> int:
        """Seconds to ask for."""
        return self.durations.estimate(request)

    def gpu_seconds(self, request: GenerationRequest) -> int | None:
        """What the page shows before the click: the duration, when calls are billed."""
        return self.duration(request) if self.billed else None

    def _on_gpu(self, request: GenerationRequest) -> GpuCall:
        if os.getpid() != self._main_pid:
            _single_cpu_thread()
        manager = self.engine.manager
        loads, merges, started = manager.loads, manager.merges, time.monotonic()
        result = self.engine.generate(request, _Unobserved())
        return GpuCall(
            result,
            manager.loads - loads,
            manager.merges - merges,
            time.monotonic() - started,
        )

    def generate(self, request: GenerationRequest, control: RunControl) -> GenerationResult:
        """Load and merge here (CPU, unpaid), then sample and decode under the GPU."""
        with self._lock:
            self.engine.prepare(request, control)
            with self.guard.armed():
                call = self._gpu_generate(request)
        self.inside.append((call.loads, call.merges))
        if call.loads or call.merges:
            log.warning(
                "ZeroGPU: the worker was forked before the last load or merge and redid "
                "it in GPU time (%d load(s), %d merge(s))",
                call.loads,
                call.merges,
            )
        self.durations.record(request, call.seconds)
        result: GenerationResult = call.result
        return result

    def _postprocess(self, request: ExtrasRequest) -> ExtrasResult:
        if os.getpid() != self._main_pid:
            _single_cpu_thread()
        return self.engine.postprocess(request, _Unobserved())

    def postprocess(self, request: ExtrasRequest, control: RunControl) -> ExtrasResult:
        with self._lock, self.guard.armed():
            return self._gpu_postprocess(request)

    def device(self) -> DeviceInfo:
        return self.engine.device()

    def load(self, name: str | None) -> ModelStatus:
        with self._lock:
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
    """The runner factory `build_service` takes on a ZeroGPU Space: durations calibrated
    per GPU name and kept in the cache folder."""
    from pipelines.engine import Engine

    engine = Engine(settings, folders)
    hardware = os.environ.get("SPACES_ZERO_GPU_SIZE") or engine.device().device
    path = settings.cache_dir / "zerogpu-durations.json"
    return ZeroGpuRunner(engine, durations=DurationModel(hardware=hardware, path=path))
