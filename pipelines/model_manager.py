"""The model manager: finds, loads, switches, caches and places checkpoints.

It owns the loaded pipelines (and their placement); nothing else loads or drops one. It is
driven by the job service's worker, so a switch never happens under a running job. A1111's
`sd_checkpoints_limit` (how many checkpoints stay loaded) and `sd_checkpoints_keep_in_cpu`
(the ones not in use wait in RAM, not on the GPU) are its settings.
"""

from __future__ import annotations

import gc
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers import DiffusionPipeline

from pipelines.architecture import Architecture
from pipelines.devices import DevicePlan, place_pipeline
from pipelines.errors import UnusableFileError
from pipelines.folders.checkpoints import CheckpointEntry
from pipelines.folders.registry import ModelFolders
from pipelines.interface import DEMO_MODEL_NAME, ModelStatus
from pipelines.loading import CONFIGS_DIR, LoadedModel, load_diffusers_folder, load_single_file
from pipelines.loading import random_pipeline as build_random_pipeline
from pipelines.lora.files import LoraFileCache
from pipelines.lora.stack import DEFAULT_BACKUP_BUDGET, AdapterStack
from pipelines.prompt import EncodedPrompt, PromptEncoder
from pipelines.safeload import load_state_dict
from pipelines.vae import VaeWeights

log = logging.getLogger(__name__)

DEMO_YAML = CONFIGS_DIR / "demo-tiny.yaml"
DEMO_SEED = 0
PROMPT_CACHE_SIZE = 32


@dataclass
class ActiveModel:
    """A loaded checkpoint with everything that belongs to it: its adapter stack, its
    prompt encoder and prompt cache, the scheduler config it was trained with, and which
    VAE weights its VAE holds."""

    pipe: DiffusionPipeline
    architecture: Architecture
    name: str  # infotext "Model:" value
    title: str  # listed title, or the demo name
    entry: CheckpointEntry | None
    notes: list[str]
    adapters: AdapterStack
    encoder: PromptEncoder
    scheduler_config: dict[str, Any]
    vae: VaeWeights
    empty_prompt: EncodedPrompt | None = None
    prompt_cache: OrderedDict[tuple[object, ...], EncodedPrompt] = field(
        default_factory=OrderedDict
    )

    @property
    def family(self) -> str:
        return self.architecture.family

    @property
    def key(self) -> str:
        return self.entry.key if self.entry is not None else DEMO_MODEL_NAME

    def status(self, loading: bool = False) -> ModelStatus:
        return ModelStatus(
            title=self.title,
            name=self.name,
            family=self.family,
            sha256=self.entry.sha256 if self.entry else None,
            is_demo=self.entry is None,
            loading=loading,
            notes=tuple(self.notes),
            text_widths=self.encoder.widths,
        )


