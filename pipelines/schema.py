"""Generation request and result types, with their bounds: the one source of truth.

The UI sliders, the A1111 API validation and the CLI flags are all built from `FIELDS`
and `Bounds`, so a parameter is declared once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any

from PIL import Image

from pipelines.errors import InvalidRequestError
from pipelines.lora.coverage import LoraCoverage
from pipelines.lora.weights import (
    BlockWeights,
    Weight,
    WeightSchedule,
    is_scheduled,
    preset_names,
)

SEED_MAX = 2**32 - 1
RANDN_SOURCES = ("GPU", "CPU", "NV")
"""A1111's `randn_source` values (see `generation.noise`)."""


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a stack: `weight` acts on the UNet, `te_weight` on the text encoder(s).

    `te_weight=None` means "same as weight" (A1111's `<lora:name:w>`). A weight is a
    number or keyframes over the steps of a pass (`WeightSchedule`, loractl's `0@0,1@0.5`).
    `blocks` scales the weight per UNet block (and, with lbw's BASE, the text encoders).
    `hr_weight` / `hr_te_weight` are the hires pass's (loractl's `hrunet=`/`hrte=`; None:
    the first pass's).
    """

    name: str
    weight: Weight = 1.0
    te_weight: Weight | None = None
    blocks: BlockWeights | None = None
    hr_weight: Weight | None = None
    hr_te_weight: Weight | None = None

    @property
    def text_encoder_weight(self) -> Weight:
        return self.weight if self.te_weight is None else self.te_weight

    @property
    def scheduled(self) -> bool:
        """Whether a weight of this pass changes between steps."""
        return is_scheduled(self.weight) or is_scheduled(self.te_weight)

    @property
    def plain(self) -> bool:
        """Whether a stack row `{name, weight, te_weight}` of numbers says all of it."""
        return self.steady and self.blocks is None

    @property
    def steady(self) -> bool:
        """Whether its weights are numbers, the same in both passes (no keyframes, no hr)."""
        return (
            not isinstance(self.weight, WeightSchedule)
            and not isinstance(self.te_weight, WeightSchedule)
            and self.hr_weight is None
            and self.hr_te_weight is None
        )

    def for_hires(self) -> LoraSpec:
        """The spec the hires pass applies: its hr weights in place of the first pass's."""
        if self.hr_weight is None and self.hr_te_weight is None:
            return self
        unet = self.weight if self.hr_weight is None else self.hr_weight
        te = self.text_encoder_weight if self.hr_te_weight is None else self.hr_te_weight
        return LoraSpec(self.name, unet, None if te == unet else te, self.blocks)


LBW_PRESETS: tuple[str, ...] = tuple(preset_names())
"""lora-block-weight preset names (SD1/SD2's, then SDXL's), for front ends' pickers."""


OUTPAINT_DIRECTIONS = ("left", "right", "up", "down")
OUTPAINT_METHODS = ("poor man's outpainting", "outpainting mk2")
"""A1111's outpainting scripts, by the names API clients send as `script_name`."""


@dataclass(frozen=True)
class Outpaint:
    """Extend the canvas by `pixels` in `directions` and inpaint only the new area.

    `method` picks how the new area is filled before inpainting: "outpainting mk2" with
    noise matched to the image (`noise_q`, `color_variation`), "poor man's outpainting"
    with the img2img `inpainting_fill` choice.
    """

    pixels: int = 128
    directions: tuple[str, ...] = OUTPAINT_DIRECTIONS
    method: str = "outpainting mk2"
    mask_blur: int = 8
    noise_q: float = 1.0
    color_variation: float = 0.05


@dataclass(frozen=True)
class SdUpscale:
    """A1111's "SD upscale" img2img script: upscale the init image by `scale` with
    `upscaler`, then img2img it in tiles of the request's size overlapping by `overlap`
    pixels and blend the tiles back together."""

    scale: float = 2.0
    upscaler: str = "Lanczos"
    overlap: int = 64


@dataclass(frozen=True)
class ImageInputs:
    """What img2img and inpainting add to a request (A1111's names and API defaults).

    `images`: one init image (repeated over the batch) or up to `batch_size` of them.
    `mask`: white = repaint (an RGBA mask is read from its alpha). `resize_mode`: 0 just
    resize, 1 crop and resize, 2 resize and fill, 3 just resize in latent space.
    `inpainting_fill`: 0 fill, 1 original, 2 latent noise, 3 latent nothing.
    `inpaint_full_res`: "only masked" (crop the masked region plus the padding, generate at
    the request size, paste back). `fix_steps`: A1111's "do exactly the amount of steps
    the slider specifies" (`img2img_fix_steps`).
    """

    images: tuple[Image.Image, ...]
    mask: Image.Image | None = None
    resize_mode: int = 0
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: bool = False
    initial_noise_multiplier: float = 1.0
    fix_steps: bool = False
    outpaint: Outpaint | None = None
    sd_upscale: SdUpscale | None = None

    @property
    def inpainting(self) -> bool:
        return self.mask is not None or self.outpaint is not None


LATENT_UPSCALE_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
"""A1111's latent upscalers: name -> (torch interpolation mode, antialias)."""
PIXEL_UPSCALERS = ("None", "Lanczos", "Nearest")
"""A1111's built-in pixel upscalers (model upscalers are listed by the folders)."""


@dataclass(frozen=True)
class HiresFix:
    """A1111's hires fix: a second img2img pass over the upscaled first pass.

    `scale` applies unless `resize_x`/`resize_y` ask for a size (one of them 0: keep the
    aspect ratio; both: cover that size and crop the excess, as A1111). `second_pass_steps`
    0 means the first pass's steps; `sampler_name`/`scheduler` None mean the first pass's;
    an empty `prompt`/`negative_prompt` means the first pass's. The request's
    `denoising_strength` is the second pass's. `checkpoint` (A1111's
    `hr_checkpoint_name`) runs the second pass on another checkpoint of the same family;
    None means the first pass's.
    """

    scale: float = 2.0
    resize_x: int = 0
    resize_y: int = 0
    upscaler: str = "Latent"
    second_pass_steps: int = 0
    sampler_name: str | None = None
    scheduler: str | None = None
    prompt: str = ""
    negative_prompt: str = ""
    checkpoint: str | None = None

    def target(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(upscale_to_x, upscale_to_y, truncate_x, truncate_y) as A1111's
        `calculate_target_resolution` (truncation in latent pixels, 8 per unit)."""
        if self.resize_x == 0 and self.resize_y == 0:
            return int(width * self.scale), int(height * self.scale), 0, 0
        if self.resize_y == 0:
            return self.resize_x, self.resize_x * height // width, 0, 0
        if self.resize_x == 0:
            return self.resize_y * width // height, self.resize_y, 0, 0
        if width / height < self.resize_x / self.resize_y:
            to_x, to_y = self.resize_x, self.resize_x * height // width
        else:
            to_x, to_y = self.resize_y * width // height, self.resize_y
        return to_x, to_y, (to_x - self.resize_x) // 8, (to_y - self.resize_y) // 8

    def final_size(self, width: int, height: int) -> tuple[int, int]:
        """The size of the images the second pass returns."""
        to_x, to_y, cut_x, cut_y = self.target(width, height)
        return to_x // 8 * 8 - cut_x * 8, to_y // 8 * 8 - cut_y * 8


CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
"""sd-webui-controlnet's control modes, by name (the API also takes their index 0, 1, 2)."""
CONTROL_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")
"""sd-webui-controlnet's resize modes for a unit's image, by name (index 0, 1, 2)."""
HR_OPTIONS = ("Both", "Low res only", "High res only")
"""sd-webui-controlnet's `hr_option`: which hires fix passes a unit acts in."""
MAX_CONTROLNET_UNITS = 10
"""sd-webui-controlnet's largest `control_net_unit_count`."""


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet unit, as sd-webui-controlnet's `ControlNetUnit` (its API names).

    `image` is the control image (None in img2img: the init image, with img2img's resize
    mode, as sd-webui-controlnet does); `mask` is sent with it by canvas clients (a mask
    that is neither all black nor all white replaces the image: sd-webui-controlnet's
    "canvas scribble"). `module` is a preprocessor name or label, `model` a listed
    ControlNet model (`stem [hash]`, its stem, or its path). `processor_res`, `threshold_a`
    and `threshold_b` outside the module's slider ranges (-1: not sent) mean the module's
    defaults. `guidance_start`/`guidance_end` are fractions of the sampling steps; with
    `pixel_perfect` the processor resolution is computed from the image and target sizes.
    """

    image: Image.Image | None = None
    mask: Image.Image | None = None
    module: str = "none"
    model: str = "None"
    weight: float = 1.0
    resize_mode: str = "Crop and Resize"
    processor_res: int = -1
    threshold_a: float = -1.0
    threshold_b: float = -1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    pixel_perfect: bool = False
    control_mode: str = "Balanced"
    hr_option: str = "Both"
    save_detected_map: bool = True
    inpaint_crop_input_image: bool = True
    """In inpainting with "only masked", crop the unit's image with the mask's crop box
    (sd-webui-controlnet's default), so the control lines up with the cropped region."""


REFINER_SWITCH_AT = 0.8
"""A1111's default for "Switch at": the fraction of the timesteps done on the first model."""


@dataclass(frozen=True)
class Bounds:
    """Admin-configurable request limits (contract defaults)."""

    min_size: int = 64
    max_size: int = 2048
    max_steps: int = 150
    max_batch_size: int = 8
    max_n_iter: int = 100
    max_prompt_chars: int = 20_000
    max_cfg: float = 30.0
    max_pixels: int = 1024 * 1024


@dataclass(frozen=True)
class FieldSpec:
    """How one request field looks to every front end."""

    name: str
    kind: type
    default: Any
    label: str
    minimum: float | None = None
    maximum: float | None = None
    step: float | None = None
    help: str = ""


VAE_AUTOMATIC = "Automatic"
VAE_NONE = "None"
"""A1111's special `sd_vae` values: the VAE beside the checkpoint, else its own; its own."""


@dataclass(frozen=True)
class GenerationRequest:
    """Everything that determines an image; every front end builds exactly this.

    `checkpoint=None` means the engine's current model. `loras` is the UI/API stack;
    `<lora:...>` tags inside `prompt` are merged into it by the engine. `styles` names
    prompt styles (`styles.csv`); the service merges them into the prompts before queueing,
    so the runner sees the styled prompts and `styles` only records the names. `vae` is
    A1111's `sd_vae` for this request (see `pipelines.vae`).
    """

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0  # 0 or -1: off (A1111's API sends -1)
    seed_resize_from_h: int = 0
    width: int = 512
    height: int = 512
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "automatic"
    clip_skip: int = 1
    denoising_strength: float = 0.75
    tiling: bool = False
    randn_source: str = "CPU"  # A1111's noise source: "CPU", "GPU" or "NV"
    eta_noise_seed_delta: int = 0  # A1111's ENSD: sampling noise from seed + this (0: off)
    checkpoint: str | None = None
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)
    img2img: ImageInputs | None = None  # None: txt2img
    hires: HiresFix | None = None  # txt2img only
    styles: tuple[str, ...] = field(default_factory=tuple)
    vae: str = VAE_AUTOMATIC  # A1111's sd_vae: "Automatic", "None" or a listed VAE
    refiner_checkpoint: str | None = None  # None: no refiner
    refiner_switch_at: float = REFINER_SWITCH_AT
    controlnet: tuple[ControlNetUnit, ...] = field(default_factory=tuple)  # enabled units

    @property
    def kind(self) -> str:
        """A1111's job and output-folder kind: "txt2img" or "img2img"."""
        return "txt2img" if self.img2img is None else "img2img"

    def validated(self, bounds: Bounds) -> GenerationRequest:
        """Check every field against `bounds`; return the request with sizes rounded down
        to a multiple of 8 (as A1111 does). Raises InvalidRequestError naming the field."""
        return validate_request(self, bounds)


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "prompt",
        str,
        "",
        "Prompt",
        help="A1111 syntax: (word:1.2), [word], BREAK, <lora:name:weight>",
    ),
    FieldSpec("negative_prompt", str, "", "Negative prompt"),
    FieldSpec("steps", int, 20, "Sampling steps", 1, 150, 1),
    FieldSpec("cfg_scale", float, 7.0, "CFG scale", 0.0, 30.0, 0.5),
    FieldSpec("seed", int, -1, "Seed", -1, SEED_MAX, 1, "-1 picks a random seed"),
    FieldSpec("subseed", int, -1, "Variation seed", -1, SEED_MAX, 1, "-1 picks a random one"),
    FieldSpec(
        "subseed_strength",
        float,
        0.0,
        "Variation strength",
        0.0,
        1.0,
        0.01,
        "0 is the seed's image, 1 the variation seed's",
    ),
    FieldSpec(
        "seed_resize_from_w",
        int,
        0,
        "Resize seed from width",
        0,
        2048,
        8,
        "keep a seed's composition made at another size; 0: off",
    ),
    FieldSpec(
        "seed_resize_from_h",
        int,
        0,
        "Resize seed from height",
        0,
        2048,
        8,
        "keep a seed's composition made at another size; 0: off",
    ),
    FieldSpec("width", int, 512, "Width", 64, 2048, 8),
    FieldSpec("height", int, 512, "Height", 64, 2048, 8),
    FieldSpec("batch_size", int, 1, "Batch size", 1, 8, 1),
    FieldSpec("n_iter", int, 1, "Batch count", 1, 100, 1),
    FieldSpec("sampler_name", str, "DPM++ 2M", "Sampling method"),
    FieldSpec("scheduler", str, "automatic", "Schedule type"),
    FieldSpec("clip_skip", int, 1, "Clip skip", 1, 12, 1),
    FieldSpec("denoising_strength", float, 0.75, "Denoising strength", 0.0, 1.0, 0.01),
    FieldSpec(
        "refiner_switch_at",
        float,
        REFINER_SWITCH_AT,
        "Switch at",
        0.01,
        1.0,
        0.01,
        "fraction of sampling done when the refiner takes over (1: never)",
    ),
    FieldSpec("tiling", bool, False, "Tiling", help="make an image that tiles seamlessly"),
    FieldSpec(
        "randn_source",
        str,
        "CPU",
        "Random number source",
        help="CPU: the same image on every device; GPU: the model's device; "
        "NV: NVIDIA's generator on any device (A1111 images made on NVIDIA GPUs)",
    ),
    FieldSpec(
        "eta_noise_seed_delta",
        int,
        0,
        "Eta noise seed delta (ENSD)",
        0,
        SEED_MAX,
        1,
        "A1111's ENSD: ancestral samplers draw their sampling noise from seed + this "
        "(0: off; NovelAI-style images use 31337)",
    ),
)


def field_spec(name: str, bounds: Bounds | None = None) -> FieldSpec:
    """The spec of one field, with its limits taken from the admin's `bounds`."""
    spec = next(f for f in FIELDS if f.name == name)
    if bounds is None:
        return spec
    limits: dict[str, tuple[float, float]] = {
        "steps": (1, bounds.max_steps),
        "width": (bounds.min_size, bounds.max_size),
        "height": (bounds.min_size, bounds.max_size),
        "batch_size": (1, bounds.max_batch_size),
        "n_iter": (1, bounds.max_n_iter),
        "cfg_scale": (0.0, bounds.max_cfg),
    }
    if name in limits:
        low, high = limits[name]
        return replace(spec, minimum=low, maximum=high)
    return spec


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", field=name)
    if not low <= value <= high:
        raise InvalidRequestError(
            f"{name} must be between {low} and {high}, got {value}", field=name
        )
    return value


def _check_float(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", field=name)
    number = float(value)
    if not math.isfinite(number) or not low <= number <= high:
        raise InvalidRequestError(
            f"{name} must be a finite number between {low:g} and {high:g}, got {value}",
            field=name,
        )
    return number


def _check_text(name: str, value: object, limit: int) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string", field=name)
    if len(value) > limit:
        raise InvalidRequestError(
            f"{name} is {len(value)} characters long; the limit is {limit}", field=name
        )
    if "\x00" in value:
        raise InvalidRequestError(f"{name} contains a NUL character", field=name)
    return value


LORA_WEIGHT_LIMIT = 10.0
"""One range for every LoRA weight, wherever it is set (a stack row, a prompt tag, the API,
text-encoder, hires and keyframe weights): -10..10. A1111 has no limit; beyond ±10 a LoRA
gives only noise, and one range means a row never silently takes less than a tag."""


def size_adjustments(width: int, height: int) -> list[str]:
    """Notes for a size the run changes: not a multiple of 8 is rounded down (as A1111)."""
    if width % 8 == 0 and height % 8 == 0:
        return []
    rounded = f"{width // 8 * 8}x{height // 8 * 8}"
    return [f"size {width}x{height} rounded down to {rounded} (a multiple of 8, as A1111)"]


def _check_lora(index: int, spec: object) -> LoraSpec:
    return check_lora_spec(spec, f"loras[{index}]")


def check_lora_spec(spec: object, where: str) -> LoraSpec:
    """A stack row's or prompt tag's name and weights (`where` names it in the error)."""
    if not isinstance(spec, LoraSpec):
        raise InvalidRequestError(f"{where} must be a LoRA spec", field=where)
    if not isinstance(spec.name, str) or not spec.name.strip() or "\x00" in spec.name:
        raise InvalidRequestError(f"{where}.name must be a non-empty name", field=where)
    for label in ("weight", "te_weight", "hr_weight", "hr_te_weight"):
        weight = getattr(spec, label)
        if isinstance(weight, WeightSchedule):
            _check_schedule(f"{where}.{label}", weight)
        elif weight is not None or label == "weight":
            _check_float(f"{where}.{label}", weight, -LORA_WEIGHT_LIMIT, LORA_WEIGHT_LIMIT)
    if spec.blocks is not None:
        if not isinstance(spec.blocks, BlockWeights):
            raise InvalidRequestError(f"{where}.blocks must be block weights", field=where)
        spec.blocks.check(f"{where}.blocks")
    return spec


def _check_schedule(name: str, schedule: WeightSchedule) -> None:
    """Keyframes: at least one, weights in the weight bounds, positions rising from 0."""
    keyframes = schedule.keyframes
    if not isinstance(keyframes, tuple) or not keyframes:
        raise InvalidRequestError(f"{name} must hold at least one keyframe", field=name)
    positions = []
    for weight, at in keyframes:
        _check_float(name, weight, -LORA_WEIGHT_LIMIT, LORA_WEIGHT_LIMIT)
        positions.append(_check_float(f"{name} position", at, 0.0, 1e6))
    if any(b <= a for a, b in zip(positions, positions[1:], strict=False)):
        raise InvalidRequestError(
            f"{name}: keyframe positions must rise, got {positions}", field=name
        )


def validate_request(request: GenerationRequest, bounds: Bounds) -> GenerationRequest:
    """Validate all fields before any heavy work; see GenerationRequest.validated."""
    _check_text("prompt", request.prompt, bounds.max_prompt_chars)
    _check_text("negative_prompt", request.negative_prompt, bounds.max_prompt_chars)
    _check_int("steps", request.steps, 1, bounds.max_steps)
    _check_float("cfg_scale", request.cfg_scale, 0.0, bounds.max_cfg)
    if request.seed != -1:
        _check_int("seed", request.seed, 0, SEED_MAX)
    elif isinstance(request.seed, bool):
        raise InvalidRequestError("seed must be an integer", field="seed")
    if request.subseed != -1:
        _check_int("subseed", request.subseed, 0, SEED_MAX)
    elif isinstance(request.subseed, bool):
        raise InvalidRequestError("subseed must be an integer", field="subseed")
    _check_float("subseed_strength", request.subseed_strength, 0.0, 1.0)
    _check_int("seed_resize_from_w", request.seed_resize_from_w, -1, bounds.max_size)
    _check_int("seed_resize_from_h", request.seed_resize_from_h, -1, bounds.max_size)
    if request.randn_source not in RANDN_SOURCES:
        raise InvalidRequestError(
            f"randn_source must be one of {', '.join(RANDN_SOURCES)}, got {request.randn_source!r}",
            field="randn_source",
        )
    _check_int("eta_noise_seed_delta", request.eta_noise_seed_delta, 0, SEED_MAX)
    if not isinstance(request.tiling, bool):
        raise InvalidRequestError(
            f"tiling must be true or false, got {request.tiling!r}", field="tiling"
        )
    width = _check_int("width", request.width, bounds.min_size, bounds.max_size) // 8 * 8
    height = _check_int("height", request.height, bounds.min_size, bounds.max_size) // 8 * 8
    batch = _check_int("batch_size", request.batch_size, 1, bounds.max_batch_size)
    _check_int("n_iter", request.n_iter, 1, bounds.max_n_iter)
    _check_int("clip_skip", request.clip_skip, 1, 12)
    _check_float("denoising_strength", request.denoising_strength, 0.0, 1.0)
    if width * height * batch > bounds.max_pixels:
        raise InvalidRequestError(
            f"width x height x batch_size = {width}x{height}x{batch} = "
            f"{width * height * batch} pixels exceeds the limit of {bounds.max_pixels} "
            "(set by --max-pixels); use a smaller size or batch",
            field="width",
        )
    for name in ("sampler_name", "scheduler"):
        value = getattr(request, name)
        if not isinstance(value, str):
            raise InvalidRequestError(f"{name} must be a string", field=name)
    if request.checkpoint is not None:
        _check_text("checkpoint", request.checkpoint, 4096)
    _check_text("sd_vae", request.vae, 4096)
    if not request.vae.strip():
        raise InvalidRequestError("sd_vae must name a VAE, Automatic or None", field="sd_vae")
    loras = tuple(_check_lora(i, spec) for i, spec in enumerate(request.loras))
    styles = _check_styles(request.styles)
    if request.img2img is not None:
        _check_image_inputs(request.img2img, batch, bounds)
    _check_refiner(request)
    units = _check_units(request.controlnet)
    if request.hires is not None:
        if request.img2img is not None:
            raise InvalidRequestError("hires fix is a txt2img option", field="enable_hr")
        _check_hires(request.hires, width, height, batch, bounds)
    return replace(
        request, width=width, height=height, loras=loras, styles=styles, controlnet=units
    )


def _check_units(units: object) -> tuple[ControlNetUnit, ...]:
    """Each ControlNet unit's fields (names and listed models are checked by the service)."""
    if not isinstance(units, tuple | list):
        raise InvalidRequestError("controlnet must be a list of units", field="controlnet")
    if len(units) > MAX_CONTROLNET_UNITS:
        raise InvalidRequestError(
            f"controlnet holds {len(units)} units; at most {MAX_CONTROLNET_UNITS}",
            field="controlnet",
        )
    for index, unit in enumerate(units):
        where = f"controlnet[{index}]"
        if not isinstance(unit, ControlNetUnit):
            raise InvalidRequestError(f"{where} must be a ControlNet unit", field=where)
        for name in ("module", "model"):
            _check_text(f"{where}.{name}", getattr(unit, name), 4096)
        if unit.image is not None:
            _check_image(f"{where}.image", unit.image)
        if unit.mask is not None:
            _check_image(f"{where}.mask", unit.mask)
        _check_float(f"{where}.weight", unit.weight, 0.0, 2.0)
        _check_int(f"{where}.processor_res", unit.processor_res, -1, 4096)
        _check_float(f"{where}.threshold_a", unit.threshold_a, -1e6, 1e6)
        _check_float(f"{where}.threshold_b", unit.threshold_b, -1e6, 1e6)
        start = _check_float(f"{where}.guidance_start", unit.guidance_start, 0.0, 1.0)
        end = _check_float(f"{where}.guidance_end", unit.guidance_end, 0.0, 1.0)
        if start > end:
            raise InvalidRequestError(
                f"{where}.guidance_start ({start:g}) is after guidance_end ({end:g})",
                field=f"{where}.guidance_start",
            )
        for name, allowed in (
            ("resize_mode", CONTROL_RESIZE_MODES),
            ("control_mode", CONTROL_MODES),
            ("hr_option", HR_OPTIONS),
        ):
            if getattr(unit, name) not in allowed:
                raise InvalidRequestError(
                    f"{where}.{name} must be one of {', '.join(allowed)}, got "
                    f"{getattr(unit, name)!r}",
                    field=f"{where}.{name}",
                )
        for name in ("pixel_perfect", "save_detected_map", "inpaint_crop_input_image"):
            if not isinstance(getattr(unit, name), bool):
                raise InvalidRequestError(
                    f"{where}.{name} must be true or false", field=f"{where}.{name}"
                )
    return tuple(units)


def _check_refiner(request: GenerationRequest) -> None:
    """A refiner's name and switch point (the switch point is checked even without one,
    so a wrong value is never silently kept)."""
    spec = field_spec("refiner_switch_at")
    assert spec.minimum is not None and spec.maximum is not None
    _check_float("refiner_switch_at", request.refiner_switch_at, spec.minimum, spec.maximum)
    if request.refiner_checkpoint is None:
        return
    _check_text("refiner_checkpoint", request.refiner_checkpoint, 4096)
    if not request.refiner_checkpoint.strip():
        raise InvalidRequestError(
            "refiner_checkpoint must name a checkpoint", field="refiner_checkpoint"
        )
    if request.img2img is not None and request.img2img.sd_upscale is not None:
        raise InvalidRequestError(
            "refiner_checkpoint: SD upscale takes no refiner", field="refiner_checkpoint"
        )


def _check_styles(styles: object) -> tuple[str, ...]:
    if not isinstance(styles, tuple | list) or not all(
        isinstance(name, str) and name and "\x00" not in name for name in styles
    ):
        raise InvalidRequestError("styles must be a list of style names", field="styles")
    return tuple(styles)


def _check_hires(hires: HiresFix, width: int, height: int, batch: int, bounds: Bounds) -> None:
    """The hires fix's fields, and its target against the size bounds and --max-pixels."""
    if not isinstance(hires, HiresFix):
        raise InvalidRequestError("hires must be hires fix settings", field="enable_hr")
    _check_float("hr_scale", hires.scale, 1.0, 8.0)
    _check_int("hr_resize_x", hires.resize_x, 0, bounds.max_size)
    _check_int("hr_resize_y", hires.resize_y, 0, bounds.max_size)
    _check_int("hr_second_pass_steps", hires.second_pass_steps, 0, bounds.max_steps)
    for name, value in (
        ("hr_upscaler", hires.upscaler),
        ("hr_prompt", hires.prompt),
        ("hr_negative_prompt", hires.negative_prompt),
    ):
        _check_text(name, value, bounds.max_prompt_chars)
    for name, value in (
        ("hr_sampler_name", hires.sampler_name),
        ("hr_scheduler", hires.scheduler),
        ("hr_checkpoint_name", hires.checkpoint),
    ):
        if value is not None and not isinstance(value, str):
            raise InvalidRequestError(f"{name} must be a string", field=name)
    field_name = "hr_scale" if hires.resize_x == 0 and hires.resize_y == 0 else "hr_resize_x"
    to_x, to_y = hires.final_size(width, height)
    if not (
        bounds.min_size <= to_x <= bounds.max_size and bounds.min_size <= to_y <= bounds.max_size
    ):
        raise InvalidRequestError(
            f"the hires fix would make {to_x}x{to_y} images; each side must be between "
            f"{bounds.min_size} and {bounds.max_size}",
            field=field_name,
        )
    if to_x * to_y * batch > bounds.max_pixels:
        raise InvalidRequestError(
            f"the hires fix would make {to_x}x{to_y} x batch_size {batch} = "
            f"{to_x * to_y * batch} pixels, over the limit of {bounds.max_pixels} "
            "(set by --max-pixels); use a smaller hr_scale or batch",
            field=field_name,
        )


SD_UPSCALE_PIXEL_FACTOR = 16
"""SD upscale's result may have this many times --max-pixels (it is made tile by tile)."""


def _check_sd_upscale(inputs: ImageInputs, bounds: Bounds) -> None:
    spec = inputs.sd_upscale
    assert spec is not None
    _check_float("sd upscale scale_factor", spec.scale, 1.0, 8.0)
    _check_int("sd upscale overlap", spec.overlap, 0, 256)
    _check_text("sd upscale upscaler", spec.upscaler, 256)
    if inputs.mask is not None or inputs.outpaint is not None:
        raise InvalidRequestError("SD upscale takes no mask", field="script_name")
    width, height = inputs.images[0].size
    out_w, out_h = int(width * spec.scale), int(height * spec.scale)
    limit = bounds.max_pixels * SD_UPSCALE_PIXEL_FACTOR
    if out_w * out_h > limit:
        raise InvalidRequestError(
            f"SD upscale would make a {out_w}x{out_h} image; the limit is {limit} pixels "
            f"({SD_UPSCALE_PIXEL_FACTOR} x --max-pixels)",
            field="script_args",
        )


def _check_image(name: str, image: object) -> None:
    if not isinstance(image, Image.Image):
        raise InvalidRequestError(f"{name} must be an image", field=name)
    width, height = image.size
    if width < 1 or height < 1:
        raise InvalidRequestError(f"{name} is empty ({width}x{height})", field=name)


def _check_image_inputs(inputs: ImageInputs, batch_size: int, bounds: Bounds) -> None:
    """img2img's fields; the images themselves were size-checked when they were read."""
    if not isinstance(inputs, ImageInputs):
        raise InvalidRequestError("img2img must be image inputs", field="init_images")
    if not inputs.images:
        raise InvalidRequestError("init_images must hold at least one image", field="init_images")
    for index, image in enumerate(inputs.images):
        _check_image(f"init_images[{index}]", image)
    if len(inputs.images) > 1 and len(inputs.images) > batch_size:
        raise InvalidRequestError(
            f"init_images holds {len(inputs.images)} images; send one, or at most batch_size "
            f"({batch_size})",
            field="init_images",
        )
    if inputs.mask is not None:
        _check_image("mask", inputs.mask)
    _check_int("resize_mode", inputs.resize_mode, 0, 3)
    _check_int("mask_blur_x", inputs.mask_blur_x, 0, 64)
    _check_int("mask_blur_y", inputs.mask_blur_y, 0, 64)
    _check_int("inpainting_fill", inputs.inpainting_fill, 0, 3)
    _check_int("inpaint_full_res_padding", inputs.inpaint_full_res_padding, 0, 256)
    _check_float("initial_noise_multiplier", inputs.initial_noise_multiplier, 0.0, 1.5)
    for name in ("mask_round", "inpaint_full_res", "inpainting_mask_invert", "fix_steps"):
        if not isinstance(getattr(inputs, name), bool):
            raise InvalidRequestError(f"{name} must be true or false", field=name)
    if inputs.sd_upscale is not None:
        _check_sd_upscale(inputs, bounds)
    outpaint = inputs.outpaint
    if outpaint is not None:
        _check_int("outpaint pixels", outpaint.pixels, 8, 256)
        _check_int("outpaint mask_blur", outpaint.mask_blur, 0, 64)
        _check_float("outpaint noise_q", outpaint.noise_q, 0.0, 4.0)
        _check_float("outpaint color_variation", outpaint.color_variation, 0.0, 1.0)
        if outpaint.method not in OUTPAINT_METHODS:
            raise InvalidRequestError(
                f"outpainting method must be one of {', '.join(OUTPAINT_METHODS)}, "
                f"got {outpaint.method!r}",
                field="script_name",
            )
        unknown = [d for d in outpaint.directions if d not in OUTPAINT_DIRECTIONS]
        if unknown or not outpaint.directions:
            raise InvalidRequestError(
                f"outpainting directions must be some of {', '.join(OUTPAINT_DIRECTIONS)}, "
                f"got {list(outpaint.directions)}",
                field="script_args",
            )


def request_from_dict(data: dict[str, Any]) -> GenerationRequest:
    """Build a request from plain values (CLI, UI, API), rejecting unknown keys."""
    known = {f.name for f in fields(GenerationRequest)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InvalidRequestError(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
    values = dict(data)
    if "loras" in values:
        values["loras"] = tuple(
            item if isinstance(item, LoraSpec) else LoraSpec(**item) for item in values["loras"]
        )
    if "controlnet" in values:
        values["controlnet"] = tuple(
            item if isinstance(item, ControlNetUnit) else ControlNetUnit(**item)
            for item in values["controlnet"]
        )
    return GenerationRequest(**values)


@dataclass
class GenerationResult:
    """Images of one request, with what was actually used to make them."""

    images: list[Image.Image]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    model_name: str
    model_hash: str | None
    interrupted: bool = False
    notes: list[str] = field(default_factory=list)
    replica: str | None = None  # the Ray Serve replica that made it (scale-out only)
    detected_maps: list[Image.Image] = field(default_factory=list)
    """Each ControlNet unit's control map, as it was used (sd-webui-controlnet appends them
    to the API's images)."""
    lora_coverage: list[LoraCoverage] = field(default_factory=list)
    """Per applied LoRA: how many of its modules matched the model, by region."""
