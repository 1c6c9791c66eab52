"""img2img, inpainting and outpainting as A1111 1.10 does them (`modules/processing.py`
`StableDiffusionProcessingImg2Img`, `modules/sd_samplers_common.py`,
`modules/sd_samplers_cfg_denoiser.py`), as steps of the txt2img run:

- check inputs also prepares the images: the mask (binary, inverted, blurred), the "only
  masked" crop, resize mode, masked-content fill and the overlay that puts the original's
  unmasked pixels back at the end;
- prepare latents encodes the init images, applies the latent masked content, and noises
  them to the first sigma of the schedule's tail: `int(min(strength, 0.999) * steps) + 1`
  sampler steps of a `steps`-long schedule (A1111's `setup_img2img_steps`, including its
  "do exactly the amount of steps the slider specifies" option);
- the denoising loop blends each step's denoised image with the original outside the
  (rounded, latent-size) mask, as A1111's CFG denoiser does, and inpainting (9-channel)
  UNets get the mask and the masked image's latents they were trained with;
- post-processing composites the original back outside the blurred mask.

Differences, all below what a person can see: the VAE encodes to its distribution's mean
(A1111 samples it with the global RNG, so its img2img is not reproducible from the seed);
A1111 blends the noisy latent before the UNet for its DDIM/PLMS/UniPC samplers and the
denoised image for the others, here every sampler blends the denoised image; "latent
noise" uses each batch's own seeds (A1111 reuses the first batch's).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.controlnet.units import MaskCrop
from pipelines.errors import InvalidRequestError
from pipelines.generation.denoise import DenoiseLoop
from pipelines.generation.noise import SeedPlan
from pipelines.generation.run import LARGE_DECODE_PIXELS, Conditioning, RunInputs, Txt2ImgRun
from pipelines.imageops import (
    FILL_LATENT_NOISE,
    FILL_LATENT_NOTHING,
    FILL_ORIGINAL,
    LATENT_RESIZE,
    MASKED_CONTENT,
    apply_overlay,
    binary_mask,
    blur_mask,
    crop_region,
    expand_crop_region,
    fill,
    flatten,
    overlay_of,
    resize_image,
)
from pipelines.samplers import set_timesteps
from pipelines.schema import GenerationRequest, GenerationResult, ImageInputs

MAX_LATENT_RESIZE_SIDE = 2048
"""Largest init image side resize mode 3 encodes at its own size (it is not resized first)."""


@dataclass
class PreparedImages:
    """The init images at the processing size, and what inpainting needs afterwards."""

    pixels: torch.Tensor  # [N, 3, H, W] in [0, 1], after masked-content fill
    image_mask: Image.Image | None  # processing-size mask, L, white = repaint
    overlays: list[Image.Image] | None  # per image: the original outside the mask, RGBA
    paste_to: tuple[int, int, int, int] | None  # "only masked": (x, y, w, h) in the original
    infotext: dict[str, object]
    notes: list[str]
    size: tuple[int, int] = (0, 0)  # the (first) init image's, before any resize


def img2img_steps(steps: int, strength: float, fix_steps: bool) -> tuple[int, int]:
    """A1111's `setup_img2img_steps`: (schedule length, t_enc); the sampler runs t_enc + 1
    steps on the schedule's tail. With `fix_steps` the schedule is stretched so exactly
    `steps` steps run (strength 0 has no stretched schedule: it runs the one-step tail)."""
    if fix_steps and strength > 0:
        return int(steps / min(strength, 0.999)), steps - 1
    return steps, int(min(strength, 0.999) * steps)


def prepare_images(inputs: ImageInputs, width: int, height: int, seed: int) -> PreparedImages:
    """A1111's `StableDiffusionProcessingImg2Img.init` up to the VAE: mask, crop, resize,
    fill and overlays, all in Pillow."""
    notes: list[str] = []
    params: dict[str, object] = {}
    images = [flatten(image) for image in inputs.images]
    mask = inputs.mask
    full_res = inputs.inpaint_full_res
    resize_mode = inputs.resize_mode
    masked_content = inputs.inpainting_fill
    blur_x, blur_y = inputs.mask_blur_x, inputs.mask_blur_y
    if inputs.outpaint is not None:
        from pipelines.outpainting import outpaint_canvas  # only outpainting needs it

        canvas, mask = outpaint_canvas(images[0], inputs.outpaint, seed)
        images = [canvas]
        full_res, resize_mode, blur_x, blur_y = False, 0, 0, 0  # the canvas mask is blurred
        if inputs.outpaint.method == "outpainting mk2":
            masked_content = FILL_ORIGINAL  # the matched noise is the content
    image_mask: Image.Image | None = None
    mask_for_overlay: Image.Image | None = None
    box = None
    paste_to = None
    if mask is not None:
        first = images[0]
        image_mask = binary_mask(mask, inputs.mask_round)
        if image_mask.size != first.size:
            notes.append(
                f"the mask is {image_mask.width}x{image_mask.height} and the init image "
                f"{first.width}x{first.height}: the mask was resized to the image"
            )
            image_mask = image_mask.resize(first.size, Image.Resampling.LANCZOS)
        if inputs.inpainting_mask_invert:
            image_mask = Image.eval(image_mask, lambda v: 255 - v)
            params["Mask mode"] = "Inpaint not masked"
        image_mask = blur_mask(image_mask, blur_x, blur_y)
        if (blur_x > 0 or blur_y > 0) and blur_x == blur_y:
            params["Mask blur"] = blur_x
        if full_res:
            box = crop_region(image_mask, inputs.inpaint_full_res_padding)
            if box is None:
                notes.append(
                    'Unable to perform "Inpaint Only mask" because mask is blank, '
                    "switch to img2img mode."
                )
                image_mask = None
            else:
                mask_for_overlay = image_mask
                box = expand_crop_region(box, width, height, *image_mask.size)
                x1, y1, x2, y2 = box
                image_mask = resize_image(2, image_mask.crop(box), width, height).convert("L")
                paste_to = (x1, y1, x2 - x1, y2 - y1)
                params["Inpaint area"] = "Only masked"
                params["Masked area padding"] = inputs.inpaint_full_res_padding
        else:
            overlay_mode = 0 if resize_mode == LATENT_RESIZE else resize_mode
            image_mask = resize_image(overlay_mode, image_mask, width, height).convert("L")
            doubled = np.clip(np.array(image_mask).astype(np.float32) * 2, 0, 255)
            mask_for_overlay = Image.fromarray(doubled.astype(np.uint8))
    overlays: list[Image.Image] | None = [] if image_mask is not None else None
    arrays = []
    for image in images:
        if box is None and resize_mode != LATENT_RESIZE:
            image = resize_image(resize_mode, image, width, height)
        elif box is None and image_mask is not None:
            image = resize_image(0, image, width, height)  # the latent stretch, in pixels
        if overlays is not None and mask_for_overlay is not None:
            overlay_mask = mask_for_overlay
            if overlay_mask.size != image.size:
                overlay_mask = resize_image(resize_mode, overlay_mask, *image.size).convert("L")
            overlays.append(overlay_of(image, overlay_mask))
        if box is not None:
            image = resize_image(2, image.crop(box), width, height)
        if image_mask is not None and masked_content != FILL_ORIGINAL:
            image = fill(image, image_mask)
            if masked_content == 0:
                params["Masked content"] = MASKED_CONTENT[0]
        arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
    if image_mask is not None and masked_content in (FILL_LATENT_NOISE, FILL_LATENT_NOTHING):
        params["Masked content"] = MASKED_CONTENT[masked_content]
    if inputs.initial_noise_multiplier != 1.0:
        params["Noise multiplier"] = inputs.initial_noise_multiplier
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return PreparedImages(pixels, image_mask, overlays, paste_to, params, notes, images[0].size)


def encode_pixels(vae: Any, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N, 3, H, W] pixels in [0, 1] -> scaled latents [N, C, H/8, W/8] in `dtype`: the
    distribution's mean, upcast like decoding for VAEs that need fp32, tiled when large."""
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(dtype=torch.float32)
    large = pixels.shape[-1] * pixels.shape[-2] > LARGE_DECODE_PIXELS
    if large:
        vae.enable_tiling()
    try:
        with torch.no_grad():
            sample = (pixels * 2 - 1).to(device=vae.device, dtype=vae.dtype)
            latents = vae.encode(sample).latent_dist.mode()
    finally:
        if large:
            vae.disable_tiling()
        if upcast:
            vae.to(dtype=torch.float16)
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, -1, 1, 1).to(latents)
        std_t = torch.tensor(std).view(1, -1, 1, 1).to(latents)
        latents = (latents - mean_t) * vae.config.scaling_factor / std_t
    else:
        latents = latents * vae.config.scaling_factor
    return latents.to(dtype)


