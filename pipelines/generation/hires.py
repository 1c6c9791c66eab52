"""A1111's hires fix (`modules/processing.py`: `StableDiffusionProcessingTxt2Img`
`calculate_target_resolution` and `sample_hr_pass`) as a step after txt2img's denoising.

Each batch's first-pass latents are upscaled, either in latent space (A1111's `Latent*`
modes: torch interpolation) or as pixels (decoded, resized by `None`/`Lanczos`/`Nearest`
or a model upscaler, encoded again), cropped as A1111 truncates a `hr_resize` that does
not keep the aspect ratio, then noised with the same seeds at the new size and denoised
again for exactly the hires steps (A1111 passes `steps` to `sample_img2img`, which takes
the "do exactly the amount of steps" branch), with the hires prompt, sampler and
schedule. A hires prompt with other `<lora:...>` tags applies its own stack for the second
pass, as A1111 activates `hr_extra_network_data`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
from PIL import Image

from pipelines.errors import InvalidRequestError
from pipelines.generation.img2img import encode_pixels, img2img_steps
from pipelines.generation.noise import SeedPlan
from pipelines.generation.run import Adapters, Conditioning, RunInputs, Txt2ImgRun, check_request
from pipelines.model_manager import ActiveModel
from pipelines.samplers import SamplerChoice, make_scheduler, resolve_sampler, set_timesteps
from pipelines.schema import LATENT_UPSCALE_MODES, GenerationRequest, GenerationResult


@dataclass
class HiresPass:
    """What the second pass uses, built once per run (on another checkpoint, its stack and
    conditioning are made on that checkpoint when the run first switches to it)."""

    inputs: RunInputs  # the hires prompt, size and steps
    sampler: SamplerChoice
    steps: int
    size: tuple[int, int, int, int]  # upscale to x, y; truncate x, y (latent units)
    adapters: Adapters | None = None
    conditioning: Conditioning | None = None


class HiresRun(Txt2ImgRun):
    """txt2img with A1111's hires fix (see the module docstring).

    Example:
        >>> HiresRun(model, plan, folders, control)(request)  # doctest: +SKIP
    """

    passes = 2
    refines_first_pass = False
    second: HiresPass

    def check_inputs(self, request: GenerationRequest) -> RunInputs:
        inputs = super().check_inputs(request)
        hires = request.hires
        assert hires is not None
        if hires.upscaler not in LATENT_UPSCALE_MODES:
            self.upscaling().check(hires.upscaler, "hr_upscaler")
        return inputs

    switch_model: Callable[[str | ActiveModel], ActiveModel] | None = None
    """Set by the engine: make a checkpoint (key) or a loaded model current."""
    first: ActiveModel | None = None  # the first pass's model, once another one was used
    hires_model: ActiveModel | None = None  # the `hr_checkpoint_name` model, once loaded

    def encode_prompts(
        self, inputs: RunInputs, adapters: Adapters, hires_steps: int | None = None
    ) -> Conditioning:
        """The first pass's conditioning; the second pass's is prepared here too, with its
        own stack applied and then the first pass's put back (so text encoders see the
        right LoRA weights for each). With a hires checkpoint, that waits for the switch."""
        first = super().encode_prompts(inputs, adapters, hires_steps)
        if hires_steps is None:
            self.second = self.plan_second_pass(inputs)
            hires = inputs.request.hires
            assert hires is not None
            if hires.checkpoint is None:
                self.encode_second_pass(inputs, adapters)
        return first

    def plan_second_pass(self, inputs: RunInputs) -> HiresPass:
        request = inputs.request
        hires = request.hires
        assert hires is not None
        steps = hires.second_pass_steps or request.steps
        to_x, to_y, cut_x, cut_y = hires.target(request.width, request.height)
        sampler = resolve_sampler(
            hires.sampler_name or request.sampler_name,
            hires.scheduler if hires.scheduler is not None else request.scheduler,
        )
        hr_request = replace(
            request,
            prompt=hires.prompt or request.prompt,
            negative_prompt=hires.negative_prompt or request.negative_prompt,
            width=to_x // 8 * 8 - cut_x * 8,
            height=to_y // 8 * 8 - cut_y * 8,
        )
        hr_inputs = check_request(hr_request)
        # loractl's hr=/hrte=/hrunet= weights are the second pass's
        hires_stack = tuple(spec.for_hires() for spec in hr_inputs.stack)
        hr_inputs = replace(
            hr_inputs,
            sampler=sampler,
            seed=inputs.seed,
            subseed=inputs.subseed,
            stack=hires_stack,
        )
        return HiresPass(hr_inputs, sampler, steps, (to_x, to_y, cut_x, cut_y))

    def encode_second_pass(self, inputs: RunInputs, adapters: Adapters | None) -> None:
        """The hires stack applied and the hires prompts encoded on the current model. On
        the first pass's model (`adapters`: what it has applied) its stack is put back
        afterwards; a hires checkpoint (None) keeps the hires stack."""
        second = self.second
        own_model = adapters is None
        hr_adapters = adapters
        if hr_adapters is None or second.inputs.stack != inputs.stack:
            hr_adapters = self.apply_adapters(second.inputs)
        second.conditioning = super().encode_prompts(
            second.inputs, hr_adapters, hires_steps=second.steps
        )
        second.adapters = hr_adapters
        if not own_model and second.inputs.stack != inputs.stack:
            self.apply_adapters(inputs)

    def before_batch(self, inputs: RunInputs, adapters: Adapters) -> None:
        if self.first is not None:
            if self.model is not self.first:  # back from the hires checkpoint
                assert self.switch_model is not None
                self.model = self.switch_model(self.first)
            return
        if self.second.inputs.stack != inputs.stack:
            self.apply_adapters(inputs)  # the last batch's second pass changed the stack

    def prepare_other_checkpoints(self, inputs: RunInputs) -> None:
        """The `hr_checkpoint_name` model loaded with the second pass's VAE and stack (as
        `use_hires_checkpoint` makes them), then the refiner with the fitting part of that
        stack (it refines the second pass)."""
        second = self.plan_second_pass(inputs)
        hires = inputs.request.hires
        assert hires is not None
        if hires.checkpoint is not None:
            own = self.model
            self.model = self.require_switch()(hires.checkpoint)
            if self.model is not own:
                self.apply_vae(inputs)
                self.apply_adapters(second.inputs)
        if self.refiner is not None and self.refiner.may_switch:
            self.refiner.activate(self, second.inputs)

    def require_switch(self) -> Callable[[str | ActiveModel], ActiveModel]:
        """The engine's model switch; a runner without one cannot use `hr_checkpoint_name`."""
        if self.switch_model is None:
            raise InvalidRequestError(
                "hr_checkpoint_name: this runner cannot switch checkpoints",
                field="hr_checkpoint_name",
            )
        return self.switch_model

    def use_hires_checkpoint(self, inputs: RunInputs) -> None:
        """Switch to the `hr_checkpoint_name` model (A1111 reloads weights between the
        passes) and make the second pass's stack and conditioning on it."""
        hires = inputs.request.hires
        assert hires is not None and hires.checkpoint is not None
        switch_model = self.require_switch()
        if self.first is None:
            self.first = self.model
        self.model = switch_model(self.hires_model or hires.checkpoint)
        self.hires_model = self.model
        self.apply_vae(inputs)  # A1111 resolves the VAE again for the new checkpoint
        self.encode_second_pass(inputs, None)

    def after_denoise(
        self, inputs: RunInputs, latents: torch.Tensor, seeds: SeedPlan, iteration: int
    ) -> tuple[RunInputs, torch.Tensor]:
        """Upscale, noise and denoise again (nothing more once interrupted or skipped)."""
        if self.control.interrupted or self.control.skipped:
            return inputs, latents
        second = self.second
        hires = inputs.request.hires
        assert hires is not None
        to_x, to_y, cut_x, cut_y = second.size
        if hires.upscaler in LATENT_UPSCALE_MODES:
            mode, antialias = LATENT_UPSCALE_MODES[hires.upscaler]
            upscaled = torch.nn.functional.interpolate(
                latents, size=(to_y // 8, to_x // 8), mode=mode, antialias=antialias
            )
            if hires.checkpoint is not None:
                self.use_hires_checkpoint(inputs)
        else:  # decoded by the first pass's VAE, encoded by the second pass's
            images = self.upscale_images(inputs, latents, to_x, to_y, hires.upscaler)
            if hires.checkpoint is not None:
                self.use_hires_checkpoint(inputs)
            upscaled = self.encode_images(images)
        assert second.conditioning is not None and second.adapters is not None
        height, width = upscaled.shape[-2:]
        upscaled = upscaled[
            :, :, cut_y // 2 : height - (cut_y + 1) // 2, cut_x // 2 : width - (cut_x + 1) // 2
        ]
        if hires.checkpoint is None and second.inputs.stack != inputs.stack:
            self.apply_adapters(second.inputs)
        scheduler = make_scheduler(second.sampler, self.model.scheduler_config)
        total, t_enc = img2img_steps(second.steps, inputs.request.denoising_strength, True)
        set_timesteps(scheduler, second.sampler, total, self.plan.device)
        start = (total - t_enc - 1) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        tail = scheduler.timesteps[start:]
        noise, generators = self.seeded_noise(second.inputs, seeds, scheduler)
        noisy = scheduler.add_noise(upscaled.to(noise.dtype), noise, tail[:1])
        self.control.batch(iteration * 2 + 1, inputs.request.n_iter * 2, len(tail))
        self.hires_pass = True
        try:
            result = self.denoise(
                second.inputs, second.conditioning, noisy, generators, scheduler, tail
            )
        finally:
            self.hires_pass = False
        return second.inputs, result

    def upscale_images(
        self, inputs: RunInputs, latents: torch.Tensor, width: int, height: int, upscaler: str
    ) -> list[Image.Image]:
        """Decode and resize each image with the upscaler (A1111's non-latent hires path;
        8-bit images in between, as A1111)."""
        images = self.post_process(self.decode(inputs, latents))
        upscaling = self.upscaling()
        return [upscaling.resize(image, width, height, upscaler) for image in images]

    def encode_images(self, images: list[Image.Image]) -> torch.Tensor:
        arrays = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        pixels = torch.from_numpy(arrays).permute(0, 3, 1, 2)
        return encode_pixels(self.model.pipe.vae, pixels, self.dtype).to(self.plan.device)

    def result(
        self,
        inputs: RunInputs,
        adapters: Adapters,
        images: list[Image.Image],
        seeds: list[int],
        subseeds: list[int],
    ) -> GenerationResult:
        second = self.second
        applied = list(adapters.applied)
        if second.adapters is not None:
            applied += [item for item in second.adapters.applied if item not in applied]
        merged = Adapters(applied, adapters.text_state, adapters.notes, adapters.coverage)
        if self.first is not None:
            self.model = self.first  # `Model:` is the first pass's checkpoint (A1111)
        return super().result(inputs, merged, images, seeds, subseeds)

    def extra_infotext(self, inputs: RunInputs) -> dict[str, object]:
        """A1111's hires keys, in its order."""
        request = inputs.request
        hires = request.hires
        assert hires is not None
        params: dict[str, object] = {}
        if hires.resize_x == 0 and hires.resize_y == 0:
            params["Hires upscale"] = hires.scale
        else:
            params["Hires resize"] = f"{hires.resize_x}x{hires.resize_y}"
        if hires.second_pass_steps:
            params["Hires steps"] = hires.second_pass_steps
        params["Hires upscaler"] = hires.upscaler
        if hires.checkpoint is not None:
            entry = self.folders.resolve("checkpoint", hires.checkpoint)
            short = entry.short_hash
            params["Hires checkpoint"] = (
                f"{entry.infotext_name} [{short}]" if short else entry.infotext_name
            )
        if hires.sampler_name and hires.sampler_name != request.sampler_name:
            params["Hires sampler"] = self.second.sampler.sampler
        if hires.scheduler is not None and hires.scheduler != request.scheduler:
            params["Hires schedule type"] = self.second.sampler.label
        if hires.prompt and hires.prompt != request.prompt:
            params["Hires prompt"] = hires.prompt
        if hires.negative_prompt and hires.negative_prompt != request.negative_prompt:
            params["Hires negative prompt"] = hires.negative_prompt
        return params
