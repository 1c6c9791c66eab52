"""A generation run as named steps, read like a diffusers `__call__`:

    check inputs -> apply adapters -> encode prompts -> (per batch) prepare latents ->
    denoise -> decode -> post-process

Each step is a method, so a new mode (img2img, inpainting, hires fix, a refiner switch,
ControlNet) is a subclass that replaces or extends steps and adds hooks to the denoising
loop, not an `if mode ==` in five places.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
from PIL import Image

from pipelines import __version__
from pipelines.architecture import Architecture
from pipelines.controlnet.annotators import Annotators
from pipelines.controlnet.models import ControlNetCache
from pipelines.controlnet.units import ControlUnits, MaskCrop
from pipelines.devices import DevicePlan
from pipelines.embeddings import EmbeddingStore
from pipelines.errors import UnusableFileError
from pipelines.folders.embeddings import EmbeddingEntry
from pipelines.folders.loras import LoraEntry
from pipelines.folders.registry import ModelFolders
from pipelines.folders.vaes import VaeEntry
from pipelines.generation.denoise import Conditioning as StepConditioning
from pipelines.generation.denoise import DenoiseLoop
from pipelines.generation.noise import SeedPlan, initial_noise
from pipelines.generation.refiner import RefinerSwitch, refuse_refiner_as_base
from pipelines.infotext import format_infotext, format_lora_hashes
from pipelines.lora.coverage import LoraCoverage
from pipelines.lora.weights import base_ratio, is_scheduled, weight_at
from pipelines.model_manager import PROMPT_CACHE_SIZE, ActiveModel
from pipelines.preview import CHEAP, PreviewDecoders, render_preview
from pipelines.prompt import (
    EmbeddingLookup,
    EncodedPrompt,
    combine_stacks,
    extract_lora_tags,
    format_lora_tag,
    pad_to_longest,
    strip_comments,
)
from pipelines.prompt_grammar import prompt_schedules, split_and, text_at
from pipelines.samplers import (
    SamplerChoice,
    check_steps,
    make_scheduler,
    resolve_sampler,
    set_timesteps,
    step_eta,
    uses_ensd,
)
from pipelines.schema import (
    SEED_MAX,
    GenerationRequest,
    GenerationResult,
    LoraSpec,
    check_lora_spec,
)
from pipelines.upscalers import Upscaling
from pipelines.vae import choose_vae, decode_checked

LARGE_DECODE_PIXELS = 1536 * 1536
"""Above this many pixels the VAE decodes in tiles, so large images fit in memory."""
REFINER_AESTHETIC_SCORES = (2.5, 6.0)
"""A1111's `sdxl_refiner_low_aesthetic_score` (negative prompt) and
`sdxl_refiner_high_aesthetic_score` (prompt): an SDXL refiner's extra time id."""


class RunControl(Protocol):
    """What a run reports to, and reads stop requests from (the job service's control)."""

    @property
    def interrupted(self) -> bool: ...

    @property
    def skipped(self) -> bool: ...

    def batch(self, job_no: int, job_count: int, steps: int) -> None: ...

    def step(self, step: int, preview: Callable[[], list[Image.Image]] | None = None) -> None: ...

    def batch_finished(self, result: GenerationResult) -> None:
        """A batch of a batch count is done (`result` holds its images, seeds and
        infotexts), so a front end can show and save it before the whole job ends."""
        ...


@dataclass
class RunInputs:
    """The request after step 1: checked, with prompt tags taken out and the stack built."""

    request: GenerationRequest  # `loras` = the UI/API rows (tags stay in the prompt text)
    sampler: SamplerChoice
    prompt: str  # without comments and LoRA tags
    negative_prompt: str
    stack: tuple[LoraSpec, ...]  # rows, then prompt tags
    seed: int
    subseed: int
    notes: list[str] = field(default_factory=list)


