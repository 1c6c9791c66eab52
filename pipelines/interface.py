"""The one typed service interface every front end uses, and the plain data that crosses it.

The page, the A1111 API and the CLI are typed against `GenerationService` and touch nothing
else of the core; the local engine, the Ray client and the ZeroGPU path are implementations
of it. Only plain, picklable data types of `pipelines` cross it: requests, results, entries,
snapshots (no registry, model, pipeline or torch object), so a service can live in another
process or on another machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from PIL import Image

from pipelines.controlnet.preprocessors import Preprocessor
from pipelines.embeddings import EmbeddingListing
from pipelines.folders.checkpoints import CheckpointEntry
from pipelines.folders.controlnets import ControlNetEntry
from pipelines.folders.loras import LoraEntry
from pipelines.folders.upscalers import UpscalerEntry
from pipelines.folders.vaes import VaeEntry
from pipelines.gallery import GalleryIndex
from pipelines.lora.coverage import LoraCoverage
from pipelines.output import SaveOptions
from pipelines.schema import Bounds, GenerationRequest, GenerationResult
from pipelines.styles import PromptStyle, StyleSheet

if TYPE_CHECKING:
    from pipelines.extras import ExtrasRequest, ExtrasResult

DEMO_MODEL_NAME = "lorastack-demo-tiny"
"""The built-in demo model's title (used when no checkpoint is listed)."""
LOCAL_USER = "local"
"""The user key of a caller with no identity (the CLI, tests, the operator)."""


@dataclass(frozen=True)
class DeviceInfo:
    """Where generation runs, with the reason for each choice, as words and values."""

    device: str  # "cpu", "cuda", "cuda:1", "mps"
    dtype: str  # "float16", "float32", ...
    attention: str  # "sdpa" or "xformers"
    attention_reason: str
    memory_mode: str  # "full", "medvram" or "lowvram"
    threads: int

    def describe(self) -> str:
        return (
            f"{self.device} {self.dtype}, attention {self.attention} "
            f"({self.attention_reason}), memory {self.memory_mode}"
        )


@dataclass(frozen=True)
class PasteOptions:
    """A1111's `send_seed` and `send_size`: whether "Send to img2img/inpaint" from a
    result gallery carries the seed and the size along with the image's other fields."""

    send_seed: bool = True
    send_size: bool = True


@dataclass(frozen=True)
class ModelStatus:
    """The checkpoint requests without one use, as clients see it.

    `title` is the listed title (or the demo model's name); `loading` says it is being
    loaded now (A1111 reports the one loading).
    """

    title: str
    name: str  # infotext "Model:"
    family: str | None
    sha256: str | None = None
    is_demo: bool = False
    loading: bool = False
    notes: tuple[str, ...] = ()
    text_widths: tuple[int, ...] = field(default=(), compare=False)  # known once loaded

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None


JOB_STATES = ("queued", "running", "done", "failed", "cancelled")


@dataclass(frozen=True)
class ProgressSnapshot:
    """One job's progress at one moment (or an idle snapshot when no job is given/known).

    `fraction` and `eta_seconds` cover the whole job (all batches); `queue_position` is 0
    for the running job, 1 for the next one, and None when the job is not waiting or
    running; `estimated_wait` is the seconds until it starts, when the service can tell.
    """

    job_id: str = ""
    kind: str = ""
    state: str = "done"
    job_no: int = 0
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    fraction: float = 0.0
    eta_seconds: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    queue_position: int | None = None
    estimated_wait: float | None = None
    started: float = 0.0  # time.time() when it started running; 0 while queued
    preview: tuple[Image.Image, ...] = field(default_factory=tuple)
    finished: Any = None  # a batch of the batch count just done (its GenerationResult)

    @property
    def active(self) -> bool:
        return self.state == "running"


@dataclass(frozen=True)
class JobInfo:
    """A job in the queue (or finished), for "my jobs" listings and queue displays."""

    job_id: str
    kind: str
    state: str
    user: str
    label: str
    queue_position: int | None
    estimated_wait: float | None
    submitted: float  # time.time()


ProgressCallback = Callable[[ProgressSnapshot], None]


