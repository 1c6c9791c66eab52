"""Request batching (`--batch-requests`): compatible txt2img requests share one denoising
batch, so the UNet runs once per step for all of them.

Two requests are compatible when they differ only in what each batch item carries on its
own rows: prompts (encoded per request), seeds, variation seeds, noise source, ENSD and
batch size. `batch_key` decides that before queueing, from the request alone; `MergedTxt2Img`
splits its group once more by `conditioning_shape` (the prompt chunk count is known only
after encoding), then per batch iteration:

    each request's noise (its own seeds and generators) -> concatenated [sum B, C, h, w]
    -> one DenoiseLoop whose conditioning is every request's, block by block
    -> one decode -> images, seeds and infotexts split back per request

An interrupted (or skipped) request's rows are frozen where its own run would have stopped
and left out of the UNet's later calls; the other rows continue. An interrupted request's
images are decoded at once and its result handed to its control's `finish` (the job
service's), so its submitter need not wait for the others. Images equal the same
request run alone within float rounding (a batched matmul may round differently), which
is why `--batch-requests` is off by default: without it the same request gives the same
bits.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from pipelines.generation.denoise import Conditioning as StepConditioning
from pipelines.generation.noise import SeedPlan
from pipelines.generation.run import Adapters, Conditioning, RunInputs, Txt2ImgRun
from pipelines.preview import CHEAP, render_preview
from pipelines.prompt_grammar import prompt_schedules, split_and
from pipelines.samplers import make_scheduler
from pipelines.schema import GenerationResult

BatchKey = tuple[Hashable, ...]


def batch_key(inputs: RunInputs) -> BatchKey | None:
    """What must be equal for two requests to share a denoising batch; None: the request
    runs alone (img2img and inpainting, hires fix, a refiner, LoRA weight schedules,
    ControlNet units: runs that change the model, the size or the latents between steps).

    Args:
        inputs: the checked request (`check_request`), with its checkpoint and VAE resolved
            to the keys the runner loads.
    Returns:
        checkpoint, VAE, LoRA stack (names, UNet and text-encoder weights, in order), size,
        sampler and schedule, steps, CFG, clip skip, batch count, tiling, the `AND` parts'
        weights (their number) and the shape of every prompt-editing schedule (the steps
        at which the texts change), negative prompt's included.
    Example:
        >>> batch_key(check_request(GenerationRequest(hires=HiresFix())))  # doctest: +SKIP
    """
    request = inputs.request
    if (
        request.img2img is not None
        or request.hires is not None
        or request.refiner_checkpoint is not None
        or any(spec.scheduled for spec in inputs.stack)  # re-merged between steps
        or bool(request.controlnet)  # residuals from the request's own control images
    ):
        return None
    parts = split_and(inputs.prompt)
    *schedules, negative = prompt_schedules(
        [text for text, _ in parts] + [inputs.negative_prompt], request.steps
    )
    return (
        request.checkpoint,
        request.vae,
        tuple(inputs.stack),  # names, weights and block weights, in order
        (request.width, request.height),
        inputs.sampler,
        request.steps,
        request.cfg_scale,
        request.clip_skip,
        request.n_iter,
        request.tiling,
        tuple(weight for _, weight in parts),
        tuple(tuple(end for end, _ in schedule) for schedule in [*schedules, negative]),
    )


def conditioning_shape(conditioning: Conditioning) -> tuple[Hashable, ...]:
    """What the encoded prompts must share to be stacked in one UNet batch: the token
    length (75-token chunks, after padding within the request), the pooled text's presence
    and the `AND` parts' weights."""
    encoded = next(iter(conditioning.encoded.values()))
    return (
        tuple(encoded.embeds.shape[1:]),
        encoded.pooled is not None,
        conditioning.weights,
    )


def merge_blocks(blocks: list[torch.Tensor], copies: int) -> torch.Tensor:
    """Per-request [copies*B_r, ...] -> [copies*sum(B_r), ...]: copy block k holds every
    request's rows in order, as the DenoiseLoop's `chunk(copies)` reads it."""
    chunks = [block.chunk(copies) for block in blocks]
    return torch.cat([part[k] for k in range(copies) for part in chunks])