@dataclass
class Adapters:
    """What step 2 applied: names and short hashes for the infotext, and what the text
    encoders now hold (part of the prompt cache's key).

    `specs` is the applied stack (positions as in the model's adapter stack) and
    `text_keys` each LoRA's identity and text-encoder block factor (None: it has no text
    encoder layers), so a per-step schedule can say what each step needs."""

    applied: list[tuple[str, str | None]]
    text_state: tuple[object, ...]
    notes: list[str]
    coverage: list[LoraCoverage] = field(default_factory=list)
    specs: tuple[LoraSpec, ...] = ()
    text_keys: tuple[tuple[str, int, int, float] | None, ...] = ()

    @property
    def scheduled(self) -> bool:
        """Whether some weight changes between steps (then the loop re-merges)."""
        return any(spec.scheduled for spec in self.specs)

    @property
    def text_scheduled(self) -> bool:
        """Whether some text-encoder weight changes between steps (then each step's text
        encoder state may need its own encoding)."""
        return any(
            is_scheduled(spec.text_encoder_weight) and key is not None
            for spec, key in zip(self.specs, self.text_keys, strict=True)
        )

    def weights_at(self, step: int, steps: int) -> dict[int, tuple[float, float]]:
        """(unet, text encoder) multipliers of the scheduled LoRAs at `step` of `steps`."""
        return {
            index: (
                weight_at(spec.weight, step, steps),
                weight_at(spec.text_encoder_weight, step, steps),
            )
            for index, spec in enumerate(self.specs)
            if spec.scheduled
        }

    def text_state_at(self, step: int, steps: int) -> tuple[object, ...]:
        """What the text encoders hold at `step`: each LoRA's file and effective weight."""
        state: list[object] = []
        for spec, key in zip(self.specs, self.text_keys, strict=True):
            if key is None:
                continue
            *identity, base = key
            weight = weight_at(spec.text_encoder_weight, step, steps) * base
            if weight:
                state.append((*identity, weight))
        return tuple(state)


Schedule = list[tuple[int, str]]
"""A1111's prompt schedule: (last step, text) pairs; see `prompt_grammar`."""


@dataclass
class Conditioning:
    """Step 3's result: every text the prompts can switch to, encoded once and padded to
    one length; the schedule and weight of each `AND` part; the negative's schedule."""

    parts: list[tuple[Schedule, float]]
    negative: Schedule
    encoded: dict[tuple[str, bool], EncodedPrompt]
    hires_steps: int | None = None  # the schedules are a hires pass's
    adapters: Adapters | None = None  # the stack it was encoded with (per-step schedules)
    by_state: dict[tuple[object, ...], dict[tuple[str, bool], EncodedPrompt]] = field(
        default_factory=dict
    )
    """Texts encoded with other text-encoder weights (scheduled `te=`), by text state."""

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(weight for _, weight in self.parts)

    def at(
        self, step: int, encoded: dict[tuple[str, bool], EncodedPrompt] | None = None
    ) -> tuple[EncodedPrompt, list[EncodedPrompt]]:
        """(negative, one per part) in force at sampling step `step` (0-based), from
        `encoded` (default: the texts as first encoded)."""
        found = self.encoded if encoded is None else encoded
        negative = found[(text_at(self.negative, step), True)]
        return negative, [found[(text_at(s, step), False)] for s, _ in self.parts]

    def texts_at(self, step: int) -> tuple[str, ...]:
        return (text_at(self.negative, step), *(text_at(s, step) for s, _ in self.parts))


def check_request(request: GenerationRequest) -> RunInputs:
    """Step 1 without a model: sampler, comments, tags and the stack (fast 4xx errors)."""
    sampler = resolve_sampler(request.sampler_name, request.scheduler)
    check_steps(sampler, request.steps)
    # A1111: comments go first; tags are read from the prompt only (in the negative
    # prompt they are plain text).
    prompt, tags = extract_lora_tags(strip_comments(request.prompt))
    for tag in tags:  # the rows' weight range holds for tags too
        check_lora_spec(tag, f"prompt tag <lora:{tag.name}>")
    stack, notes = combine_stacks(request.loras, tags)
    seed = request.seed if request.seed != -1 else random.randint(0, SEED_MAX)
    subseed = request.subseed if request.subseed != -1 else random.randint(0, SEED_MAX)
    rows = stack[: len(stack) - len(tags)]
    return RunInputs(
        replace(request, loras=rows, seed=seed, subseed=subseed),
        sampler,
        prompt,
        strip_comments(request.negative_prompt),
        stack,
        seed,
        subseed,
        notes,
    )


def ensd(inputs: RunInputs) -> int:
    """The eta noise seed delta this run applies: the request's when its sampler draws
    sampling noise from the per-item generators (`samplers.uses_ensd`), else 0, so the
    option never changes an image A1111 would leave alone."""
    return inputs.request.eta_noise_seed_delta if uses_ensd(inputs.sampler.sampler) else 0


