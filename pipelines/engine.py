"""The local engine: runs jobs on this machine's device.

It composes the model manager (which checkpoint is loaded, and where), the adapter stacks
(which LoRAs are merged) and the generation run (what one job does). The job service calls
it from its single worker thread, so one pipeline never runs two jobs at once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from pipelines.compiled import compile_watch
from pipelines.controlnet.annotators import Annotators
from pipelines.controlnet.faceid import FaceModels
from pipelines.controlnet.models import ControlNetCache
from pipelines.devices import DevicePlan, plan_device
from pipelines.embeddings import EmbeddingStore
from pipelines.errors import DeviceOutOfMemoryError
from pipelines.extras import ExtrasRequest, ExtrasResult, postprocess_here
from pipelines.folders.loras import LoraEntry
from pipelines.folders.registry import ModelFolders
from pipelines.generation.batch import MergedTxt2Img
from pipelines.generation.hires import HiresRun
from pipelines.generation.img2img import Img2ImgRun
from pipelines.generation.refiner import RefinerSwitch
from pipelines.generation.run import RunControl, Txt2ImgRun
from pipelines.generation.sd_upscale import SdUpscaleRun
from pipelines.interface import DeviceInfo, ModelStatus
from pipelines.loading import LoadedModel
from pipelines.lora.coverage import LoraCoverage
from pipelines.lora.files import LoraFileCache
from pipelines.model_manager import ActiveModel, ModelManager
from pipelines.preview import PreviewDecoders
from pipelines.schema import GenerationRequest, GenerationResult
from pipelines.settings import Settings

log = logging.getLogger(__name__)

MEGABYTE = 1 << 20


class Engine:
    """Runs generation and load jobs in this process.

    Args:
        settings: the operator's settings (device, memory mode, cache folder, budgets).
        folders: the model folders (shared with the service that lists them).
        plan: device plan; decided from settings when omitted.
        faces: what loads IP-Adapter FaceID's face embedder (default: insightface).
    Example:
        >>> engine = Engine(settings, folders)  # doctest: +SKIP
        >>> engine.generate(GenerationRequest(prompt="a cat", steps=4, seed=1), control)
    """

    workers = 1

    def __init__(
        self,
        settings: Settings,
        folders: ModelFolders,
        *,
        plan: DevicePlan | None = None,
        faces: FaceModels | None = None,
    ) -> None:
        self.settings = settings
        self.folders = folders
        self.plan = plan or plan_device(
            settings.device,
            want_xformers=settings.xformers,
            medvram=settings.medvram,
            lowvram=settings.lowvram,
            no_half_vae=settings.no_half_vae,
            compile=settings.compile,
        )
        self.lora_cache = LoraFileCache(settings.lora_cache_mb * MEGABYTE)
        self.manager = ModelManager(
            folders,
            self.plan,
            settings.cache_dir,
            self.lora_cache,
            limit=settings.checkpoints_limit,
            keep_in_cpu=settings.checkpoints_keep_in_cpu,
            backup_budget=settings.lora_backup_mb * MEGABYTE,
        )
        self.previews = PreviewDecoders(settings.models_dirs)
        self.embeddings = EmbeddingStore(folders)
        self.controlnets = ControlNetCache()
        self.annotators = Annotators(folders.roots["controlnet"], self.plan.device, faces)
        log.info("device: %s", self.plan.describe())

    def device(self) -> DeviceInfo:
        plan = self.plan
        return DeviceInfo(
            device=str(plan.device),
            dtype=str(plan.dtype).removeprefix("torch."),
            attention=plan.attention,
            attention_reason=plan.attention_reason,
            memory_mode=plan.memory_mode,
            threads=torch.get_num_threads(),
        )

    def generate(
        self, request: GenerationRequest, control: RunControl, *, stateless: bool = False
    ) -> GenerationResult:
        """Run one request (already validated by the service) on the model it names.

        Args:
            request: `checkpoint` is a listed name, or None for the demo model.
            control: progress reporting and stop requests.
            stateless: put the weights back to the base model afterwards, so the call
                leaves no LoRA applied (ZeroGPU runs each call in a forked worker whose
                changes are lost, so every call must apply exactly its own stack).
        """
        try:
            with (
                self.out_of_memory(request, request.batch_size),
                compile_watch(self.plan.compile is not None),
            ):
                model = self.manager.refresh_entry(self.manager.get(request.checkpoint))
                return self.build_run(model, request, control)(request)
        finally:
            if stateless:
                self.manager.restore_base()

    def build_run(
        self, model: ActiveModel, request: GenerationRequest, control: RunControl
    ) -> Txt2ImgRun | SdUpscaleRun:
        """The run `request` asks for on `model`, wired to this engine's caches and model
        switch (a hires checkpoint, a refiner)."""
        run = self.run_for(request)(model, self.plan, self.folders, control)
        run.previews = self.previews
        run.embeddings = self.embeddings
        run.controlnets, run.annotators = self.controlnets, self.annotators
        if isinstance(run, HiresRun):
            run.switch_model = self.switch_model
        if request.refiner_checkpoint is not None and isinstance(run, Txt2ImgRun):
            run.refiner = RefinerSwitch(
                request.refiner_checkpoint, request.refiner_switch_at, self.switch_model
            )
        return run

    def prepare(self, request: GenerationRequest, control: RunControl) -> None:
        """Steps 1-2 of `generate` alone, for every checkpoint the request uses: load the
        hires fix's `hr_checkpoint_name` and the refiner with their stacks merged (and the
        hires checkpoint's VAE), then the request's own checkpoint with its stack and VAE,
        left current. A `generate` of the same request right after finds all of them
        loaded and merged: it only makes them current in turn, samples and decodes (no
        file read, no merge). ZeroGPU calls this in the main process (on the CPU, outside
        the paid GPU call); the model cache grows to hold every checkpoint of the request.
        """
        model = self.manager.refresh_entry(self.manager.get(request.checkpoint))
        run = self.build_run(model, request, control)
        inputs = run.check_inputs(request)
        others: list[str] = []
        if isinstance(run, HiresRun) and request.hires and request.hires.checkpoint:
            others.append(request.hires.checkpoint)
        if isinstance(run, Txt2ImgRun) and run.refiner and run.refiner.may_switch:
            others.append(run.refiner.checkpoint)
        if others and isinstance(run, Txt2ImgRun):
            keys = {self.folders.resolve("checkpoint", name).key for name in others}
            self.manager.make_room(len(keys | {model.key}))
            run.prepare_other_checkpoints(inputs)
            if run.model is not model:
                run.model = self.switch_model(model)
        run.apply_adapters(inputs)
        run.apply_vae(inputs)

    def fork_locks(self) -> list[Any]:
        """The locks a generation takes, for a host that forks a worker to generate in
        (ZeroGPU): none may be held by a background thread (hashing, a listing) at the fork,
        or the worker waits on it forever."""
        folders = self.folders
        return [
            folders._lock,
            folders.hashes._lock,
            self.lora_cache._lock,
            self.embeddings._lock,
            self.previews._lock,
        ]

    def generate_batch(
        self, requests: Sequence[GenerationRequest], controls: Sequence[RunControl]
    ) -> list[GenerationResult]:
        """Run compatible txt2img requests (one `generation.batch.batch_key`) as one
        denoising batch: one result per request, each with its own images, seeds and
        infotexts; each control sees its own request's progress and stop requests."""
        lead = requests[0]
        with (
            self.out_of_memory(lead, sum(request.batch_size for request in requests)),
            compile_watch(self.plan.compile is not None),
        ):
            model = self.manager.refresh_entry(self.manager.get(lead.checkpoint))
            runs = []
            for control in controls:
                run = Txt2ImgRun(model, self.plan, self.folders, control)
                run.previews = self.previews
                run.embeddings = self.embeddings
                runs.append(run)
            return MergedTxt2Img(runs)(list(requests))

    @contextmanager
    def out_of_memory(self, request: GenerationRequest, batch: int) -> Iterator[None]:
        """Device OOM -> memory freed and a 4xx-style error naming the size."""
        try:
            yield
        except torch.cuda.OutOfMemoryError as error:
            self.controlnets.clear()
            self.annotators.clear()
            self.manager.free_memory()
            raise DeviceOutOfMemoryError(
                f"out of device memory at {request.width}x{request.height} x"
                f"{batch}: use a smaller size or batch, or start with --medvram"
            ) from error

    def switch_model(self, target: str | ActiveModel) -> ActiveModel:
        """Make a checkpoint (by key) or an already loaded model current, for runs that
        use two (hires fix with `hr_checkpoint_name`, a refiner)."""
        if isinstance(target, ActiveModel):
            return self.manager.reactivate(target)
        return self.manager.refresh_entry(self.manager.get(target))

    @staticmethod
    def run_for(request: GenerationRequest) -> type[Txt2ImgRun] | type[SdUpscaleRun]:
        """The generation run a request asks for."""
        if request.img2img is not None:
            return SdUpscaleRun if request.img2img.sd_upscale is not None else Img2ImgRun
        return HiresRun if request.hires is not None else Txt2ImgRun

    def postprocess(self, request: ExtrasRequest, control: RunControl) -> ExtrasResult:
        """Extras (upscaling) on this engine's device, next to the loaded checkpoint."""
        return postprocess_here(request, self.folders, self.plan, control)

    def load(self, name: str | None) -> ModelStatus:
        """Load (or switch to) a checkpoint; None: the first usable one, else the demo."""
        return self.manager.refresh_entry(self.manager.get(name)).status()

    def loaded(self) -> ModelStatus | None:
        model = self.manager.current
        return None if model is None else self.manager.refresh_entry(model).status()

    def loading(self) -> str | None:
        return self.manager.loading

    def lora_coverage(
        self, entries: Sequence[LoraEntry], checkpoint: str
    ) -> list[LoraCoverage] | None:
        """How much of each LoRA file matches checkpoint `checkpoint` (a key), when it is
        the loaded model (None: it is not loaded)."""
        model = self.manager.current
        if model is None or model.key != checkpoint:
            return None
        return model.adapters.coverage([(entry, 1.0, 1.0) for entry in entries])

    def rescanned(self) -> None:
        """Nothing to tell: this engine reads the same folders object."""

    def use_pipeline(self, loaded: LoadedModel, name: str) -> ActiveModel:
        """Install an already built pipeline (benchmarks, embedding in other programs)."""
        return self.manager.use_pipeline(loaded, name)