class GenerationService(Protocol):
    """What a front end may ask of lorastack.

    Example:
        >>> service = build_service(settings)  # doctest: +SKIP
        >>> job = service.submit(GenerationRequest(prompt="a cat", steps=4))  # doctest: +SKIP
        >>> service.result(job).seeds  # doctest: +SKIP
        [2871344]
    """

    # -- the device and the limits requests are checked against

    def device(self) -> DeviceInfo: ...

    def bounds(self) -> Bounds: ...

    def gpu_seconds(self, request: GenerationRequest) -> int | None:
        """Seconds of GPU time the request would ask for on ZeroGPU (shown before the
        click); None where generation is not billed per call."""
        ...

    def memory(self) -> dict[str, Any]:
        """RAM and device memory in A1111's `memory` shape."""
        ...

    # -- generation: one queue for every front end, in arrival order

    def submit(
        self,
        request: GenerationRequest,
        *,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
    ) -> str:
        """Validate `request` and queue it; returns the job id. Raises LorastackError
        subclasses for bad requests, unknown names and refusals (queue full)."""
        ...

    def result(self, job_id: str, timeout: float | None = None) -> GenerationResult:
        """Wait for a job and return its result (or raise its error)."""
        ...

    def generate(
        self,
        request: GenerationRequest,
        *,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
    ) -> GenerationResult:
        """`submit` then `result`."""
        ...

    def submit_series(
        self,
        requests: Sequence[GenerationRequest],
        *,
        label: str,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
    ) -> str:
        """Validate every request, then queue them as one job that runs them in order
        (a script's requests: X/Y/Z cells, prompts from a file); returns the job id."""
        ...

    def series_result(self, job_id: str, timeout: float | None = None) -> list[GenerationResult]:
        """Wait for a series job: one result per request run (fewer when interrupted)."""
        ...

    def series(
        self,
        requests: Sequence[GenerationRequest],
        *,
        label: str,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
    ) -> list[GenerationResult]:
        """`submit_series` then `series_result`."""
        ...

    def submit_extras(
        self,
        request: ExtrasRequest,
        *,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
    ) -> str:
        """Check an Extras (upscaling) run (sizes, upscaler names) and queue it; returns the
        job id. It is a job like a generation (progress, place in the queue, interrupt)."""
        ...

    def extras_result(self, job_id: str, timeout: float | None = None) -> ExtrasResult:
        """Wait for an Extras job and return its result (or raise its error)."""
        ...

    def postprocess(
        self,
        request: ExtrasRequest,
        *,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
    ) -> ExtrasResult:
        """`submit_extras` then `extras_result`."""
        ...

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop a job after its current step (None: the running job); a queued job is
        removed. True when there was such a job."""
        ...

    def skip(self, job_id: str | None = None) -> bool:
        """End the current batch of a running job early and go on with the next."""
        ...

    def progress(self, job_id: str | None = None, *, preview: bool = False) -> ProgressSnapshot:
        """A job's progress (None: the running job, else the last one that ran)."""
        ...

    def jobs(self, user: str | None = None) -> list[JobInfo]:
        """Queued and running jobs (of `user`, or everyone's), in queue order."""
        ...

    # -- models

    def checkpoints(self) -> list[CheckpointEntry]: ...

    def loras(self) -> list[LoraEntry]: ...

    def upscalers(self) -> list[UpscalerEntry]:
        """Model upscaler files, usable or not (unusable ones carry the reason)."""
        ...

    def upscaler_names(self) -> list[str]:
        """A1111's upscaler list: None, Lanczos, Nearest, then the usable files by name."""
        ...

    def vaes(self) -> list[VaeEntry]:
        """VAE files, usable or not (unusable ones carry the reason)."""
        ...

    def controlnet_models(self) -> list[ControlNetEntry]:
        """ControlNet models, usable or not (unusable ones carry the reason)."""
        ...

    def controlnet_modules(self) -> list[Preprocessor]:
        """The preprocessors a ControlNet unit can use, in sd-webui-controlnet's order."""
        ...

    def controlnet_unavailable_modules(self) -> list[tuple[str, str]]:
        """(name, reason) of each preprocessor with weights that cannot run here."""
        ...

    def detect_controlnet(
        self,
        module: str,
        images: Sequence[Image.Image],
        resolution: int = -1,
        threshold_a: float = -1,
        threshold_b: float = -1,
    ) -> list[Image.Image]:
        """A preprocessor's map of each image (4xx for an unknown or unavailable module)."""
        ...

    @property
    def preview_method(self) -> str:
        """How live previews are made: "Approx cheap", "TAESD" or "Full"."""
        ...

    def set_preview_method(self, method: str) -> None:
        """A1111's `show_progress_type` (4xx for another value)."""
        ...

    @property
    def paste_options(self) -> PasteOptions:
        """A1111's `send_seed` / `send_size` for the page's Send buttons."""
        ...

    def set_paste_options(self, options: PasteOptions) -> None: ...

    @property
    def save_options(self) -> SaveOptions:
        """How images are saved: A1111's format and file-name pattern."""
        ...

    def set_save_options(self, options: SaveOptions) -> SaveOptions:
        """Check, keep and store them (4xx naming the option when one is bad)."""
        ...

    def gallery(self) -> GalleryIndex:
        """The outputs folders' images (listing, filters, thumbnails, trash)."""
        ...

    def embeddings(self, checkpoint: str | None = None) -> EmbeddingListing:
        """The current checkpoint's usable textual-inversion embeddings, and the skipped
        ones with the reason (A1111's `/embeddings`); with `checkpoint`, that one's."""
        ...

    def check_vae(self, name: str) -> str:
        """`name` when it is `Automatic`, `None` or a usable listed VAE; else 4xx."""
        ...

    def resolve_checkpoint(self, name: str) -> CheckpointEntry: ...

    def resolve_lora(self, name: str) -> LoraEntry: ...

    def token_count(
        self, prompt: str, steps: int = 20, *, negative: bool = False, checkpoint: str | None = None
    ) -> tuple[int, int]:
        """A1111's prompt token counter: (tokens, 75 x chunks)."""
        ...

    def lora_coverage(self, name: str, checkpoint: str | None = None) -> LoraCoverage | str:
        """LoRA `name`'s modules matched against the loaded checkpoint, by region, before
        generating; or a sentence saying why there is no report yet."""
        ...

    def current_model(self) -> ModelStatus | None:
        """The checkpoint requests without one use (None before anything was chosen)."""
        ...

    def select_checkpoint(self, name: str | None, *, user: str = LOCAL_USER) -> ModelStatus:
        """Make `name` the default checkpoint, loading it (through the queue); None: the
        operator's start-up choice, else the first usable one, else the demo model."""
        ...

    def rescan(self) -> None:
        """Rescan every model folder (hashing runs in the background)."""
        ...

    # -- prompt styles (`styles.csv` in the data dir, A1111's format)

    def styles(self) -> StyleSheet:
        """The styles as the file holds them now, with the rows that could not be read
        (line numbers and reasons)."""
        ...

    def save_style(self, style: PromptStyle) -> StyleSheet:
        """Add `style` or replace the one of that name; the file is saved atomically.
        Front ends decide who may (an admin action on a shared server)."""
        ...

    def delete_style(self, name: str) -> StyleSheet:
        """Remove a style (NotFoundError when there is none of that name)."""
        ...