class LiveRows:
    """The UNet called with only the rows of batch items still denoising; frozen items get
    a zero prediction (their latents are put back after the scheduler's step)."""

    def __init__(self, unet: Any, live: list[bool]) -> None:
        self.unet = unet
        self.live = live  # one per batch item, changed by the batch as requests stop

    def __call__(self, sample: torch.Tensor, timestep: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        if all(self.live):
            return self.unet(sample, timestep, **kwargs)  # type: ignore[no-any-return]
        items = len(self.live)
        copies = sample.shape[0] // items
        # rows are copy-major: row k*B + b is batch item b's copy k
        mask = torch.tensor(self.live * copies, device=sample.device)
        rows = mask.nonzero().squeeze(1)

        def pick(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == len(mask):
                return value[rows]
            if isinstance(value, dict):
                return {name: pick(item) for name, item in value.items()}
            return value

        picked = {name: pick(value) for name, value in kwargs.items()}
        noise = self.unet(sample[rows], timestep, **picked)[0]
        full = noise.new_zeros((sample.shape[0], *noise.shape[1:]))
        full[rows] = noise
        return (full,)


@dataclass
class _Member:
    """One request of the batch: its own run (control, infotext state) and what it made."""

    run: Txt2ImgRun
    inputs: RunInputs
    conditioning: Conditioning | None = None
    images: list[Image.Image] | None = None
    seeds: list[int] | None = None
    subseeds: list[int] | None = None
    result: GenerationResult | None = None  # set when delivered early (interrupted)


class MergedTxt2Img:
    """Compatible txt2img requests (one `batch_key`) denoised as one batch.

    Args:
        runs: one `Txt2ImgRun` per request, all on the same loaded model, each with its
            job's control.
    Example:
        >>> results = MergedTxt2Img(runs)(requests)  # doctest: +SKIP
    """

    def __init__(self, runs: list[Txt2ImgRun]) -> None:
        if not runs or any(type(run) is not Txt2ImgRun or run.refiner for run in runs):
            raise ValueError("only plain txt2img runs are batched")
        self.runs = runs
        self.adapters: Adapters | None = None  # applied once for all, in step 2

    def __call__(self, requests: list[Any]) -> list[GenerationResult]:
        # 1. check inputs (each request's own notes, seeds and prompts)
        members = [
            _Member(run, run.check_inputs(request))
            for run, request in zip(self.runs, requests, strict=True)
        ]
        keys = {batch_key(member.inputs) for member in members}
        if len(keys) != 1 or None in keys:
            raise ValueError("requests of different batch keys cannot share a batch")
        # 2. apply adapters once: the stack, VAE and model are the same for all
        lead = members[0]
        adapters = self.adapters = lead.run.apply_adapters(lead.inputs)
        lead.run.apply_vae(lead.inputs)
        for member in members[1:]:
            member.run.vae_used = lead.run.vae_used
        # 3. encode prompts per request; requests whose tokens differ in length form
        # batches of their own
        groups: dict[tuple[Hashable, ...], list[_Member]] = {}
        for member in members:
            member.conditioning = member.run.encode_prompts(member.inputs, adapters)
            groups.setdefault(conditioning_shape(member.conditioning), []).append(member)
        for group in groups.values():
            self.run_group(group)
        return [member.result or self.result(member) for member in members]

    def result(self, member: _Member) -> GenerationResult:
        assert self.adapters is not None
        return member.run.result(
            member.inputs,
            self.adapters,
            member.images or [],
            member.seeds or [],
            member.subseeds or [],
        )

    def run_group(self, group: list[_Member]) -> None:
        """Every batch iteration of `group`, each request's rows side by side."""
        lead = group[0]
        request = lead.inputs.request
        for member in group:
            member.images, member.seeds, member.subseeds = [], [], []
        for iteration in range(request.n_iter):
            live = [member for member in group if not member.run.control.interrupted]
            if not live:
                break
            self.run_iteration(live, iteration)

    def run_iteration(self, live: list[_Member], iteration: int) -> None:
        """4.-7. for one batch iteration of the requests in `live`."""
        lead = live[0]
        run, inputs = lead.run, lead.inputs
        scheduler = make_scheduler(inputs.sampler, run.model.scheduler_config)
        timesteps = run.timesteps(inputs, scheduler)
        # 4. prepare latents: each request's noise from its own seeds, side by side
        plans = [member.run.seed_plan(member.inputs, iteration) for member in live]
        latents_parts, generators = [], []
        for member, plan in zip(live, plans, strict=True):
            noise, made = member.run.prepare_latents(member.inputs, plan, scheduler)
            latents_parts.append(noise)  # [B_r, C, h, w]
            generators.extend(made)
        if hasattr(scheduler, "noise_sampler_seed"):  # each item's Brownian tree
            scheduler.noise_sampler_seed = [seed for plan in plans for seed in plan.seeds]
        latents = torch.cat(latents_parts)  # [sum B_r, C, h, w]
        counts = [part.shape[0] for part in latents_parts]
        starts = [sum(counts[:index]) for index in range(len(counts))]
        for member in live:
            member.run.control.batch(iteration, inputs.request.n_iter, len(timesteps))
        with run.tiling(inputs):
            # 5. denoise once for all
            latents = self.denoise(
                live, plans, latents, counts, starts, generators, scheduler, timesteps
            )
            # 6. decode once
            pixels = run.decode(inputs, latents)
        # 7. post-process and split back per request
        images = run.post_process(pixels)
        for member, plan, start, count in zip(live, plans, starts, counts, strict=True):
            if member.result is None:  # not delivered already
                self.keep(member, plan, images[start : start + count])

    @staticmethod
    def keep(member: _Member, plan: SeedPlan, images: list[Image.Image]) -> None:
        assert member.images is not None and member.seeds is not None
        assert member.subseeds is not None
        member.images.extend(images)
        member.seeds.extend(plan.seeds)
        member.subseeds.extend(plan.subseeds)

    def finish_early(self, member: _Member, plan: SeedPlan, latents: torch.Tensor) -> None:
        """An interrupted request's images decoded now and its result handed to its job
        (when its control takes one: the job service's does)."""
        finish = getattr(member.run.control, "finish", None)
        if finish is None:
            return
        run = member.run
        self.keep(member, plan, run.post_process(run.decode(member.inputs, latents)))
        member.result = self.result(member)
        finish(member.result)

    def denoise(
        self,
        live: list[_Member],
        plans: list[SeedPlan],
        latents: torch.Tensor,
        counts: list[int],
        starts: list[int],
        generators: list[torch.Generator],
        scheduler: Any,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """One DenoiseLoop over every request's rows; a request that stops keeps the
        latents it had then (what its own run would decode), and its rows leave the UNet."""
        lead = live[0]
        run = lead.run
        assert lead.conditioning is not None
        total = latents.shape[0]
        loop = run.denoise_loop(lead.inputs, lead.conditioning, total, generators, scheduler)
        per_request: list[StepConditioning] = []
        for member, count in zip(live, counts, strict=True):
            assert member.conditioning is not None
            per_request.append(
                member.run.step_conditioning(member.inputs, member.conditioning, count, loop.guided)
            )
        loop.conditioning = self.merged_conditioning(live, per_request, loop.copies)
        alive = [True] * total
        loop.unet = LiveRows(loop.unet, alive)
        frozen: dict[int, torch.Tensor] = {}  # member index -> its latents when it stopped

        def keep_frozen(current: torch.Tensor, index: int) -> torch.Tensor:
            for number, kept in frozen.items():
                current[starts[number] : starts[number] + counts[number]] = kept
            return current

        loop.after_step.append(keep_frozen)
        family, vae = run.model.family, run.model.pipe.vae
        method = getattr(run.control, "preview_method", CHEAP)  # JobControl has it

        def on_step(done: int, current: torch.Tensor) -> bool:
            for number, member in enumerate(live):
                if number in frozen:
                    continue
                rows = current[starts[number] : starts[number] + counts[number]]
                member.run.control.step(
                    done,
                    lambda rows=rows: render_preview(method, rows, family, vae, run.previews),
                )
                if member.run.stopped:
                    frozen[number] = rows.clone()
                    for row in range(starts[number], starts[number] + counts[number]):
                        alive[row] = False
                    if member.run.control.interrupted:
                        self.finish_early(member, plans[number], frozen[number])
            return len(frozen) == len(live)

        return loop(latents, timesteps, on_step)

    @staticmethod
    def merged_conditioning(
        live: list[_Member], per_request: list[StepConditioning], copies: int
    ) -> StepConditioning:
        """Every request's UNet conditioning at a step, merged block by block (built once
        per combination of texts)."""
        built: dict[tuple[tuple[str, ...], ...], tuple[torch.Tensor, Any]] = {}

        def at_step(index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
            texts = tuple(
                member.conditioning.texts_at(index)
                for member in live
                if member.conditioning is not None
            )
            if texts not in built:
                parts = [conditioning(index) for conditioning in per_request]
                hidden = merge_blocks([hidden for hidden, _ in parts], copies)
                first = parts[0][1]
                added = None
                if first is not None:
                    added = {
                        name: merge_blocks([extra[name] for _, extra in parts if extra], copies)
                        for name in first
                    }
                built[texts] = (hidden, added)
            return built[texts]

        return at_step
