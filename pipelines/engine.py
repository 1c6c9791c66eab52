"""The Engine: owns the one pipeline, its lock, and everything applied to it.

Every front end (UI, A1111 API, CLI) builds a GenerationRequest and calls
`Engine.generate`. Generations on the pipeline are serialised by one lock that covers the
model switch, the LoRA stack, sampling and decoding: diffusers pipelines share scheduler
and adapter state, so two threads on one pipeline give wrong images.
"""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from pipelines import __version__
from pipelines.architecture import Architecture
from pipelines.devices import DevicePlan, place_pipeline, plan_device
from pipelines.errors import BusyError, DeviceOutOfMemoryError, UnusableFileError
from pipelines.infotext import format_infotext, format_lora_hashes
from pipelines.loading import CONFIGS_DIR, LoadedModel, load_diffusers_folder, load_single_file
from pipelines.loading import random_pipeline as build_random_pipeline
from pipelines.lora import LoraApplier
from pipelines.lora_registry import LoraLibrary
from pipelines.prompt import (
    EncodedPrompt,
    PromptEncoder,
    extract_lora_tags,
    format_lora_tag,
    pad_to_same_length,
    strip_comments,
)
from pipelines.registry import CheckpointEntry, CheckpointRegistry, HashCache, sha256_of_file
from pipelines.safeload import load_state_dict
from pipelines.samplers import SamplerChoice, make_scheduler, resolve_sampler
from pipelines.schema import SEED_MAX, Bounds, GenerationRequest, GenerationResult, LoraSpec
from pipelines.settings import Settings

log = logging.getLogger(__name__)

DEMO_MODEL_NAME = "lorastack-demo-tiny"
DEMO_YAML = CONFIGS_DIR / "demo-tiny.yaml"
DEMO_SEED = 0
GPU_MAX_PIXELS = 4 * 1024 * 1024
CPU_MAX_PIXELS = 1024 * 1024
PROMPT_CACHE_SIZE = 32


@dataclass
class Progress:
    """Live state of the running job, read by progress endpoints and the UI."""

    job: str = ""
    job_no: int = 0
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    started: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    latents: torch.Tensor | None = None
    active: bool = False

    @property
    def fraction(self) -> float:
        if not self.active or not self.job_count or not self.sampling_steps:
            return 0.0
        done = self.job_no * self.sampling_steps + self.sampling_step
        return min(1.0, done / (self.job_count * self.sampling_steps))

    @property
    def eta_seconds(self) -> float:
        fraction = self.fraction
        if fraction <= 0:
            return 0.0
        elapsed = time.monotonic() - self.started
        return elapsed / fraction - elapsed


@dataclass
class CurrentModel:
    """The loaded pipeline and its identity."""

    pipe: DiffusionPipeline
    architecture: Architecture
    name: str  # infotext "Model:" value
    title: str  # registry title, or the demo name
    entry: CheckpointEntry | None
    notes: list[str] = field(default_factory=list)
    prompt_encoder: PromptEncoder | None = None
    applier: LoraApplier | None = None
    empty_prompt: EncodedPrompt | None = None
    prompt_cache: OrderedDict[tuple[object, ...], EncodedPrompt] = field(
        default_factory=OrderedDict
    )

    @property
    def model_hash(self) -> str | None:
        return self.entry.short_hash if self.entry else None


StepCallback = Callable[[Progress], None]


