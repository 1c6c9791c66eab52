"""`Service`: the GenerationService every front end talks to, over any runner.

It lists and resolves model files (the folders registry), checks requests before any heavy
work, queues them in one job service, and hands each job to a runner: the local `Engine`,
the Ray client (`deployments.ray`) or the ZeroGPU wrapper (`deployments.zerogpu`). So the
three implementations share every rule here and differ only in where a job runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from PIL import Image

from pipelines.architecture import Architecture
from pipelines.controlnet.annotators import Annotators
from pipelines.controlnet.preprocessors import Preprocessor, detect_maps
from pipelines.controlnet.units import check_unit_names, listed_models
from pipelines.devices import CPU_MAX_PIXELS, GPU_MAX_PIXELS, memory_report
from pipelines.embeddings import FAMILY_TEXT_WIDTHS, EmbeddingListing, EmbeddingStore
from pipelines.errors import BusyError, InvalidRequestError, LorastackError, UnusableFileError
from pipelines.extras import EXTRAS_PIXEL_FACTOR, ExtrasRequest, ExtrasResult
from pipelines.folders.checkpoints import CheckpointEntry
from pipelines.folders.controlnets import ControlNetEntry
from pipelines.folders.hashing import HashCache
from pipelines.folders.loras import LoraEntry
from pipelines.folders.registry import ModelFolders, default_roots
from pipelines.folders.upscalers import UpscalerEntry
from pipelines.folders.vaes import VaeEntry
from pipelines.gallery import GalleryIndex
from pipelines.generation.batch import BatchKey, batch_key
from pipelines.generation.refiner import refuse_refiner_as_base
from pipelines.generation.run import RunControl, check_request
from pipelines.interface import (
    DEMO_MODEL_NAME,
    LOCAL_USER,
    DeviceInfo,
    JobInfo,
    ModelStatus,
    PasteOptions,
    ProgressCallback,
    ProgressSnapshot,
)
from pipelines.jobs import DEFAULT_MAX_QUEUED, Batchable, JobControl, JobService
from pipelines.limits import UserLimits
from pipelines.lora.coverage import LoraCoverage
from pipelines.output import SaveOptions, read_save_options, write_save_options
from pipelines.preview import check_preview_method
from pipelines.prompt import EmbeddingLookup, PromptTokenizer, prompt_token_count
from pipelines.schema import (
    LATENT_UPSCALE_MODES,
    Bounds,
    GenerationRequest,
    GenerationResult,
    HiresFix,
)
from pipelines.settings import Settings
from pipelines.styles import STYLES_FILE, PromptStyle, StyleSheet, StyleStore, apply_to_request
from pipelines.upscalers import Upscaling
from pipelines.vae import SPECIAL_CHOICES as SPECIAL_VAE_CHOICES

log = logging.getLogger(__name__)


class Runner(Protocol):
    """Where jobs run: the local engine, Ray replicas, a ZeroGPU worker."""

    workers: int

    def device(self) -> DeviceInfo: ...

    def generate(self, request: GenerationRequest, control: RunControl) -> GenerationResult: ...

    def postprocess(self, request: ExtrasRequest, control: RunControl) -> ExtrasResult: ...

    def load(self, name: str | None) -> ModelStatus: ...

    def loaded(self) -> ModelStatus | None: ...

    def rescanned(self) -> None: ...

    def lora_coverage(
        self, entries: Sequence[LoraEntry], checkpoint: str
    ) -> list[LoraCoverage] | None:
        """Each file's coverage against checkpoint key `checkpoint` when that is the loaded
        model (None: it is not, or the runner holds no single model)."""
        ...


class BatchRunner(Runner, Protocol):
    """A runner that can denoise compatible requests as one batch (`--batch-requests`)."""

    def generate_batch(
        self, requests: Sequence[GenerationRequest], controls: Sequence[RunControl]
    ) -> list[GenerationResult]:
        """One result per request; a control with a `finish(result)` method may get its
        result before the batch ends (an interrupted request's)."""
        ...


@dataclass(frozen=True)
class _Generate:
    request: GenerationRequest  # validated, seed chosen, checkpoint resolved
    asked_checkpoint: str | None  # as the client named it (echoed in the result)
    batch_key: BatchKey | None = None  # None: never shares a batch


@dataclass(frozen=True)
class _Series:
    items: tuple[_Generate, ...]  # run in order as one job


@dataclass(frozen=True)
class _Extras:
    request: ExtrasRequest  # validated, upscaler names checked


@dataclass(frozen=True)
class _Load:
    name: str | None
    title: str


class Service:
    """The GenerationService implementation (see `pipelines.interface`).

    Args:
        settings: launch settings (bounds, limits).
        folders: the model folders (listings and name checks never wait for a job).
        runner: where jobs run.
        limits: per-user limits (default: from the settings).
        max_queued: jobs queued or running at once for everybody.
    Example:
        >>> service = build_service(Settings())  # doctest: +SKIP
        >>> service.generate(GenerationRequest(prompt="a cat", steps=4)).images[0].size
        (512, 512)
    """

    def __init__(
        self,
        settings: Settings,
        folders: ModelFolders,
        runner: Runner,
        *,
        limits: UserLimits | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
    ) -> None:
        self.settings = settings
        self.folders = folders
        self.runner = runner
        self.startup_checkpoint: str | None = None  # the operator's --ckpt, once resolved
        self.style_store = StyleStore(settings.data_dir / STYLES_FILE)
        shared = getattr(runner, "annotators", None)  # the local engine's, on its device
        self.annotators = (
            shared if isinstance(shared, Annotators) else Annotators(folders.roots["controlnet"])
        )
        self._device = runner.device()
        default_pixels = CPU_MAX_PIXELS if self._device.device == "cpu" else GPU_MAX_PIXELS
        self._bounds = replace(settings.bounds, max_pixels=settings.max_pixels or default_pixels)
        limits = limits or UserLimits(settings.rate_limit, settings.queue_slots)
        batching = settings.batch_requests > 0 and callable(getattr(runner, "generate_batch", None))
        if settings.batch_requests > 0 and not batching:
            log.warning(
                "--batch-requests is ignored: %s runs each request on its own",
                type(runner).__name__,
            )
        self._jobs = JobService(
            self._execute,
            workers=runner.workers,
            limits=limits,
            max_queued=max_queued,
            execute_batch=self._execute_batch if batching else None,
            batch_window=settings.batch_requests / 1000 if batching else 0.0,
            batch_capacity=self._bounds.max_pixels,
        )
        self._lock = threading.Lock()
        self._count_tokenizer: PromptTokenizer | None = None  # made on first use
        self._selected: ModelStatus | None = None
        self._selected_key: str | None = None
        self._loading: str | None = None
        self._save_options = read_save_options(settings.data_dir)
        self._paste_options = PasteOptions()
        self._embedding_store = EmbeddingStore(folders)
        self._gallery = GalleryIndex(settings.outputs_dir, settings.cache_dir)

    # -- device and limits

    def device(self) -> DeviceInfo:
        return self._device

    def bounds(self) -> Bounds:
        return self._bounds

    def gpu_seconds(self, request: GenerationRequest) -> int | None:
        estimate = getattr(self.runner, "gpu_seconds", None)  # only the ZeroGPU runner has it
        return estimate(request) if callable(estimate) else None

    def memory(self) -> dict[str, Any]:
        return memory_report()

    # -- generation

    def submit(
        self,
        request: GenerationRequest,
        *,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
    ) -> str:
        """Validate everything a client can get wrong (422/404/400) before queueing."""
        work = self._prepare(request)
        checked = work.request
        batchable = None
        if work.batch_key is not None:
            batchable = Batchable(
                work.batch_key, checked.width * checked.height * checked.batch_size
            )
        return self._jobs.submit(
            work,
            kind=request.kind,
            user=user,
            label=request.prompt[:80],
            cost=_cost(checked),
            on_progress=on_progress,
            preview_every=preview_every,
            batchable=batchable,
        )

    def submit_series(
        self,
        requests: Sequence[GenerationRequest],
        *,
        label: str,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
    ) -> str:
        """Queue several requests as one job (an X/Y/Z plot's cells, prompts from a file):
        all are checked before any is queued; they run in order on one worker, so nothing
        else runs between them, and progress counts the batches of all of them."""
        if not requests:
            raise InvalidRequestError("the series holds no request", field="script_args")
        items = tuple(self._prepare(request) for request in requests)
        return self._jobs.submit(
            _Series(items),
            kind=requests[0].kind,
            user=user,
            label=label[:80],
            cost=sum(_cost(item.request) for item in items),
            on_progress=on_progress,
            preview_every=preview_every,
        )

    def series(
        self,
        requests: Sequence[GenerationRequest],
        *,
        label: str,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
    ) -> list[GenerationResult]:
        job = self.submit_series(
            requests, label=label, user=user, on_progress=on_progress, preview_every=preview_every
        )
        return self.series_result(job)

    def series_result(self, job_id: str, timeout: float | None = None) -> list[GenerationResult]:
        results: list[GenerationResult] = self._jobs.result(job_id, timeout)
        return results

    def _prepare(self, request: GenerationRequest) -> _Generate:
        """The checked request as a queue item: styles merged into the prompts (first, so
        the bounds hold for the styled prompts and every runner gets the same prompts),
        seed chosen, names resolved."""
        if request.styles:
            request = apply_to_request(request, self.style_store.resolve(request.styles))
        request = request.validated(self._bounds)
        inputs = check_request(request)
        for spec in inputs.stack:
            self.folders.resolve("lora", spec.name)
        if request.vae not in SPECIAL_VAE_CHOICES:
            request = replace(request, vae=self._vae_key(request.vae))
        upscaling = Upscaling(self.folders)
        if request.hires is not None and request.hires.upscaler not in LATENT_UPSCALE_MODES:
            upscaling.check(request.hires.upscaler, "hr_upscaler")
        if request.img2img is not None and request.img2img.sd_upscale is not None:
            upscaling.check(request.img2img.sd_upscale.upscaler, "script_args")
        with self._lock:
            loading = self._loading
        if loading is not None:
            raise BusyError(f"model {loading} is still loading", retry_after=10)
        checkpoint = self._checkpoint_key(request.checkpoint)
        base = self.resolve_checkpoint(checkpoint) if checkpoint is not None else None
        if request.img2img is None and base and base.architecture is Architecture.SDXL_REFINER:
            raise refuse_refiner_as_base()
        if request.controlnet:
            family = base.family if base is not None else "SD1"  # the demo model is SD1
            check_unit_names(request.controlnet, self.folders, family, self.annotators)
        if request.hires is not None and request.hires.checkpoint is not None:
            request = replace(request, hires=self._hires_checkpoint(request.hires, checkpoint))
        if request.refiner_checkpoint is not None:
            key = self._same_family_key(
                request.refiner_checkpoint, checkpoint, "refiner_checkpoint", "the checkpoint"
            )
            request = replace(request, refiner_checkpoint=key)
        checked = replace(request, seed=inputs.seed, checkpoint=checkpoint)
        key = batch_key(replace(inputs, request=checked))  # names resolved as the runner's
        return _Generate(checked, request.checkpoint, key)

    def result(self, job_id: str, timeout: float | None = None) -> GenerationResult:
        result: GenerationResult = self._jobs.result(job_id, timeout)
        return result

    def generate(
        self,
        request: GenerationRequest,
        *,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
    ) -> GenerationResult:
        job = self.submit(request, user=user, on_progress=on_progress, preview_every=preview_every)
        return self.result(job)

    def submit_extras(
        self,
        request: ExtrasRequest,
        *,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
    ) -> str:
        """Queue an Extras run after checking its fields, sizes and upscaler names."""
        request = request.validated(EXTRAS_PIXEL_FACTOR * self._bounds.max_pixels)
        upscaling = Upscaling(self.folders)
        upscaling.check(request.upscaler_1, "upscaler_1")
        if request.upscaler_2_visibility > 0:
            upscaling.check(request.upscaler_2, "upscaler_2")
        cost = sum(max(1, w * h) for w, h in map(request.output_size, request.images))
        return self._jobs.submit(
            _Extras(request),
            kind="extras",
            user=user,
            label=f"extras: {request.upscaler_1}",
            cost=cost / (1 << 20),
            on_progress=on_progress,
        )

    def postprocess(
        self,
        request: ExtrasRequest,
        *,
        user: str = LOCAL_USER,
        on_progress: ProgressCallback | None = None,
    ) -> ExtrasResult:
        return self.extras_result(self.submit_extras(request, user=user, on_progress=on_progress))

    def extras_result(self, job_id: str, timeout: float | None = None) -> ExtrasResult:
        result: ExtrasResult = self._jobs.result(job_id, timeout)
        return result

    def interrupt(self, job_id: str | None = None) -> bool:
        return self._jobs.interrupt(job_id)

    def skip(self, job_id: str | None = None) -> bool:
        return self._jobs.skip(job_id)

    def progress(self, job_id: str | None = None, *, preview: bool = False) -> ProgressSnapshot:
        return self._jobs.snapshot(job_id, preview=preview)

    def jobs(self, user: str | None = None) -> list[JobInfo]:
        return self._jobs.jobs(user)

    # -- models

    def checkpoints(self) -> list[CheckpointEntry]:
        return self.folders.entries("checkpoint")

    def loras(self) -> list[LoraEntry]:
        return self.folders.entries("lora")

    def upscalers(self) -> list[UpscalerEntry]:
        return self.folders.entries("upscaler")

    def upscaler_names(self) -> list[str]:
        return Upscaling(self.folders).names()

    def resolve_checkpoint(self, name: str) -> CheckpointEntry:
        entry: CheckpointEntry = self.folders.resolve("checkpoint", name)
        return entry

    def resolve_lora(self, name: str) -> LoraEntry:
        entry: LoraEntry = self.folders.resolve("lora", name)
        return entry

    def token_count(
        self, prompt: str, steps: int = 20, *, negative: bool = False, checkpoint: str | None = None
    ) -> tuple[int, int]:
        """A1111's `n/75` counter for a prompt box (`prompt_token_count`), with the
        embeddings usable on `checkpoint` counted as their vectors. Every SD text encoder
        reads the same CLIP vocabulary, so the bundled tokenizer counts for all of them."""
        with self._lock:
            if self._count_tokenizer is None:
                from transformers import CLIPTokenizer

                from pipelines.loading import CONFIGS_DIR

                self._count_tokenizer = PromptTokenizer(
                    CLIPTokenizer.from_pretrained(CONFIGS_DIR / "clip_l")
                )
            tokenizer = self._count_tokenizer
        listing = self.embeddings(checkpoint)
        vectors = {name: embedding.vectors for name, (_, embedding) in listing.loaded.items()}
        lookup = EmbeddingLookup(vectors, tokenizer.ids) if vectors else None
        return prompt_token_count(tokenizer, prompt, steps, negative=negative, embeddings=lookup)

    def lora_coverage(self, name: str, checkpoint: str | None = None) -> LoraCoverage | str:
        """The coverage report of LoRA `name` against the loaded checkpoint, or why there
        is none yet (the file is unusable; `checkpoint`, the page's choice, is not the
        loaded one; the runner holds no single model)."""
        entry = self.resolve_lora(name)
        if entry.error:
            return f"LoRA '{entry.name}' cannot be used: {entry.error}"
        if checkpoint == DEMO_MODEL_NAME:
            key = DEMO_MODEL_NAME
        else:
            key = self._checkpoint_key(checkpoint or None) or DEMO_MODEL_NAME
        reports = self.runner.lora_coverage([entry], key)
        if reports is None:
            wanted = checkpoint or "the checkpoint"
            return f"the report shows once {wanted} is loaded (it loads on Generate)"
        if not reports:
            return f"no report for LoRA '{entry.name}': its file could not be read"
        return reports[0]

    def current_model(self) -> ModelStatus | None:
        """The selected checkpoint; before any selection, the one a request without a
        checkpoint would use (the operator's, else the first usable, else the demo)."""
        with self._lock:
            if self._loading is not None:
                return ModelStatus(self._loading, self._loading, None, loading=True)
            selected, key = self._selected, self._selected_key
        if selected is not None and key is None:
            return selected  # the demo model
        key = key if selected is not None else self._checkpoint_key(None)
        if key is None:
            return ModelStatus(DEMO_MODEL_NAME, DEMO_MODEL_NAME, "SD1", is_demo=True)
        try:
            entry = self.resolve_checkpoint(key)  # the hash may have arrived since loading
        except LorastackError:  # the file went away since: report what was loaded
            return selected
        notes = selected.notes if selected is not None else ()
        return ModelStatus(
            entry.title, entry.infotext_name, entry.family, entry.sha256, notes=notes
        )

    def select_checkpoint(self, name: str | None, *, user: str = LOCAL_USER) -> ModelStatus:
        """Load `name` through the queue (after the jobs ahead of it) and make it the
        default; its errors (unknown, unusable) are raised here."""
        key = self._checkpoint_key(name)
        title = self.resolve_checkpoint(key).title if key else DEMO_MODEL_NAME
        job = self._jobs.submit(_Load(key, title), kind="load", user=user, label=title, cost=0)
        status: ModelStatus = self._jobs.result(job)
        return status

    def preload(self, name: str | None) -> str:
        """Start loading the start-up checkpoint in the background; returns the job id.
        Generations asking for the default model meanwhile get "still loading" (503)."""
        key = self._checkpoint_key(name)
        title = self.resolve_checkpoint(key).title if key else DEMO_MODEL_NAME
        with self._lock:
            self._loading = title
        try:
            return self._jobs.submit(_Load(key, title), kind="load", user=LOCAL_USER, cost=0)
        except BaseException:
            with self._lock:
                self._loading = None
            raise

    # -- prompt styles

    def styles(self) -> StyleSheet:
        return self.style_store.sheet()

    def save_style(self, style: PromptStyle) -> StyleSheet:
        return self.style_store.save(style)

    def delete_style(self, name: str) -> StyleSheet:
        return self.style_store.delete(name)

    def rescan(self) -> None:
        self.folders.scan()
        self.folders.start_hashing()
        self.runner.rescanned()

    # -- internals

    def _vae_key(self, name: str) -> str:
        """A request's VAE name as the listed key the runner loads (4xx when unknown)."""
        entry: VaeEntry = self.folders.resolve("vae", name)
        if entry.error:
            raise UnusableFileError(f"VAE '{entry.name}': {entry.error}", field="sd_vae")
        return entry.key

    def vaes(self) -> list[VaeEntry]:
        return self.folders.entries("vae")

    def controlnet_models(self) -> list[ControlNetEntry]:
        """The ControlNet folder's models, usable or not (`error` says why not)."""
        return listed_models(self.folders, self.annotators)

    def controlnet_modules(self) -> list[Preprocessor]:
        """The preprocessors units can use, in sd-webui-controlnet's order."""
        return self.annotators.modules()

    def controlnet_unavailable_modules(self) -> list[tuple[str, str]]:
        """(name, reason) of each preprocessor with weights that cannot run here."""
        return self.annotators.unavailable()

    def detect_controlnet(
        self,
        module: str,
        images: Sequence[Image.Image],
        resolution: int = -1,
        threshold_a: float = -1,
        threshold_b: float = -1,
    ) -> list[Image.Image]:
        """A preprocessor's maps (sd-webui-controlnet's `/controlnet/detect`), in the
        caller's thread; one with weights runs on the engine's device (the CPU for runners
        that hold no device here)."""
        found = self.annotators.find(module, "controlnet_module")
        return detect_maps(found, list(images), resolution, threshold_a, threshold_b)

    @property
    def preview_method(self) -> str:
        return self._jobs.preview_method

    @property
    def save_options(self) -> SaveOptions:
        return self._save_options

    @property
    def paste_options(self) -> PasteOptions:
        return self._paste_options

    def set_paste_options(self, options: PasteOptions) -> None:
        self._paste_options = options

    def set_save_options(self, options: SaveOptions) -> SaveOptions:
        """Check, keep and store A1111's saving options (format, file-name pattern)."""
        checked = options.checked()
        with self._lock:
            write_save_options(self.settings.data_dir, checked)
            self._save_options = checked
        return checked

    def set_preview_method(self, method: str) -> None:
        """A1111's `show_progress_type` for the jobs that sample from now on."""
        self._jobs.preview_method = check_preview_method(method)

    def gallery(self) -> GalleryIndex:
        return self._gallery

    def embeddings(self, checkpoint: str | None = None) -> EmbeddingListing:
        """The loaded checkpoint's embeddings (by its text encoders' widths); before one is
        loaded, by the selected one's family. With `checkpoint` (the page's choice), that
        one's: the loaded model's widths when it is of the same family, else the family's."""
        loaded = self.runner.loaded()
        widths = loaded.text_widths if loaded is not None else ()
        if checkpoint:
            try:
                family = self.resolve_checkpoint(checkpoint).family
            except LorastackError:  # the demo model, or a file gone since: as loaded
                family = None
            if family in FAMILY_TEXT_WIDTHS and (loaded is None or loaded.family != family):
                widths = FAMILY_TEXT_WIDTHS[family]
        if not widths:
            current = self.current_model()
            widths = FAMILY_TEXT_WIDTHS.get(current.family or "SD1", (768,)) if current else ()
        return self._embedding_store.listing(widths)

    def check_vae(self, name: str) -> str:
        """`name` if it is `Automatic`, `None` or a usable listed VAE (else 4xx)."""
        if name not in SPECIAL_VAE_CHOICES:
            self._vae_key(name)
        return name

    def _checkpoint_key(self, name: str | None) -> str | None:
        """A request's checkpoint as the key the runner loads: the named one, else the
        selected one, else the operator's start-up choice, else the first usable one;
        None means the built-in demo model (nothing usable is listed)."""
        if name is not None:
            return self.resolve_checkpoint(name).key
        with self._lock:
            if self._selected_key is not None or self._selected is not None:
                return self._selected_key
        if self.startup_checkpoint is not None:
            return self.resolve_checkpoint(self.startup_checkpoint).key
        usable = [e for e in self.checkpoints() if not e.error]
        return usable[0].key if usable else None

    def _hires_checkpoint(self, hires: HiresFix, checkpoint: str | None) -> HiresFix:
        """`hr_checkpoint_name` as a key (None when it is the first pass's checkpoint)."""
        assert hires.checkpoint is not None
        key = self._same_family_key(
            hires.checkpoint, checkpoint, "hr_checkpoint_name", "the first pass's checkpoint"
        )
        return replace(hires, checkpoint=key)

    def _same_family_key(
        self, name: str, checkpoint: str | None, field: str, role: str
    ) -> str | None:
        """A checkpoint a run switches to (hires fix's, a refiner) as a key; None when it is
        the request's own `checkpoint` (no switch, as A1111). Another family's latents would
        not fit, so that is refused before queueing, naming both families."""
        try:
            entry = self.resolve_checkpoint(name)
        except LorastackError as error:
            error.field = field
            raise
        if entry.key == checkpoint:
            return None
        if entry.error:
            raise UnusableFileError(f"{field}: {entry.relpath}: {entry.error}", field=field)
        first = self.resolve_checkpoint(checkpoint).family if checkpoint else "SD1"
        if entry.family != first:
            raise InvalidRequestError(
                f"{field}: {entry.title} is {entry.family or 'of unknown family'} but {role} "
                f"is {first}; use a checkpoint of the same family (the same latent space)",
                field=field,
            )
        return entry.key

    def _execute(self, work: object, control: JobControl) -> object:
        if isinstance(work, _Generate):
            return self._generate(work, control)
        if isinstance(work, _Series):
            return self._run_series(work, control)
        if isinstance(work, _Extras):
            return self.runner.postprocess(work.request, control)
        assert isinstance(work, _Load)
        with self._lock:
            self._loading = work.title
        try:
            status = self.runner.load(work.name)
            with self._lock:
                self._selected, self._selected_key = status, work.name
            return status
        finally:
            with self._lock:
                self._loading = None

    def _execute_batch(
        self, works: list[object], controls: list[JobControl]
    ) -> list[GenerationResult]:
        """Compatible generations (one batch key) as one batch on a `BatchRunner`."""
        items = [work for work in works if isinstance(work, _Generate)]
        assert len(items) == len(works)
        runner: BatchRunner = self.runner  # type: ignore[assignment]
        echoing = [
            _EchoingControl(control, item.asked_checkpoint)
            for control, item in zip(controls, items, strict=True)
        ]
        results = runner.generate_batch([item.request for item in items], echoing)
        for item, result in zip(items, results, strict=True):
            _echo_checkpoint(result, item.asked_checkpoint)
        return results

    def _generate(self, work: _Generate, control: RunControl) -> GenerationResult:
        result = self.runner.generate(work.request, control)
        _echo_checkpoint(result, work.asked_checkpoint)
        return result

    def _run_series(self, work: _Series, control: JobControl) -> list[GenerationResult]:
        """Each request in order; an interrupt ends the series with what is done (the
        interrupted request's finished images included)."""
        total = sum(item.request.n_iter for item in work.items)
        results: list[GenerationResult] = []
        offset = 0
        for item in work.items:
            if control.interrupted:
                break
            result = self._generate(item, _SeriesControl(control, offset, total))
            results.append(result)
            offset += item.request.n_iter
        return results


def _echo_checkpoint(result: GenerationResult, asked: str | None) -> None:
    """The result's request names the checkpoint as the client did (not the runner's key)."""
    result.request = replace(result.request, checkpoint=asked)


class _RelayedControl:
    """A JobControl seen through a wrapper: everything passes through unchanged (the
    wrappers below change one thing each)."""

    def __init__(self, control: JobControl) -> None:
        self._control = control

    @property
    def interrupted(self) -> bool:
        return self._control.interrupted

    @property
    def skipped(self) -> bool:
        return self._control.skipped

    @property
    def preview_every(self) -> int:
        return self._control.preview_every

    @property
    def preview_method(self) -> str:
        return self._control.preview_method

    def batch(self, job_no: int, job_count: int, steps: int) -> None:
        self._control.batch(job_no, job_count, steps)

    def step(self, step: int, preview: Callable[[], list[Image.Image]] | None = None) -> None:
        self._control.step(step, preview)

    def batch_finished(self, result: GenerationResult) -> None:
        self._control.batch_finished(result)


class _EchoingControl(_RelayedControl):
    """A batched job's control whose early result (an interrupted job's, handed over
    before the batch ends) names the checkpoint as the client did."""

    def __init__(self, control: JobControl, asked: str | None) -> None:
        super().__init__(control)
        self._asked = asked

    def finish(self, result: GenerationResult) -> None:
        _echo_checkpoint(result, self._asked)
        self._control.finish(result)


def _cost(request: GenerationRequest) -> float:
    """A request's share of a user's queue budget: megapixel-steps."""
    images = request.batch_size * request.n_iter
    return images * request.steps * request.width * request.height / (1 << 20)


class _SeriesControl(_RelayedControl):
    """One request of a series reporting as part of the whole: its batches are numbered
    after the earlier requests' ones, out of all the series' batches."""

    def __init__(self, control: JobControl, offset: int, total: int) -> None:
        super().__init__(control)
        self._offset, self._total = offset, total

    def batch(self, job_no: int, job_count: int, steps: int) -> None:
        self._control.batch(self._offset + job_no, self._total, steps)

    def batch_finished(self, result: GenerationResult) -> None:
        """A series (a script, the X/Y/Z plot) shows its images together at the end."""


RunnerFactory = Callable[[Settings, ModelFolders], Runner]


def build_folders(settings: Settings, hashes: HashCache | None = None) -> ModelFolders:
    """The model folders of `settings`, scanned, with hashing started in the background."""
    hashes = hashes or HashCache(settings.cache_dir / "hashes.json")
    folders = ModelFolders(
        default_roots(
            settings.models_dirs,
            settings.loras_dirs,
            settings.upscaler_dirs,
            settings.vae_dirs,
            settings.embeddings_dirs,
            settings.controlnet_dirs,
        ),
        hashes,
    )
    folders.scan()
    folders.start_hashing()
    return folders


def build_service(
    settings: Settings,
    runner: RunnerFactory | None = None,
    *,
    folders: ModelFolders | None = None,
    limits: UserLimits | None = None,
) -> Service:
    """The usual wiring: folders (scanned, hashing in the background), a runner (the local
    engine unless another factory is given), the service.

    Example:
        >>> service = build_service(parse_settings([]))  # doctest: +SKIP
    """
    from pipelines.engine import Engine

    folders = folders or build_folders(settings)
    made = runner(settings, folders) if runner is not None else Engine(settings, folders)
    return Service(settings, folders, made, limits=limits)