def step_sigma(scheduler: Any, timestep: torch.Tensor) -> float:
    """The k-diffusion sigma of the step being taken: the scheduler's own sigma ladder when
    it has one, else from its alphas at the (integer) timestep."""
    sigmas = getattr(scheduler, "sigmas", None)
    index = getattr(scheduler, "step_index", None)
    if index is None:  # before the first step: where img2img's tail begins
        index = getattr(scheduler, "begin_index", None)
    if sigmas is not None and index is not None and index < len(sigmas):
        return float(sigmas[index])
    alpha = float(scheduler.alphas_cumprod[int(timestep)])
    return math.sqrt((1 - alpha) / alpha)


class Img2ImgRun(Txt2ImgRun):
    """img2img, inpainting and outpainting on one loaded model (see the module docstring).

    Example:
        >>> Img2ImgRun(model, plan, folders, control)(request)  # doctest: +SKIP
    """

    job = "img2img"
    prepared: PreparedImages
    keep: torch.Tensor | None  # [1, 1, h, w], 1 where the original is kept
    init_latents: torch.Tensor

    def __call__(self, request: GenerationRequest) -> GenerationResult:
        assert request.img2img is not None
        count = len(request.img2img.images)
        if count > 1:  # several init images: one batch of them (A1111)
            request = replace(request, batch_size=count)
        return super().__call__(request)

    # -- 1

    def check_inputs(self, request: GenerationRequest) -> RunInputs:
        inputs = super().check_inputs(request)
        spec = request.img2img
        assert spec is not None
        if spec.resize_mode == LATENT_RESIZE and spec.mask is None and spec.outpaint is None:
            big = [image.size for image in spec.images if max(image.size) > MAX_LATENT_RESIZE_SIDE]
            if big:
                raise InvalidRequestError(
                    f"resize_mode 3 (latent upscale) encodes the init image at its own size; "
                    f"{big[0][0]}x{big[0][1]} is over {MAX_LATENT_RESIZE_SIDE} pixels a side: "
                    "resize it first or use another resize mode",
                    field="resize_mode",
                )
        self.prepared = prepare_images(spec, request.width, request.height, inputs.seed)
        inputs.notes.extend(self.prepared.notes)
        return inputs

    def control_input(self, inputs: RunInputs) -> tuple[Image.Image | None, str]:
        """sd-webui-controlnet: a unit without an image takes the first init image, with
        img2img's resize mode (3, latent, counts as Just Resize)."""
        spec = inputs.request.img2img
        assert spec is not None
        modes = ("Just Resize", "Crop and Resize", "Resize and Fill", "Just Resize")
        return flatten(spec.images[0]), modes[spec.resize_mode]

    def control_crop(self) -> MaskCrop | None:
        """sd-webui-controlnet: with "only masked", units' images get the init image's
        crop box (its size, the box)."""
        paste_to = self.prepared.paste_to
        if paste_to is None:
            return None
        x, y, w, h = paste_to
        return self.prepared.size, (x, y, x + w, y + h)

    # -- 4

    def timesteps(self, inputs: RunInputs, scheduler: Any) -> torch.Tensor:
        """The tail of a full-length schedule (idempotent: set again, same tail)."""
        request = inputs.request
        spec = request.img2img
        assert spec is not None
        total, t_enc = img2img_steps(request.steps, request.denoising_strength, spec.fix_steps)
        set_timesteps(scheduler, inputs.sampler, total, self.plan.device)
        start = (total - t_enc - 1) * scheduler.order
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        return scheduler.timesteps[start:]

    def prepare_latents(
        self, inputs: RunInputs, seeds: SeedPlan, scheduler: Any
    ) -> tuple[torch.Tensor, list[torch.Generator]]:
        """The init latents, masked content applied, noised to the tail's first sigma with
        this batch's seeded noise (times `initial_noise_multiplier`)."""
        noise, generators = self.seeded_noise(inputs, seeds, scheduler)
        request = inputs.request
        spec = request.img2img
        assert spec is not None
        vae = self.model.pipe.vae
        init = encode_pixels(vae, self.prepared.pixels, self.dtype).to(self.plan.device)
        if spec.resize_mode == LATENT_RESIZE and init.shape[-2:] != noise.shape[-2:]:
            init = torch.nn.functional.interpolate(init, size=noise.shape[-2:], mode="bilinear")
        count = noise.shape[0]
        if init.shape[0] == 1 and count > 1:
            init = init.repeat(count, 1, 1, 1)
        self.keep = None
        if self.prepared.image_mask is not None:
            keep = self.latent_keep_mask(init.shape[-2:], spec.mask_round)
            if spec.inpainting_fill == FILL_LATENT_NOISE and spec.outpaint is None:
                init = init * keep + noise * (1 - keep)
            elif spec.inpainting_fill == FILL_LATENT_NOTHING and spec.outpaint is None:
                init = init * keep
            self.keep = keep
        self.init_latents = init
        tail = self.timesteps(inputs, scheduler)
        noisy = scheduler.add_noise(init, noise * spec.initial_noise_multiplier, tail[:1])
        return noisy, generators

    def latent_keep_mask(self, size: torch.Size, rounded: bool) -> torch.Tensor:
        """A1111's `self.mask` [1, 1, h, w]: 1 where the original is kept, from the
        processing-size mask resized to the latents (bicubic, then rounded)."""
        image_mask = self.prepared.image_mask
        assert image_mask is not None
        height, width = size
        small = np.asarray(image_mask.convert("RGB").resize((width, height)), dtype=np.float32)
        repaint = small[..., 0] / 255
        if rounded:
            repaint = np.around(repaint)
        keep = torch.from_numpy(1.0 - repaint)[None, None]
        return keep.to(device=self.plan.device, dtype=self.dtype)

    # -- 5

    def denoise_loop(
        self,
        inputs: RunInputs,
        conditioning: Conditioning,
        count: int,
        generators: list[torch.Generator],
        scheduler: Any,
    ) -> DenoiseLoop:
        loop = super().denoise_loop(inputs, conditioning, count, generators, scheduler)
        if self.keep is not None:
            loop.on_prediction.append(self.blend_denoised(scheduler))
        return loop

    def blend_denoised(
        self, scheduler: Any
    ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]:
        """A1111's mask blend inside the loop: the step's denoised image becomes
        `denoised * nmask + init * mask`; the prediction is rewritten to the one that
        denoises to exactly that, for any scheduler and prediction type."""
        keep = self.keep
        init = self.init_latents
        assert keep is not None
        prediction_type = scheduler.config.prediction_type
        sigma_space = scheduler.init_noise_sigma > 1  # latents are x0 + sigma * eps

        def blend(
            prediction: torch.Tensor, latents: torch.Tensor, timestep: torch.Tensor, index: int
        ) -> torch.Tensor:
            sigma = step_sigma(scheduler, timestep)
            a = 1 / math.sqrt(1 + sigma * sigma)  # x_t = a * x0 + b * eps
            b = sigma * a
            pred = prediction.float()
            x_t = latents.float() * (a if sigma_space else 1.0)
            if prediction_type == "v_prediction":
                denoised = a * x_t - b * pred
                changed = pred - keep * (init - denoised) / b
            elif prediction_type == "sample":
                changed = pred * (1 - keep) + init * keep
            else:
                denoised = (x_t - b * pred) / a
                changed = pred - keep * (init - denoised) * a / b
            return changed.to(prediction.dtype)

        return blend

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
        """Then, as A1111, the original's latents outside the mask once more."""
        samples = super().denoise(
            inputs, conditioning, latents, generators, scheduler, timesteps, refine=refine
        )
        if self.keep is None:
            return samples
        return samples * (1 - self.keep) + self.init_latents * self.keep

    def inpainting_input(
        self, inputs: RunInputs, count: int, copies: int
    ) -> Callable[[torch.Tensor, int], torch.Tensor]:
        """A1111's `inpainting_image_conditioning`: the mask (rounded unless `mask_round` is
        off) and the latents of the image with the masked part blanked (the whole image
        without a mask)."""
        pixels = self.prepared.pixels
        image_mask = self.prepared.image_mask
        height, width = inputs.request.height, inputs.request.width
        if pixels.shape[-2:] != (height, width):  # resize mode 3: conditioning at size
            pixels = torch.nn.functional.interpolate(pixels, size=(height, width), mode="bicubic")
        if image_mask is None:
            mask = torch.ones(1, 1, height, width)
        else:
            array = np.asarray(image_mask.convert("L"), dtype=np.float32) / 255.0
            mask = torch.from_numpy(array)[None, None]
            spec = inputs.request.img2img
            if spec is None or spec.mask_round:
                mask = torch.round(mask)
        source = pixels * 2 - 1
        blanked = (source * (1 - mask) + 1) / 2  # back to [0, 1] for encode_pixels
        masked = encode_pixels(self.model.pipe.vae, blanked, self.dtype)
        small = torch.nn.functional.interpolate(mask, size=masked.shape[-2:]).to(masked)
        extra = torch.cat([small.expand(masked.shape[0], -1, -1, -1), masked], dim=1)
        if extra.shape[0] == 1:
            extra = extra.repeat(count, 1, 1, 1)
        extra = extra.repeat(copies, 1, 1, 1).to(self.plan.device)

        def add_channels(model_input: torch.Tensor, index: int) -> torch.Tensor:
            return torch.cat([model_input, extra.to(model_input)], dim=1)

        return add_channels

    # -- 7

    def post_process(self, pixels: torch.Tensor) -> list[Image.Image]:
        """The original's unmasked pixels back on top ("only masked": the result pasted
        into the original's frame first)."""
        images = super().post_process(pixels)
        overlays = self.prepared.overlays
        if not overlays:
            return images
        return [
            apply_overlay(image, self.prepared.paste_to, overlays[i % len(overlays)])
            for i, image in enumerate(images)
        ]

    def extra_infotext(self, inputs: RunInputs) -> dict[str, object]:
        params = dict(self.prepared.infotext)
        if self.model.architecture.is_inpainting:
            params["Conditional mask weight"] = 1.0
        return params