class Engine:
    """One pipeline, one lock, one applied state.

    Args:
        settings: the operator's settings (device, threads, folders, bounds).
        checkpoints: the checkpoint registry (scanned by the caller or lazily here).
        loras: the LoRA library (scanned by the caller); one over settings' folders if omitted.
        plan: device plan; decided from settings when omitted.
    Example:
        >>> engine = Engine(settings, CheckpointRegistry(settings.models_dirs, HashCache(None)))
        >>> result = engine.generate(GenerationRequest(prompt="a cat", steps=4, seed=1))
    """

    def __init__(
        self,
        settings: Settings,
        checkpoints: CheckpointRegistry,
        loras: LoraLibrary | None = None,
        *,
        plan: DevicePlan | None = None,
    ) -> None:
        self.settings = settings
        self.checkpoints = checkpoints
        self.loras = loras if loras is not None else LoraLibrary(settings.loras_dirs)
        self.plan = plan or plan_device(
            settings.device,
            want_xformers=settings.xformers,
            medvram=settings.medvram,
            lowvram=settings.lowvram,
            no_half_vae=settings.no_half_vae,
        )
        default_pixels = GPU_MAX_PIXELS if self.plan.device.type == "cuda" else CPU_MAX_PIXELS
        self.bounds: Bounds = replace(
            settings.bounds, max_pixels=settings.max_pixels or default_pixels
        )
        torch.set_num_threads(settings.torch_threads)
        self._lock = threading.Lock()
        self._model: CurrentModel | None = None
        self._loading: str | None = None
        self.default_checkpoint: str | None = None  # loaded when nothing is loaded yet
        self._hashing = threading.Lock()
        self.progress = Progress()
        log.info("device: %s; torch threads: %d", self.plan.describe(), settings.torch_threads)

    # ---------------------------------------------------------------- models

    @property
    def model(self) -> CurrentModel | None:
        return self._model

    def current_title(self) -> str | None:
        """The selected checkpoint's title; while one loads, that one (as A1111 reports)."""
        if self._loading is not None:
            return self._loading
        return self._model.title if self._model else None

    def load_checkpoint(self, name: str | None) -> CurrentModel:
        """Switch to the named checkpoint (None: the demo model when nothing is listed, else
        the first listed one). Takes the generation lock, so it never swaps a model under a
        running job."""
        with self._lock:
            return self._switch(name)

    def use_pipeline(self, loaded: LoadedModel, name: str) -> CurrentModel:
        """Install an already built pipeline (benchmarks, embedding in other programs)."""
        with self._lock:
            self._unload()
            model = CurrentModel(
                loaded.pipe, loaded.architecture, name, name, None, list(loaded.notes)
            )
            return self._install(model)

    def _switch(self, name: str | None) -> CurrentModel:
        if name is None and self._model is None and self.default_checkpoint:
            name = self.default_checkpoint  # the operator's --ckpt, whoever asks first
        if name is None:
            usable = [e for e in self.checkpoints.entries() if not e.error]
            if self._model is not None:
                return self._model
            if not usable:
                return self._install(self._load_demo())
            entry = usable[0]
        else:
            entry = self.checkpoints.resolve(name)
        if self._model is not None and self._model.entry is not None:
            current = self._model.entry
            if current.path == entry.path and current.mtime_ns == entry.mtime_ns:
                return self._model
        if entry.error:
            raise UnusableFileError(f"{entry.relpath}: {entry.error}", field="checkpoint")
        self._loading = entry.title
        try:
            self._unload()
            return self._install(self._load_entry(entry))
        except UnusableFileError as error:
            # Remember why, so listings grey it out and the default choice skips it.
            self.checkpoints.refresh_entry(replace(entry, error=error.message))
            raise
        finally:
            self._loading = None

    def _load_demo(self) -> CurrentModel:
        loaded = build_random_pipeline(DEMO_YAML, DEMO_SEED, self.settings.cache_dir)
        log.warning(
            "No checkpoint found in %s: running the built-in tiny demo model, which has random "
            "weights, so its images are noise. Put a Stable Diffusion checkpoint into a models "
            "folder and refresh.",
            ", ".join(str(p) for p in self.settings.models_dirs),
        )
        notes = ["built-in demo model with random weights: images are noise"]
        return CurrentModel(
            loaded.pipe, loaded.architecture, DEMO_MODEL_NAME, DEMO_MODEL_NAME, None, notes
        )

    def _load_entry(self, entry: CheckpointEntry) -> CurrentModel:
        started = time.monotonic()
        try:
            if entry.kind == "diffusers":
                loaded: LoadedModel = load_diffusers_folder(entry.path)
            else:
                state = load_state_dict(entry.path)
                loaded = load_single_file(entry.path, state, self.settings.cache_dir)
                del state
        except FileNotFoundError as error:
            raise UnusableFileError(
                f"{entry.relpath}: the file disappeared since the last scan; refresh the list",
                field="checkpoint",
            ) from error
        if entry.kind == "single" and entry.sha256 is None:
            sha = self.checkpoints.hashes.compute(entry.path, "sha256", sha256_of_file)
            entry = replace(entry, sha256=sha)
        entry = replace(entry, architecture=loaded.architecture)
        self.checkpoints.refresh_entry(entry)
        log.info(
            "loaded %s (%s) in %.1fs",
            entry.relpath,
            loaded.architecture.value,
            time.monotonic() - started,
        )
        return CurrentModel(
            loaded.pipe,
            loaded.architecture,
            entry.infotext_name,
            entry.title,
            entry,
            loaded.notes,
        )

    def _install(self, model: CurrentModel) -> CurrentModel:
        place_pipeline(model.pipe, self.plan)
        model.pipe.set_progress_bar_config(disable=True)
        model.applier = LoraApplier(model.pipe, model.architecture, self.loras.cache)
        # A1111's cond_stage_model_empty_prompt: "" encoded before any LoRA, for padding.
        model.empty_prompt = self._prompt_encoder(model).encode(
            "", device=self.plan.device, dtype=self.plan.dtype
        )
        self._model = model
        return model

    def _unload(self) -> None:
        """Drop the current pipeline and give its memory back before loading the next."""
        if self._model is None:
            return
        self._model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------- control

    def interrupt(self) -> None:
        """Stop the running job after the current step; finished images are returned."""
        self.progress.interrupted = True

    def skip(self) -> None:
        """Finish the current batch early and go on with the next one (A1111 `skip`)."""
        self.progress.skipped = True

    def rescan(self) -> None:
        """Refresh both listings (the explicit refresh, and the folder watcher's)."""
        self.checkpoints.scan()
        self.loras.scan()
        # One hashing pass at a time: rescans come often (watcher, refresh), and two passes
        # would read the same multi-GB new file twice. A pass started later sees new files.
        if self._hashing.acquire(blocking=False):
            threading.Thread(target=self._hash_all, name="hash-files", daemon=True).start()

    def _hash_all(self) -> None:
        try:
            self.checkpoints.hash_all()
            self.loras.hash_all()
        finally:
            self._hashing.release()

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    # ---------------------------------------------------------------- generation

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        *,
        stateless: bool = False,
    ) -> GenerationResult:
        """Make the images `request` describes.

        Args:
            request: the request; validated here before any heavy work.
            on_step: called after every sampling step with the live Progress.
            stateless: put the weights back to the base model afterwards, so the call
                leaves no LoRA applied (ZeroGPU runs each call in a forked worker whose
                changes are lost, so every call must apply exactly its own stack).
        Returns:
            GenerationResult with one infotext per image and the seeds used.
        Raises:
            LorastackError subclasses for anything a client or a file can cause.
        """
        # 1. validate everything before touching the model
        request = request.validated(self.bounds)
        sampler = resolve_sampler(request.sampler_name, request.scheduler)
        # A1111: comments go first; tags are read from the prompt only (in the negative
        # prompt they are plain text).
        prompt, tag_loras = extract_lora_tags(strip_comments(request.prompt))
        negative = strip_comments(request.negative_prompt)
        stack, stack_notes = combine_stacks(request.loras, tag_loras)
        request = replace(request, loras=stack[: len(stack) - len(tag_loras)])
        if self._loading is not None:
            raise BusyError(f"model {self._loading} is still loading", retry_after=10)
        # 2. one job at a time on the pipeline
        with self._lock:
            try:
                result = self._generate_locked(request, sampler, prompt, negative, stack, on_step)
                result.notes[:0] = stack_notes
                return result
            except torch.cuda.OutOfMemoryError as error:
                self._recover_memory()
                raise DeviceOutOfMemoryError(
                    f"out of device memory at {request.width}x{request.height} x"
                    f"{request.batch_size}: use a smaller size or batch, or start with "
                    "--medvram"
                ) from error
            finally:
                if stateless:
                    self._restore_base()
                self.progress.active = False
                self.progress.latents = None

    def _restore_base(self) -> None:
        """Stateless mode: the current model's weights back to base, nothing applied."""
        if self._model is not None and self._model.applier is not None:
            self._model.applier.restore()

    def _recover_memory(self) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _generate_locked(
        self,
        request: GenerationRequest,
        sampler: SamplerChoice,
        prompt: str,
        negative: str,
        stack: tuple[LoraSpec, ...],
        on_step: StepCallback | None,
    ) -> GenerationResult:
        # 3. the model this request asked for
        model = self._switch(request.checkpoint)
        lora_notes, applied, text_state = self._apply_loras(model, stack)
        pipe = model.pipe
        pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)

        # 4. text conditioning, A1111 semantics (weights, BREAK, 75-token chunks); cached,
        # so a new seed or sampler never re-runs the text encoders
        positive = self._encode(model, prompt, request.clip_skip, False, text_state)
        negative_encoded = self._encode(model, negative, request.clip_skip, True, text_state)
        positive, negative_encoded = pad_to_same_length(
            positive, negative_encoded, empty=model.empty_prompt
        )

        # 5. seeds: -1 picks one; batch items use seed, seed+1, ... (A1111)
        base_seed = request.seed if request.seed != -1 else random.randint(0, SEED_MAX)
        progress = self.progress
        progress.__dict__.update(
            Progress(
                job="txt2img",
                job_count=request.n_iter,
                sampling_steps=request.steps,
                started=time.monotonic(),
                active=True,
            ).__dict__
        )
        images: list[Image.Image] = []
        seeds: list[int] = []
        for iteration in range(request.n_iter):
            if progress.interrupted:
                break
            progress.job_no = iteration
            progress.sampling_step = 0
            progress.skipped = False
            batch_seeds = [
                (base_seed + iteration * request.batch_size + i) % (SEED_MAX + 1)
                for i in range(request.batch_size)
            ]
            images.extend(
                self._sample(model, request, positive, negative_encoded, batch_seeds, on_step)
            )
            seeds.extend(batch_seeds)

        # 6. infotexts, one per image
        used_request = replace(request, seed=base_seed)
        infotexts = [self.infotext(used_request, model, sampler, seed, applied) for seed in seeds]
        return GenerationResult(
            images=images,
            seeds=seeds,
            infotexts=infotexts,
            request=used_request,
            model_name=model.name,
            model_hash=model.model_hash,
            interrupted=progress.interrupted,
            notes=[*model.notes, *lora_notes],
        )

    def _prompt_encoder(self, model: CurrentModel) -> PromptEncoder:
        """One encoder per loaded model (building one prepares its tokenizers)."""
        if model.prompt_encoder is None:
            model.prompt_encoder = self._new_prompt_encoder(model)
        return model.prompt_encoder

    def _new_prompt_encoder(self, model: CurrentModel) -> PromptEncoder:
        pipe = model.pipe
        sdxl = model.architecture.family == "SDXL"
        tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t]
        encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e]
        return PromptEncoder(tokenizers, encoders, sdxl=sdxl)

    def _sample(
        self,
        model: CurrentModel,
        request: GenerationRequest,
        positive: EncodedPrompt,
        negative: EncodedPrompt,
        seeds: list[int],
        on_step: StepCallback | None,
    ) -> list[Image.Image]:
        """One batch: initial noise from per-item CPU generators, so a seed means the same
        image on every device."""
        pipe = model.pipe
        progress = self.progress
        count = len(seeds)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

        def step_end(
            pipeline: DiffusionPipeline, step: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            progress.sampling_step = step + 1
            progress.latents = tensors.get("latents")
            if progress.interrupted or progress.skipped:
                pipeline._interrupt = True
            if on_step is not None:
                on_step(progress)
            return tensors

        kwargs: dict[str, Any] = {
            "prompt_embeds": positive.embeds.expand(count, -1, -1),
            "negative_prompt_embeds": negative.embeds.expand(count, -1, -1),
            "num_inference_steps": request.steps,
            "guidance_scale": request.cfg_scale,
            "width": request.width,
            "height": request.height,
            "generator": generators,
            "callback_on_step_end": step_end,
            "callback_on_step_end_tensor_inputs": ["latents"],
            "output_type": "pil",
        }
        if model.architecture.family == "SDXL":
            kwargs["pooled_prompt_embeds"] = positive.pooled.expand(count, -1)
            kwargs["negative_pooled_prompt_embeds"] = negative.pooled.expand(count, -1)
        if model.architecture.is_inpainting:
            # txt2img on an inpainting model: everything masked, the masked image blank
            # (A1111's txt2img image conditioning).
            kwargs["image"] = Image.new("RGB", (request.width, request.height), (127, 127, 127))
            kwargs["mask_image"] = Image.new("L", (request.width, request.height), 255)
            kwargs["strength"] = 1.0
        large = request.width * request.height > 1536 * 1536
        if large:
            pipe.vae.enable_tiling()
        try:
            output = pipe(**kwargs)
        finally:
            if large:
                pipe.vae.disable_tiling()
        return list(output.images)

    def _apply_loras(
        self, model: CurrentModel, stack: tuple[LoraSpec, ...]
    ) -> tuple[list[str], list[tuple[str, str | None]], tuple[object, ...]]:
        """Make the model's weights exactly base + this request's stack (an empty stack
        restores the base). Returns warnings, the (name, short hash) pairs applied, and
        what the text encoders now hold (the prompt cache's key)."""
        resolved = []
        for spec in stack:
            entry = self.loras.resolve(spec.name)
            if entry.error:
                raise UnusableFileError(f"LoRA '{entry.name}': {entry.error}", field="loras")
            resolved.append((entry, spec.weight, spec.text_encoder_weight))
        assert model.applier is not None
        warnings = model.applier.apply(resolved)
        applied = [(entry.name, entry.short_hash) for entry, u, t in resolved if u or t]
        text_state = tuple(
            (str(entry.path), entry.size, entry.mtime_ns, t)
            for entry, _, t in resolved
            if t and any(part.startswith("te") for part in entry.parts)
        )
        return warnings, applied, text_state

    def _encode(
        self,
        model: CurrentModel,
        text: str,
        clip_skip: int,
        negative: bool,
        text_state: tuple[object, ...],
    ) -> EncodedPrompt:
        """Text conditioning, from the model's small LRU cache when the same text was encoded
        with the same text-encoder weights before."""
        key = (text, clip_skip, negative, text_state)
        cache = model.prompt_cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        encoded = self._prompt_encoder(model).encode(
            text,
            clip_skip=clip_skip,
            device=self.plan.device,
            dtype=self.plan.dtype,
            negative=negative,
        )
        cache[key] = encoded
        while len(cache) > PROMPT_CACHE_SIZE:
            cache.popitem(last=False)
        return encoded

    def infotext(
        self,
        request: GenerationRequest,
        model: CurrentModel,
        sampler: SamplerChoice,
        seed: int,
        applied: list[tuple[str, str | None]],
    ) -> str:
        """A1111 `parameters` text for one image of `request`; UI-stack LoRAs are written
        into the prompt as tags so any A1111-compatible tool replays them."""
        params: dict[str, object] = {
            "Steps": request.steps,
            "Sampler": sampler.sampler,
            "Schedule type": sampler.label,
            "CFG scale": request.cfg_scale,
            "Seed": seed,
            "Size": f"{request.width}x{request.height}",
            "Model hash": model.model_hash,
            "Model": model.name,
            "Clip skip": request.clip_skip,
        }
        hashes = [(name, short) for name, short in applied if short]
        if hashes:
            params["Lora hashes"] = format_lora_hashes(hashes)
        params["Version"] = f"lorastack {__version__}"
        tags = " ".join(format_lora_tag(spec) for spec in request.loras)
        prompt = f"{request.prompt} {tags}" if request.prompt and tags else request.prompt or tags
        return format_infotext(prompt, request.negative_prompt, params)


def combine_stacks(
    ui_stack: tuple[LoraSpec, ...], tag_stack: list[LoraSpec]
) -> tuple[tuple[LoraSpec, ...], list[str]]:
    """The stack a request applies: UI/API rows, then prompt tags. A LoRA named both ways
    takes the tag's weights (the prompt is what gets written into the infotext and
    replayed), and the result says so instead of silently doubling it."""
    tagged = {spec.name.lower() for spec in tag_stack}
    notes = [
        f"LoRA '{spec.name}': the prompt tag's weight replaces the stack weight {spec.weight:g}"
        for spec in ui_stack
        if spec.name.lower() in tagged
    ]
    kept = tuple(spec for spec in ui_stack if spec.name.lower() not in tagged)
    return (*kept, *tag_stack), notes


def build_engine(settings: Settings) -> Engine:
    """The usual wiring: registry with the persistent hash cache, then the engine."""
    hashes = HashCache(settings.cache_dir / "hashes.json")
    checkpoints = CheckpointRegistry(settings.models_dirs, hashes)
    checkpoints.scan()
    loras = LoraLibrary(settings.loras_dirs, hashes)
    loras.scan()
    for job in (checkpoints.hash_all, loras.hash_all):
        threading.Thread(target=job, name=f"hash-{job.__qualname__}", daemon=True).start()
    return Engine(settings, checkpoints, loras)