class Txt2ImgRun:
    """txt2img on one loaded model.

    Args:
        model: the loaded checkpoint (with its adapter stack and prompt cache).
        plan: device placement (device, dtype).
        folders: the model folders, to resolve LoRA names.
        control: progress reporting and stop requests.
    Example:
        >>> result = Txt2ImgRun(model, plan, folders, control)(request)  # doctest: +SKIP
    """

    job = "txt2img"
    refiner: RefinerSwitch | None = None
    """Set by the engine when the request names a refiner."""
    refines_first_pass = True
    """Whether the refiner switch applies to the first denoising pass (hires fix: only to
    the second, A1111's default `hires_fix_refiner_pass`)."""

    def __init__(
        self, model: ActiveModel, plan: DevicePlan, folders: ModelFolders, control: RunControl
    ) -> None:
        self.model = model
        self.plan = plan
        self.folders = folders
        self.control = control
        self.embedding_lookup: EmbeddingLookup | None = None
        self.embedding_entries: dict[str, EmbeddingEntry] = {}
        self.embeddings_used: dict[str, None] = {}  # in order, for `TI hashes`

    def __call__(self, request: GenerationRequest) -> GenerationResult:
        # 1. check inputs
        inputs = self.check_inputs(request)
        # 2. apply adapters: the weights become base + this request's stack and VAE
        adapters = self.apply_adapters(inputs)
        self.apply_vae(inputs)
        # 3. encode prompts (cached: a new seed or sampler never re-runs the text encoders)
        conditioning = self.encode_prompts(inputs, adapters)
        # 3b. ControlNet units: maps made and models loaded once for the whole job
        self.units = self.prepare_units(inputs)
        images: list[Image.Image] = []
        seeds: list[int] = []
        subseeds: list[int] = []
        for iteration in range(inputs.request.n_iter):
            if self.control.interrupted:
                break
            scheduler = make_scheduler(inputs.sampler, self.model.scheduler_config)
            seed_plan = self.seed_plan(inputs, iteration)
            self.before_batch(inputs, adapters)
            # 4. prepare latents (after the timesteps: the first sigma scales the noise)
            timesteps = self.timesteps(inputs, scheduler)
            latents, generators = self.prepare_latents(inputs, seed_plan, scheduler)
            passes = self.passes
            self.control.batch(iteration * passes, inputs.request.n_iter * passes, len(timesteps))
            with self.tiling(inputs):
                # 5. denoise (switching to the refiner on the way; for hires fix, the
                # second pass)
                latents = self.denoise(
                    inputs,
                    conditioning,
                    latents,
                    generators,
                    scheduler,
                    timesteps,
                    refine=self.refines_first_pass,
                )
                sized, latents = self.after_denoise(inputs, latents, seed_plan, iteration)
                # 6. decode
                pixels = self.decode(sized, latents)
            # 7. post-process
            finished = self.post_process(pixels)
            images.extend(finished)
            seeds.extend(seed_plan.seeds)
            subseeds.extend(seed_plan.subseeds)
            if iteration + 1 < inputs.request.n_iter:  # the last one is the job's result
                batch = self.result(inputs, adapters, finished, seed_plan.seeds, seed_plan.subseeds)
                self.control.batch_finished(batch)
        return self.result(inputs, adapters, images, seeds, subseeds)

    passes = 1
    """Denoising passes per batch (hires fix: 2), for progress."""

    def upscaling(self) -> Upscaling:
        """Upscalers by name on this run's device (hires fix, SD upscale); an interrupt
        stops a model upscaler between tiles."""
        return Upscaling(
            self.folders, self.plan.device, self.plan.dtype, lambda: self.control.interrupted
        )

    @staticmethod
    def seed_plan(inputs: RunInputs, iteration: int) -> SeedPlan:
        """Batch `iteration`'s seeds: seed, seed+1, ... across the whole job, subseeds
        alike (A1111)."""
        count = inputs.request.batch_size
        first = iteration * count
        return SeedPlan(
            [(inputs.seed + first + i) % (SEED_MAX + 1) for i in range(count)],
            [(inputs.subseed + first + i) % (SEED_MAX + 1) for i in range(count)],
        )

    # -- 1

    def check_inputs(self, request: GenerationRequest) -> RunInputs:
        if self.model.architecture is Architecture.SDXL_REFINER and request.img2img is None:
            raise refuse_refiner_as_base()
        return check_request(request)

    def before_batch(self, inputs: RunInputs, adapters: Adapters) -> None:
        """Put back what a batch needs that the last one changed (hires fix: the stack)."""

    def prepare_other_checkpoints(self, inputs: RunInputs) -> None:
        """Load the other checkpoints this run switches to (a refiner) and merge their
        stacks now, so that the run itself only makes them current again: ZeroGPU does
        this in the main process, before its GPU call. The caller makes the run's own
        model current again afterwards."""
        if self.refiner is not None and self.refiner.may_switch:
            self.refiner.activate(self, inputs)

    def after_denoise(
        self, inputs: RunInputs, latents: torch.Tensor, seeds: SeedPlan, iteration: int
    ) -> tuple[RunInputs, torch.Tensor]:
        """The latents to decode, with the inputs that size them (hires fix: upscaled and
        denoised again)."""
        return inputs, latents

    # -- 2

    def apply_adapters(self, inputs: RunInputs) -> Adapters:
        """Make the model's weights exactly base + the stack (an empty stack restores the
        base)."""
        resolved: list[tuple[LoraEntry, float, float]] = []
        for spec in inputs.stack:
            entry = self.folders.resolve("lora", spec.name)
            if entry.error:
                raise UnusableFileError(f"LoRA '{entry.name}': {entry.error}", field="loras")
            # the first step's weights (a schedule's are re-merged by the denoising loop)
            first = (weight_at(spec.weight, 0, 1), weight_at(spec.text_encoder_weight, 0, 1))
            resolved.append((entry, *first))
        blocks = [spec.blocks for spec in inputs.stack]
        scheduled = [spec.scheduled for spec in inputs.stack]
        notes = self.model.adapters.apply(resolved, blocks, scheduled)
        coverage = self.model.adapters.coverage(resolved, scheduled)
        notes += [report.summary() for report in coverage if report.complete]
        applied = [
            (entry.name, entry.short_hash)
            for (entry, u, t), moving in zip(resolved, scheduled, strict=True)
            if u or t or moving
        ]
        family = self.model.adapters.architecture.family
        text_keys = tuple(
            (str(entry.path), entry.size, entry.mtime_ns, base_ratio(spec.blocks, family))
            if any(part.startswith("te") for part in entry.parts)
            else None
            for (entry, _, _), spec in zip(resolved, inputs.stack, strict=True)
        )
        adapters = Adapters(applied, (), notes, coverage, tuple(inputs.stack), text_keys)
        adapters.text_state = adapters.text_state_at(0, 1)
        return adapters

    def apply_vae(self, inputs: RunInputs) -> None:
        """Make the model's VAE the request's `sd_vae` (A1111's resolution order)."""
        self.vae_used = choose_vae(inputs.request.vae, self.model.entry, self.folders)
        self.model.vae.use(self.vae_used)

    vae_used: VaeEntry | None = None
    """The external VAE the images were decoded with (None: the checkpoint's own)."""
    previews: PreviewDecoders | None = None
    """The TAESD decoders, set by the engine (None: TAESD previews fall back to cheap)."""
    embeddings: EmbeddingStore | None = None
    """The textual-inversion embeddings, set by the engine (None: none are matched)."""
    controlnets: ControlNetCache | None = None
    """Loaded ControlNet models, set by the engine (None: a private cache per run)."""
    annotators: Annotators | None = None
    """Preprocessors with weights and their loaded models, set by the engine (None: loaded
    for this run)."""
    units: ControlUnits | None = None
    """The request's ControlNet units once prepared (None: no unit)."""
    control_active = True
    """Whether the units act in the steps being run (not in a refiner's)."""
    hires_pass = False
    """Whether the pass being run is hires fix's second pass."""
    pass_steps: tuple[int, int] = (1, 1)
    """The pass being run: (sampler steps, model calls per step)."""

    # -- 3b

    def prepare_units(self, inputs: RunInputs) -> ControlUnits | None:
        """Each ControlNet unit's map and model, fitted to this run's model."""
        request = inputs.request
        if not request.controlnet:
            return None
        init, resize_mode = self.control_input(inputs)
        folders = self.folders
        return ControlUnits.prepare(
            request,
            folders,
            self.controlnets if self.controlnets is not None else ControlNetCache(1),
            self.model.pipe.unet,
            self.plan.device,
            self.model.pipe.unet.dtype,  # the residuals are added to the UNet's tensors
            init=init,
            init_resize=resize_mode,
            learn=lambda entry: lambda **facts: folders.learn("controlnet", entry, **facts),
            crop=self.control_crop(),
            annotators=self.annotators,
        )

    def control_input(self, inputs: RunInputs) -> tuple[Image.Image | None, str]:
        """The image a unit without one uses, and its resize mode (txt2img: none)."""
        return None, "Crop and Resize"

    def control_crop(self) -> MaskCrop | None:
        """Inpainting "only masked": the crop units' images get (txt2img: none)."""
        return None

    # -- 3

    def encode_prompts(
        self, inputs: RunInputs, adapters: Adapters, hires_steps: int | None = None
    ) -> Conditioning:
        """A1111 semantics (weights, BREAK, 75-token chunks, clip skip, prompt editing,
        alternation, `AND` parts with weights), every distinct text encoded once and all
        padded alike. The negative prompt takes editing and alternation, not `AND`. With
        `hires_steps`, the schedules are the hires pass's (A1111's hires offsets)."""
        request = inputs.request
        parts = split_and(inputs.prompt)  # A1111: even one part loses a trailing ":w"
        texts = [text for text, _ in parts]
        *schedules, negative = prompt_schedules(
            [*texts, inputs.negative_prompt], request.steps, hires_steps=hires_steps
        )
        wanted = {(text, False) for schedule in schedules for _, text in schedule}
        wanted |= {(text, True) for _, text in negative}
        keys = sorted(wanted)
        if self.embeddings is not None:  # the current model's (a refiner has its own)
            self.embedding_lookup, entries = self.embeddings.lookup(self.model.encoder)
            self.embedding_entries.update(entries)
        encoded = [
            self.encode(text, request.clip_skip, is_negative, adapters.text_state)
            for text, is_negative in keys
        ]
        # `TI hashes` names the prompt's embeddings, then the negative prompt's (A1111)
        for _, prompt in sorted(zip(keys, encoded, strict=True), key=lambda pair: pair[0][1]):
            self.embeddings_used.update(dict.fromkeys(prompt.embeddings))
        padded = pad_to_longest(encoded, empty=self.model.empty_prompt)
        weights = [weight for _, weight in parts]
        weighted = list(zip(schedules, weights, strict=True))
        found = dict(zip(keys, padded, strict=True))
        return Conditioning(
            weighted, negative, found, hires_steps, adapters, {adapters.text_state: found}
        )

    def encoded_for(
        self, inputs: RunInputs, conditioning: Conditioning, state: tuple[object, ...]
    ) -> dict[tuple[str, bool], EncodedPrompt]:
        """Every text of `conditioning` encoded with the text encoders as they are now,
        holding `state` (a scheduled `te=` changed them), padded to the same length."""
        if state not in conditioning.by_state:
            clip_skip = inputs.request.clip_skip
            reference = next(iter(conditioning.encoded.values()))
            conditioning.by_state[state] = {
                key: pad_to_longest(
                    [reference, self.encode(key[0], clip_skip, key[1], state)],
                    empty=self.model.empty_prompt,
                )[1]
                for key in conditioning.encoded
            }
        return conditioning.by_state[state]

    def encode(
        self, text: str, clip_skip: int, negative: bool, text_state: tuple[object, ...]
    ) -> EncodedPrompt:
        """One text's conditioning, from the model's small LRU cache when the same text was
        encoded with the same text-encoder weights before."""
        lookup = self.embedding_lookup
        key = (text, clip_skip, negative, text_state, lookup.key if lookup else ())
        cache = self.model.prompt_cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        encoded = self.model.encoder.encode(
            text,
            clip_skip=clip_skip,
            device=self.plan.device,
            dtype=self.plan.dtype,
            negative=negative,
            embeddings=lookup,
        )
        cache[key] = encoded
        while len(cache) > PROMPT_CACHE_SIZE:
            cache.popitem(last=False)
        return encoded

    # -- 4

    def prepare_latents(
        self, inputs: RunInputs, seeds: SeedPlan, scheduler: Any
    ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """The seeded noise scaled by the scheduler's initial sigma."""
        noise, generators = self.seeded_noise(inputs, seeds, scheduler)
        return noise * scheduler.init_noise_sigma, generators

    def seeded_noise(
        self, inputs: RunInputs, seeds: SeedPlan, scheduler: Any
    ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """Initial noise from per-item CPU generators, so a seed means the same image on
        every device (with A1111's variation seed and "resize seed from"), on the device."""
        pipe = self.model.pipe
        factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        request = inputs.request
        resize = (request.seed_resize_from_h, request.seed_resize_from_w)
        plan = replace(
            seeds,
            subseed_strength=request.subseed_strength,
            resize_from=resize if min(resize) > 0 else None,
            source=request.randn_source,
            device=self.plan.device,
            eta_noise_seed_delta=ensd(inputs),
        )
        # [C, H/8, W/8] per item
        shape = (pipe.vae.config.latent_channels, request.height // factor, request.width // factor)
        noise, generators = initial_noise(plan, shape, self.dtype, factor)
        if hasattr(scheduler, "noise_sampler_seed"):
            # DPM++ SDE's Brownian tree: one per item from its seed (A1111), never the
            # global RNG, so the infotext's seed reproduces the image
            scheduler.noise_sampler_seed = list(plan.seeds)
        return noise.to(self.plan.device), generators

    @property
    def dtype(self) -> torch.dtype:
        return (
            self.model.pipe.text_encoder.dtype if self.model.pipe.text_encoder else self.plan.dtype
        )

    def timesteps(self, inputs: RunInputs, scheduler: Any) -> torch.Tensor:
        set_timesteps(scheduler, inputs.sampler, inputs.request.steps, self.plan.device)
        return scheduler.timesteps

    # -- 5

    def denoise(
        self,
        inputs: RunInputs,
        conditioning: Conditioning,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        scheduler: Any,
        timesteps: torch.Tensor,
        *,
        refine: bool = True,
    ) -> torch.Tensor:
        """The steps on the current model, and with a refiner (when `refine`), the steps
        from its switch point on the refiner; the current model is the same afterwards."""
        refiner = self.refiner if refine else None
        self.pass_evals = (len(timesteps), int(getattr(scheduler, "order", 1)))
        split = len(timesteps) if refiner is None else refiner.index(scheduler, timesteps)
        order = max(int(getattr(scheduler, "order", 1)), 1)
        self.pass_steps = (-(-len(timesteps) // order), order)
        latents = self.denoise_steps(
            inputs, conditioning, latents, generators, scheduler, timesteps[:split]
        )
        if refiner is None or split == len(timesteps) or self.stopped:
            return latents
        # 5b. switch to the refiner: its conditioning, the same latents and sampler state
        resume = self.model
        try:
            refined = refiner.enter(self, inputs, conditioning)
            self.control_active = False  # sd-webui-controlnet hooks the first model only
            return self.denoise_steps(
                inputs, refined, latents, generators, scheduler, timesteps[split:], split
            )
        finally:
            self.control_active = True
            if self.model is not resume:
                self.model = refiner.switch_model(resume)

    pass_evals: tuple[int, int] = (1, 1)
    """(UNet evaluations in the current pass, the scheduler's order), for schedules."""

    @property
    def stopped(self) -> bool:
        return self.control.interrupted or self.control.skipped

    def pass_step(self, index: int) -> tuple[int, int]:
        """(sampler step, steps in the pass) of UNet evaluation `index`: second-order
        schedulers (Heun, DPM2) evaluate twice per step after the first."""
        evals, order = self.pass_evals
        step_of = (lambda i: (i + order - 1) // order) if order > 1 else (lambda i: i)
        return step_of(index), step_of(max(evals - 1, 0)) + 1

    def denoise_steps(
        self,
        inputs: RunInputs,
        conditioning: Conditioning,
        latents: torch.Tensor,
        generators: list[torch.Generator],
        scheduler: Any,
        timesteps: torch.Tensor,
        start: int = 0,
    ) -> torch.Tensor:
        """`timesteps` (steps `start`... of this pass) on the current model."""
        loop = self.denoise_loop(inputs, conditioning, latents.shape[0], generators, scheduler)
        family, vae = self.model.family, self.model.pipe.vae
        method = getattr(self.control, "preview_method", CHEAP)  # JobControl has it

        def on_step(done: int, current: torch.Tensor) -> bool:
            self.control.step(
                done, lambda: render_preview(method, current, family, vae, self.previews)
            )
            return self.stopped

        units = self.units if self.control_active else None
        with units.attention(self.model.pipe.unet) if units is not None else nullcontext():
            return loop(latents, timesteps, on_step, start)  # IP-Adapter units' attention on

    def denoise_loop(
        self,
        inputs: RunInputs,
        conditioning: Conditioning,
        count: int,
        generators: list[torch.Generator],
        scheduler: Any,
    ) -> DenoiseLoop:
        """The loop with this run's conditioning and hooks (subclasses add theirs)."""
        pipe = self.model.pipe
        guidance = inputs.request.cfg_scale
        timestep_cond = None
        if pipe.unet.config.time_cond_proj_dim is not None:  # guidance-distilled UNets
            scale = torch.tensor(guidance - 1).repeat(count)
            timestep_cond = pipe.get_guidance_scale_embedding(
                scale, embedding_dim=pipe.unet.config.time_cond_proj_dim
            ).to(device=self.plan.device, dtype=self.dtype)
        loop = DenoiseLoop(pipe.unet, scheduler, lambda i: (None, None), guidance, generators)
        loop.eta = step_eta(inputs.sampler)
        loop.cond_weights = conditioning.weights
        if timestep_cond is not None:
            loop.timestep_cond = timestep_cond.repeat(len(conditioning.parts), 1)
        loop.conditioning = self.step_conditioning(inputs, conditioning, count, loop.guided)
        adapters = conditioning.adapters
        if adapters is not None and adapters.scheduled:
            stack = self.model.adapters

            def reweight(index: int) -> None:
                """Per-step schedules: re-merge the layers of LoRAs whose weight changes."""
                assert adapters is not None
                stack.reweight(adapters.weights_at(*self.pass_step(index)))

            loop.before_step.append(reweight)
        if self.model.architecture.is_inpainting:
            loop.unet_input.append(self.inpainting_input(inputs, count, loop.copies))
        if self.units is not None and self.control_active:
            steps, order = self.pass_steps
            loop.residuals = self.units.hook(
                count=count,
                guided=loop.guided,
                width=inputs.request.width,
                height=inputs.request.height,
                steps=steps,
                order=order,
                hires=self.hires_pass,
            )
        return loop

    def step_conditioning(
        self, inputs: RunInputs, conditioning: Conditioning, count: int, guided: bool
    ) -> StepConditioning:
        """The UNet's conditioning at each step for `count` batch items, each combination
        of texts built once."""
        built: dict[tuple[object, ...], tuple[torch.Tensor, dict[str, torch.Tensor] | None]] = {}
        adapters = conditioning.adapters
        text_scheduled = adapters is not None and adapters.text_scheduled

        def at_step(index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
            state: tuple[object, ...] = ()
            if text_scheduled:
                assert adapters is not None
                state = adapters.text_state_at(*self.pass_step(index))
            key = (conditioning.texts_at(index), state)  # each combination built once
            if key not in built:
                found = self.encoded_for(inputs, conditioning, state) if text_scheduled else None
                negative, positives = conditioning.at(index, found)
                built[key] = self.unet_conditioning(inputs, negative, positives, count, guided)
            return built[key]

        return at_step

    def unet_conditioning(
        self,
        inputs: RunInputs,
        negative: EncodedPrompt,
        positives: list[EncodedPrompt],
        count: int,
        guided: bool,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """Hidden states [copies*B, T, D] (uncond when guided, then each part) and, for
        SDXL, the pooled text and size ids."""
        prompts = [negative, *positives] if guided else positives
        hidden = torch.cat([prompt.embeds.expand(count, -1, -1) for prompt in prompts])
        if self.model.family != "SDXL":
            return hidden.to(self.plan.device), None
        pooled = []
        for prompt in prompts:
            assert prompt.pooled is not None
            pooled.append(prompt.pooled.expand(count, -1))
        request = inputs.request
        if self.model.architecture is Architecture.SDXL_REFINER:
            # original size, crop top-left, aesthetic score: low for the uncond rows
            low, high = REFINER_AESTHETIC_SCORES
            scores = [low] * (len(prompts) - len(positives)) + [high] * len(positives)
            size = [request.height, request.width, 0, 0]
            ids = torch.tensor([size + [score] for score in scores])
        else:
            # original size, crop top-left, target size (diffusers' SDXL defaults)
            size = [request.height, request.width, 0, 0, request.height, request.width]
            ids = torch.tensor([size] * len(prompts))
        # [copies, n] -> [copies*B, n], in the hidden states' order
        ids = ids.to(hidden.dtype).repeat_interleave(count, dim=0)
        added = {
            "text_embeds": torch.cat(pooled).to(self.plan.device),
            "time_ids": ids.to(self.plan.device),
        }
        return hidden.to(self.plan.device), added

    def inpainting_input(
        self, inputs: RunInputs, count: int, copies: int
    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """txt2img on an inpainting (9-channel) model, as A1111: everything masked and the
        masked image blank (0 in the VAE's [-1, 1] range), encoded once with the latent
        distribution's mean (deterministic; A1111 samples it, a difference far below one
        grey level for a blank image)."""
        pipe = self.model.pipe
        request = inputs.request
        vae = pipe.vae
        blank = torch.zeros(1, 3, request.height, request.width, device=self.plan.device)
        with torch.no_grad():
            encoded = vae.encode(blank.to(vae.dtype)).latent_dist.mode()
        masked = (encoded * vae.config.scaling_factor).to(self.dtype)  # [1, 4, h, w]
        mask = torch.ones_like(masked[:, :1])  # [1, 1, h, w]
        extra = torch.cat([mask, masked], dim=1).repeat(count * copies, 1, 1, 1)

        def add_channels(model_input: torch.Tensor, index: int) -> torch.Tensor:
            # [2B, 4, h, w] -> [2B, 9, h, w]: latents, mask, masked-image latents
            return torch.cat([model_input, extra.to(model_input)], dim=1)

        return add_channels

    @contextmanager
    def tiling(self, inputs: RunInputs) -> Iterator[None]:
        """With `tiling`, every convolution of the UNet and VAE pads circularly (A1111's
        seamless tiling) while the batch is denoised and decoded; restored afterwards."""
        if not inputs.request.tiling:
            yield
            return
        pipe = self.model.pipe
        convs = [
            module
            for model in (pipe.unet, pipe.vae)
            for module in model.modules()
            if isinstance(module, torch.nn.Conv2d)
        ]
        before = [conv.padding_mode for conv in convs]
        for conv in convs:
            conv.padding_mode = "circular"
        try:
            yield
        finally:
            for conv, mode in zip(convs, before, strict=True):
                conv.padding_mode = mode

    # -- 6

    def decode(self, inputs: RunInputs, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1] (the VAE upcast as diffusers does for SDXL), in the
        VAE's own dtype."""
        vae = self.model.pipe.vae
        request = inputs.request
        upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
        if upcast:
            vae.to(dtype=torch.float32)
            latents = latents.to(torch.float32)
        mean = getattr(vae.config, "latents_mean", None)
        std = getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std_t / vae.config.scaling_factor + mean_t
        else:
            latents = latents / vae.config.scaling_factor
        latents = latents.to(vae.dtype)  # --no-half-vae: an fp32 VAE gets half latents
        large = request.width * request.height > LARGE_DECODE_PIXELS
        if large:
            vae.enable_tiling()
        try:
            return decode_checked(vae, lambda z: vae.decode(z, return_dict=False)[0], latents)
        finally:
            if large:
                vae.disable_tiling()
            if upcast:
                vae.to(dtype=torch.float16)

    # -- 7

    def post_process(self, pixels: torch.Tensor) -> list[Image.Image]:
        """[-1, 1] tensors -> 8-bit PIL images (diffusers' image processor)."""
        processor = self.model.pipe.image_processor
        return list(
            processor.postprocess(
                pixels, output_type="pil", do_denormalize=[True] * pixels.shape[0]
            )
        )

    def result(
        self,
        inputs: RunInputs,
        adapters: Adapters,
        images: list[Image.Image],
        seeds: list[int],
        subseeds: list[int],
    ) -> GenerationResult:
        """The result with one infotext per image."""
        model = self.model
        notes = [*inputs.notes, *model.notes, *adapters.notes]
        if self.refiner is not None:
            notes.extend(self.refiner.notes)
        if model.entry is not None and model.entry.sha256 is None:
            notes.append("the checkpoint's hash is still being computed: no Model hash written")
        infotexts = [
            self.infotext(inputs, adapters, seed, subseed)
            for seed, subseed in zip(seeds, subseeds, strict=True)
        ]
        return GenerationResult(
            images=images,
            seeds=seeds,
            infotexts=infotexts,
            request=inputs.request,
            model_name=model.name,
            model_hash=model.entry.short_hash if model.entry else None,
            interrupted=self.control.interrupted,
            notes=notes,
            lora_coverage=list(adapters.coverage),
            detected_maps=self.units.detected_maps() if self.units is not None else [],
        )

    def infotext(self, inputs: RunInputs, adapters: Adapters, seed: int, subseed: int) -> str:
        """A1111 `parameters` text for one image; UI-stack LoRAs are written into the
        prompt as tags so any A1111-compatible tool replays them."""
        request = inputs.request
        model = self.model
        params: dict[str, object] = {
            "Steps": request.steps,
            "Sampler": inputs.sampler.sampler,
            "Schedule type": inputs.sampler.label,
            "CFG scale": request.cfg_scale,
            "Seed": seed,
            "Size": f"{request.width}x{request.height}",
            "Model hash": model.entry.short_hash if model.entry else None,
            "Model": model.name,
        }
        if self.vae_used is not None:  # A1111 names only a VAE that is not the baked-in one
            params["VAE hash"] = self.vae_used.short_hash
            params["VAE"] = self.vae_used.name
        if request.subseed_strength:
            params["Variation seed"] = subseed
            params["Variation seed strength"] = request.subseed_strength
        if request.seed_resize_from_w > 0 and request.seed_resize_from_h > 0:
            params["Seed resize from"] = (
                f"{request.seed_resize_from_w}x{request.seed_resize_from_h}"
            )
        if request.img2img is not None or request.hires is not None:
            params["Denoising strength"] = request.denoising_strength
        params["Clip skip"] = request.clip_skip
        if ensd(inputs):  # A1111 writes it only when set and the sampler uses it
            params["ENSD"] = request.eta_noise_seed_delta
        if request.randn_source != "GPU":  # A1111 writes RNG unless it is its default
            params["RNG"] = request.randn_source
        if request.tiling:
            params["Tiling"] = True
        params.update(self.extra_infotext(inputs))
        if self.units is not None:
            params.update(self.units.infotext())
        if self.refiner is not None:
            refiner = self.folders.resolve("checkpoint", self.refiner.checkpoint)
            params.update(self.refiner.infotext(refiner))
        hashes = [(name, short) for name, short in adapters.applied if short]
        if hashes:
            params["Lora hashes"] = format_lora_hashes(hashes)
        ti_hashes = self.ti_hashes()
        if ti_hashes:
            params["TI hashes"] = format_lora_hashes(ti_hashes)  # the same "name: hash" pairs
        params["Version"] = f"lorastack {__version__}"
        tags = " ".join(format_lora_tag(spec) for spec in request.loras)
        prompt = f"{request.prompt} {tags}" if request.prompt and tags else request.prompt or tags
        return format_infotext(prompt, request.negative_prompt, params)

    def ti_hashes(self) -> list[tuple[str, str]]:
        """(name, first 12 hex of the file's sha256) of each embedding the prompts used, in
        order, as A1111's `TI hashes`; a file not hashed yet is hashed now (a few KB)."""
        found = []
        for name in self.embeddings_used:
            entry = self.embedding_entries.get(name)
            if entry is None:
                continue
            sha256 = entry.sha256
            if sha256 is None:
                try:
                    sha256 = self.folders.hashes.compute(entry.path, "sha256")
                except OSError:  # gone since the run read it: written without a hash
                    continue
            found.append((name, sha256[:12]))
        return found

    def extra_infotext(self, inputs: RunInputs) -> dict[str, object]:
        """Keys a mode adds after the common ones (img2img: Denoising strength, ...)."""
        return {}