class ModelManager:
    """Loads what a job names and keeps up to `limit` checkpoints loaded.

    Not thread-safe by design: only the job worker calls `get`; `current` and `loading`
    may be read from any thread.

    Args:
        folders: the model folders (checkpoints are resolved and learnt about there).
        plan: device placement.
        cache_dir: where config-only diffusers folders are cached.
        lora_cache: the parsed-LoRA cache every adapter stack shares.
        limit: A1111's `sd_checkpoints_limit`.
        keep_in_cpu: A1111's `sd_checkpoints_keep_in_cpu`.
        backup_budget: bytes of idle LoRA backups each adapter stack may keep.
    """

    def __init__(
        self,
        folders: ModelFolders,
        plan: DevicePlan,
        cache_dir: Any,
        lora_cache: LoraFileCache,
        *,
        limit: int = 1,
        keep_in_cpu: bool = True,
        backup_budget: int = DEFAULT_BACKUP_BUDGET,
    ) -> None:
        self.folders = folders
        self.plan = plan
        self.cache_dir = cache_dir
        self.lora_cache = lora_cache
        self.limit = max(1, limit)
        self.keep_in_cpu = keep_in_cpu
        self.backup_budget = backup_budget
        self._loaded: OrderedDict[tuple[str, int], ActiveModel] = OrderedDict()
        self._current: ActiveModel | None = None
        self.loading: str | None = None
        self.switches = 0  # times the current model changed (loads and reactivations)
        self.loads = 0  # checkpoint files read (and demo models built): ZeroGPU's stats
        self._evicted_merges = 0  # merges made in models no longer loaded

    @property
    def current(self) -> ActiveModel | None:
        return self._current

    @property
    def merges(self) -> int:
        """Stack changes merged into any model's weights so far, evicted ones included (see
        `AdapterStack.merges`)."""
        return self._evicted_merges + sum(model.adapters.merges for model in self._loaded.values())

    def make_room(self, count: int) -> None:
        """Keep at least `count` checkpoints loaded from now on (ZeroGPU: every checkpoint
        one request uses, so that its GPU call only reactivates them). Each one kept costs
        its weights in memory."""
        if count > self.limit:
            log.info("keeping up to %d checkpoints loaded (was %d)", count, self.limit)
            self.limit = count

    def get(self, name: str | None) -> ActiveModel:
        """The model `name` resolves to, loaded and placed (None: the current one, else
        the first usable listed one, else the demo model)."""
        if name is None:
            if self._current is not None:
                return self._current
            usable = [e for e in self.folders.entries("checkpoint") if not e.error]
            if not usable:
                return self._activate(("demo", 0), self._load_demo)
            entry = usable[0]
        else:
            entry = self.folders.resolve("checkpoint", name)
        if entry.error:
            raise UnusableFileError(f"{entry.relpath}: {entry.error}", field="checkpoint")
        return self._activate((str(entry.path), entry.mtime_ns), lambda: self._load(entry))

    def reactivate(self, model: ActiveModel) -> ActiveModel:
        """Make `model` current again without reading its file, even if it was evicted
        meanwhile (a hires fix on another checkpoint, or a refiner, goes back and forth
        between two)."""
        key = (str(model.entry.path), model.entry.mtime_ns) if model.entry else ("demo", 0)
        return self._activate(key, lambda: model)

    def use_pipeline(self, loaded: LoadedModel, name: str) -> ActiveModel:
        """Install an already built pipeline (benchmarks, embedding in other programs)."""
        return self._activate(("pipeline", id(loaded.pipe)), lambda: self._wrap(loaded, name))

    def restore_base(self) -> None:
        """Every loaded model's weights back to base (stateless callers, e.g. ZeroGPU)."""
        for model in self._loaded.values():
            model.adapters.restore()

    # -- steps

    def _activate(self, key: tuple[str, int], load: Callable[[], ActiveModel]) -> ActiveModel:
        cached = self._loaded.get(key)
        if cached is not None:
            self._loaded.move_to_end(key)
            if cached is not self._current:
                self._park(self._current)
                place_pipeline(cached.pipe, self.plan)
                self._current = cached
                self.switches += 1
            return cached
        while len(self._loaded) >= self.limit:  # make room before loading the next one
            _, evicted = self._loaded.popitem(last=False)
            if evicted is self._current:
                self._current = None
            self._evicted_merges += evicted.adapters.merges
            del evicted
            self.free_memory()
        previous = self._current
        self._park(previous)
        try:
            model = load()
        except BaseException:
            if previous is not None:  # the old model serves on when the new one fails
                place_pipeline(previous.pipe, self.plan)
            raise
        self._evicted_merges -= model.adapters.merges  # a reactivated model counts once
        place_pipeline(model.pipe, self.plan)
        model.pipe.set_progress_bar_config(disable=True)
        # A1111's cond_stage_model_empty_prompt: "" encoded before any LoRA, for padding.
        model.empty_prompt = model.encoder.encode(
            "", device=self.plan.device, dtype=self.plan.dtype
        )
        self._loaded[key] = model
        self._current = model
        self.switches += 1
        return model

    def _park(self, model: ActiveModel | None) -> None:
        """A model going out of use waits in RAM when the settings say so."""
        if model is not None and self.keep_in_cpu and self.plan.device.type != "cpu":
            model.pipe.to("cpu")
            self.free_memory()

    def _load(self, entry: CheckpointEntry) -> ActiveModel:
        self.loading = entry.title
        if entry.kind == "single" and entry.sha256 is None:
            self.folders.hash_soon("checkpoint", entry)  # beside the load, not in its way
        started = time.monotonic()
        try:
            if entry.kind == "diffusers":
                loaded: LoadedModel = load_diffusers_folder(entry.path)
            else:
                state = load_state_dict(entry.path)
                loaded = load_single_file(entry.path, state, self.cache_dir)
                del state
        except FileNotFoundError as error:
            raise UnusableFileError(
                f"{entry.relpath}: the file disappeared since the last scan; refresh the list",
                field="checkpoint",
            ) from error
        except UnusableFileError as error:
            # Remembered (until the file changes), so listings grey it out.
            self.folders.learn("checkpoint", entry, error=error.message)
            raise
        finally:
            self.loading = None
        self.loads += 1
        entry = self.folders.learn("checkpoint", entry, architecture=loaded.architecture)
        log.info(
            "loaded %s (%s) in %.1fs",
            entry.relpath,
            loaded.architecture.value,
            time.monotonic() - started,
        )
        return self._wrap(loaded, entry.infotext_name, entry)

    def _load_demo(self) -> ActiveModel:
        loaded = build_random_pipeline(DEMO_YAML, DEMO_SEED, self.cache_dir)
        self.loads += 1
        log.warning(
            "No checkpoint found: running the built-in tiny demo model, which has random "
            "weights, so its images are noise. Put a Stable Diffusion checkpoint into a models "
            "folder and refresh."
        )
        loaded.notes = ["built-in demo model with random weights: images are noise"]
        return self._wrap(loaded, DEMO_MODEL_NAME)

    def _wrap(
        self, loaded: LoadedModel, name: str, entry: CheckpointEntry | None = None
    ) -> ActiveModel:
        pipe = loaded.pipe
        tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t]
        encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e]
        sdxl = loaded.architecture.family == "SDXL"
        return ActiveModel(
            pipe=pipe,
            architecture=loaded.architecture,
            name=name,
            title=entry.title if entry is not None else name,
            entry=entry,
            notes=list(loaded.notes),
            adapters=AdapterStack(
                pipe,
                loaded.architecture,
                self.lora_cache,
                backup_budget=self.backup_budget,
            ),
            encoder=PromptEncoder(tokenizers, encoders, sdxl=sdxl),
            scheduler_config=dict(pipe.scheduler.config),
            vae=VaeWeights(
                pipe.vae, lambda vae, reason: self.folders.learn("vae", vae, error=reason)
            ),
        )

    def refresh_entry(self, model: ActiveModel) -> ActiveModel:
        """Pick up facts the registry learnt since loading (the background hash)."""
        if model.entry is None:
            return model
        for entry in self.folders.entries("checkpoint"):
            if entry.path == model.entry.path and entry.mtime_ns == model.entry.mtime_ns:
                if entry.sha256 != model.entry.sha256:
                    model.entry = replace(model.entry, sha256=entry.sha256)
                    model.title = model.entry.title
                break
        return model

    @staticmethod
    def free_memory() -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
