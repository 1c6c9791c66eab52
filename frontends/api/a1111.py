"""Pure translation between AUTOMATIC1111's API JSON and lorastack's request and result.

The HTTP layer (`frontends/api/routes.py`) only moves bytes; every A1111 field name, default and
response shape lives here, so the rules can be tested without a server. Names and
defaults follow A1111 v1.10's `modules/api/models.py` (built from
`StableDiffusionProcessingTxt2Img`), whose txt2img route fills `sampler_name` from
`sampler_index` ("Euler") when it is null and echoes the request back as `parameters`.

Stricter than A1111 on purpose: wrong types and out-of-range values are 422 errors naming
the field instead of 500s. An A1111 field we do not implement is accepted only at a value
that asks for nothing (its default, or what A1111 itself does then); any other value is a
422 naming the field, never a 200 without the feature. Keys that are not A1111 fields, and
`override_settings` we do not keep, are listed in `info["ignored"]`; a POST to `options`
with a key we do not keep is a 422 naming it.

The `infotext` field is A1111's `apply_infotext`: `apply_infotext` (the one function here
that reads the service, for the names and hashes an infotext holds) merges it into the
body before `parse_txt2img`/`parse_img2img`, which refuse a body still holding one.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import html
import io
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from frontends.api.controlnet import parse_alwayson
from pipelines import __version__
from pipelines.embeddings import EmbeddingListing
from pipelines.errors import InvalidRequestError, LorastackError, NotFoundError
from pipelines.extras import ExtrasRequest, ExtrasResult, extras_png
from pipelines.fewstep import suggest_for_lora
from pipelines.images import open_image
from pipelines.infotext import (
    hires_from_params,
    parse_infotext,
    read_infotext,
    refiner_from_params,
)
from pipelines.interface import GenerationService, PasteOptions, ProgressSnapshot
from pipelines.output import SaveOptions
from pipelines.preview import check_preview_method
from pipelines.prompts_from_file import SCRIPT_NAME as PROMPTS_SCRIPT_NAME
from pipelines.prompts_from_file import (
    PromptsScript,
    is_prompts_script,
    line_requests,
    script_from_args,
)
from pipelines.recall import (
    HIRES_KEYS,
    RECALLED,
    UNDERSTOOD,
    controlnet_units,
    listed_title,
    replay,
    unit_fields,
    unit_model_title,
)
from pipelines.safeload import is_file_quietly, printable_name
from pipelines.samplers import API_DEFAULT_SAMPLER, resolve_sampler
from pipelines.schema import (
    OUTPAINT_METHODS,
    PIXEL_UPSCALERS,
    RANDN_SOURCES,
    SEED_MAX,
    GenerationRequest,
    GenerationResult,
    HiresFix,
    ImageInputs,
    SdUpscale,
)
from pipelines.styles import PromptStyle, extract_styles
from pipelines.xyz import XyzPlot, xyz_from_script_args

VERSION = f"lorastack {__version__}"

TXT2IMG_DEFAULTS: dict[str, Any] = {
    "prompt": "",
    "negative_prompt": "",
    "styles": None,
    "seed": -1,
    "subseed": -1,
    "subseed_strength": 0,
    "seed_resize_from_h": -1,
    "seed_resize_from_w": -1,
    "sampler_name": None,
    "scheduler": None,
    "batch_size": 1,
    "n_iter": 1,
    "steps": 50,
    "cfg_scale": 7.0,
    "width": 512,
    "height": 512,
    "restore_faces": None,
    "tiling": None,
    "do_not_save_samples": False,
    "do_not_save_grid": False,
    "eta": None,
    "denoising_strength": 0.75,
    "s_min_uncond": None,
    "s_churn": None,
    "s_tmax": None,
    "s_tmin": None,
    "s_noise": None,
    "override_settings": None,
    "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None,
    "refiner_switch_at": None,
    "disable_extra_networks": False,
    "firstpass_image": None,
    "comments": None,
    "enable_hr": False,
    "firstphase_width": 0,
    "firstphase_height": 0,
    "hr_scale": 2.0,
    "hr_upscaler": None,
    "hr_second_pass_steps": 0,
    "hr_resize_x": 0,
    "hr_resize_y": 0,
    "hr_checkpoint_name": None,
    "hr_sampler_name": None,
    "hr_scheduler": None,
    "hr_prompt": "",
    "hr_negative_prompt": "",
    "force_task_id": None,
    "sampler_index": API_DEFAULT_SAMPLER,
    "script_name": None,
    "script_args": [],
    "send_images": True,
    "save_images": False,
    "alwayson_scripts": {},
    "infotext": None,
}
"""A1111 v1.10 `StableDiffusionProcessingTxt2Img` API fields and their defaults."""

_TXT2IMG_ONLY = ("enable_hr", "firstphase_", "hr_", "firstpass_image")

IMG2IMG_DEFAULTS: dict[str, Any] = {
    **{key: value for key, value in TXT2IMG_DEFAULTS.items() if not key.startswith(_TXT2IMG_ONLY)},
    "init_images": None,
    "resize_mode": 0,
    "image_cfg_scale": None,
    "mask": None,
    "mask_blur_x": 4,
    "mask_blur_y": 4,
    "mask_blur": None,
    "mask_round": True,
    "inpainting_fill": 0,
    "inpaint_full_res": True,
    "inpaint_full_res_padding": 0,
    "inpainting_mask_invert": 0,
    "initial_noise_multiplier": None,
    "latent_mask": None,
    "include_init_images": False,
}
"""A1111 v1.10 `StableDiffusionProcessingImg2Img` API fields and their defaults."""

_USED = frozenset(
    {
        "prompt",
        "negative_prompt",
        "styles",
        "seed",
        "subseed",
        "subseed_strength",
        "seed_resize_from_h",
        "seed_resize_from_w",
        "tiling",
        "sampler_name",
        "scheduler",
        "sampler_index",
        "batch_size",
        "n_iter",
        "steps",
        "cfg_scale",
        "width",
        "height",
        "denoising_strength",
        "override_settings",
        "override_settings_restore_afterwards",
        "send_images",
        "save_images",
        "refiner_checkpoint",
        "refiner_switch_at",
        "alwayson_scripts",  # sd-webui-controlnet's units (frontends/api/controlnet.py)
        # Bookkeeping A1111 itself derives from save_images / ignores in the API.
        "do_not_save_samples",
        "do_not_save_grid",
        "force_task_id",
    }
)

_TXT2IMG_USED = _USED | {
    "enable_hr",
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "hr_checkpoint_name",
    "firstphase_width",
    "firstphase_height",
}

_IMG2IMG_USED = _USED | {
    "init_images",
    "resize_mode",
    "mask",
    "mask_blur_x",
    "mask_blur_y",
    "mask_blur",
    "mask_round",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "inpainting_mask_invert",
    "initial_noise_multiplier",
    "include_init_images",
    "script_name",
    "script_args",
    # Only instruct-pix2pix checkpoints read it; A1111 drops it for every other model.
    "image_cfg_scale",
}

OPTION_CHECKPOINT = "sd_model_checkpoint"
OPTION_CLIP_SKIP = "CLIP_stop_at_last_layers"
OPTION_RANDN_SOURCE = "randn_source"
OPTION_FIX_STEPS = "img2img_fix_steps"
OPTION_NOISE_MULTIPLIER = "initial_noise_multiplier"
OPTION_VAE = "sd_vae"
OPTION_ENSD = "eta_noise_seed_delta"
OPTION_PREVIEW = "show_progress_type"
OPTION_SEND_SEED = "send_seed"
OPTION_SEND_SIZE = "send_size"
SAVE_OPTIONS = {
    "samples_format": "samples_format",
    "samples_filename_pattern": "filename_pattern",
    "jpeg_quality": "jpeg_quality",
    "webp_lossless": "webp_lossless",
}
"""A1111's saving options -> `SaveOptions` fields."""
CLIP_SKIP_MAX = 12

# Pillow `info` keys that are image facts, not text chunks (A1111's IGNORED_INFO_KEYS).
_IMAGE_FACT_KEYS = frozenset(
    {
        "jfif",
        "jfif_version",
        "jfif_unit",
        "jfif_density",
        "dpi",
        "exif",
        "loop",
        "background",
        "timestamp",
        "duration",
        "progressive",
        "progression",
        "icc_profile",
        "chromaticity",
        "photoshop",
        "parameters",
    }
)


@dataclass
class ApiOptions:
    """The A1111 options the API keeps between requests (A1111's `opts`)."""

    clip_skip: int = 1
    randn_source: str = "CPU"  # ours; A1111's default is GPU (see generation.noise)
    fix_steps: bool = False  # img2img: "do exactly the amount of steps the slider says"
    noise_multiplier: float = 1.0  # img2img's initial noise multiplier
    sd_vae: str = "Automatic"  # "Automatic", "None" or a VAE's name
    eta_noise_seed_delta: int = 0  # A1111's ENSD (NovelAI's 31337): 0 is off


@dataclass
class Txt2ImgCall:
    """One A1111 txt2img body, translated: what to generate and how to answer."""

    request: GenerationRequest
    parameters: dict[str, Any]
    send_images: bool = True
    save_images: bool = False
    restore_checkpoint: bool = True
    ignored: list[str] = field(default_factory=list)
    include_init_images: bool = False
    xyz: XyzPlot | None = None  # script_name "x/y/z plot": a grid of this request's cells
    vae_override: str | None = None  # override_settings.sd_vae, kept when not restored
    series: list[GenerationRequest] | None = None  # a script's requests, run as one job
    controlnet_indices: list[int] = field(default_factory=list)  # each unit's `args` index
    notes: list[str] = field(default_factory=list)  # e.g. what an `infotext` named is not here


# ------------------------------------------------------------------------ value checks


def _is_neutral(value: object) -> bool:
    """Values that ask for nothing (null, false, 0, empty), so ignoring them loses nothing."""
    return value is None or value is False or value in (0, "", [], {})


_SAME_CHECKPOINT = ("Use same checkpoint",)

_NO_OP_VALUES: dict[str, tuple[object, ...]] = {
    # A1111's own option defaults, which clients such as webuiapi send explicitly.
    "eta": (1.0,),  # eta_ancestral; DDIM's eta is checked below
    "s_noise": (1.0,),
    "s_tmax": (math.inf,),
}
"""Values of unimplemented sampler fields that equal what A1111 does without them."""

_HIRES_ONLY = ("firstphase_", "hr_")
"""Prefixes of fields A1111 reads only with `enable_hr` (ignored by A1111 without it)."""


def _unimplemented_value(
    key: str, value: object, body: dict[str, Any], sampler: str, defaults: dict[str, Any]
) -> bool:
    """Whether an A1111 field we do not implement asks for something with `value`."""
    if _is_neutral(value) or value == defaults[key]:
        return False
    if key.startswith(_HIRES_ONLY) and not body.get("enable_hr"):
        return False
    if key == "eta" and sampler.startswith(("DDIM", "PLMS", "UniPC")):
        return True  # A1111's eta_ddim: a different image
    return value not in _NO_OP_VALUES.get(key, ())


def _refuse_unimplemented(key: str, value: object, defaults: dict[str, Any]) -> InvalidRequestError:
    return InvalidRequestError(
        f"{key}={json.dumps(value, default=str)[:80]} asks for an A1111 feature lorastack "
        f"does not implement; leave {key} out or send its default "
        f"{json.dumps(defaults[key])}",
        field=key,
    )


def _integer(name: str, value: object) -> int:
    """A JSON integer; a float with an integral value is accepted, as pydantic does."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", field=name)
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}", field=name)
        return int(value)
    return value


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", field=name)
    return float(value)


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string, got {value!r}", field=name)
    return value


def _style_names(value: object) -> tuple[str, ...]:
    """A1111's `styles`: a list of style names (null or [] for none)."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise InvalidRequestError(
            f"styles must be a list of style names, got {value!r}"[:200], field="styles"
        )
    return tuple(value)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be true or false, got {value!r}", field=name)
    return value


def clip_skip_option(value: object, name: str = OPTION_CLIP_SKIP) -> int:
    """A1111's `CLIP_stop_at_last_layers` (1 = last layer), checked."""
    number = _integer(name, value)
    if not 1 <= number <= CLIP_SKIP_MAX:
        raise InvalidRequestError(
            f"{name} must be between 1 and {CLIP_SKIP_MAX}, got {number}", field=name
        )
    return number


def randn_source_option(value: object, name: str = OPTION_RANDN_SOURCE) -> str:
    """A1111's `randn_source` option: GPU, CPU or NV."""
    if value not in RANDN_SOURCES:
        raise InvalidRequestError(
            f"{name} must be one of {', '.join(RANDN_SOURCES)}, got {value!r}", field=name
        )
    return str(value)


def ensd_option(value: object, name: str = OPTION_ENSD) -> int:
    """A1111's `eta_noise_seed_delta`: an integer 0 ... 2**32-1 (0: off)."""
    number = _integer(name, value)
    if not 0 <= number <= SEED_MAX:
        raise InvalidRequestError(
            f"{name} must be an integer between 0 and {SEED_MAX}, got {number}", field=name
        )
    return number


def fix_steps_option(value: object, name: str = OPTION_FIX_STEPS) -> bool:
    return _flag(name, value)


def noise_multiplier_option(value: object, name: str = OPTION_NOISE_MULTIPLIER) -> float:
    number = _number(name, value)
    if not 0.0 <= number <= 1.5:
        raise InvalidRequestError(f"{name} must be between 0 and 1.5, got {number}", field=name)
    return number


def preview_option(value: object) -> str:
    """A1111's `show_progress_type`: the live-preview methods we have."""
    return check_preview_method(_text(OPTION_PREVIEW, value))


def vae_option(value: object, name: str = OPTION_VAE) -> str:
    text = _text(name, value).strip()
    if not text:
        raise InvalidRequestError(f"{name} must name a VAE, Automatic or None", field=name)
    return text


def checkpoint_option(value: object, name: str = OPTION_CHECKPOINT) -> str:
    text = _text(name, value).strip()
    if not text:
        raise InvalidRequestError(f"{name} must name a checkpoint", field=name)
    return text


# ------------------------------------------------------------------------ txt2img


def parse_txt2img(body: object, options: ApiOptions) -> Txt2ImgCall:
    """Translate an A1111 txt2img JSON body into a GenerationRequest.

    Args:
        body: the decoded JSON (must be an object).
        options: the API's persistent options (clip skip).
    Returns:
        Txt2ImgCall; fields we do not implement are listed in `ignored` when they ask for
        something (non-default, non-empty), unknown keys always.
    Raises:
        InvalidRequestError naming the field for wrong types, unknown samplers and the
        like; bounds are checked by the engine with the same error type.
    Example:
        >>> parse_txt2img({"prompt": "cat", "sampler_name": "DPM++ 2M Karras"},
        ...               ApiOptions()).request.scheduler
        'karras'
    """
    plot, rest = _xyz_script(body)
    script = _prompts_script(rest)
    used = _TXT2IMG_USED | _SCRIPT_FIELDS if script is not None else _TXT2IMG_USED
    call, _ = _parse_generation(rest, options, TXT2IMG_DEFAULTS, used)
    if isinstance(body, dict) and _flag("enable_hr", body.get("enable_hr") or False):
        call.request = _with_hires(call.request, body)
    if script is not None:
        call.series = line_requests(call.request, script)
    call.xyz = plot
    return call


XYZ_SCRIPT = "x/y/z plot"
_SCRIPT_FIELDS = frozenset({"script_name", "script_args"})


def _xyz_script(body: object) -> tuple[XyzPlot | None, object]:
    """The X/Y/Z plot a body asks for by `script_name` (any case, as A1111 matches
    script titles), and the body without the script fields."""
    if not isinstance(body, dict):
        return None, body
    script = body.get("script_name")
    if not script or _text("script_name", script).strip().lower() != XYZ_SCRIPT:
        return None, body
    plot = xyz_from_script_args(body.get("script_args") or [])
    return plot, {k: v for k, v in body.items() if k not in _SCRIPT_FIELDS}


def _prompts_script(body: object) -> PromptsScript | None:
    """The "prompts from file or textbox" script's settings when the body names it."""
    if isinstance(body, dict) and is_prompts_script(body.get("script_name")):
        return script_from_args(body.get("script_args") or [])
    return None


_SAME = ("", "Use same sampler", "Use same scheduler", "Use same checkpoint")
"""What A1111's UI sends for "as the first pass" in the hires fields."""


def _with_hires(request: GenerationRequest, body: dict[str, Any]) -> GenerationRequest:
    """A1111's hires fix fields (and the legacy first-phase size) on a txt2img request."""
    values = {key: value for key, value in body.items() if value is not None}

    def get(name: str) -> Any:
        return values.get(name, TXT2IMG_DEFAULTS[name])

    sampler_name = get("hr_sampler_name")
    if sampler_name is not None:
        sampler_name = None if sampler_name in _SAME else _text("hr_sampler_name", sampler_name)
    scheduler = get("hr_scheduler")
    if scheduler is not None:
        scheduler = None if scheduler in _SAME else _text("hr_scheduler", scheduler)
    if sampler_name is not None or scheduler is not None:
        try:
            choice = resolve_sampler(sampler_name or request.sampler_name, scheduler)
        except InvalidRequestError as error:
            error.field = "hr_sampler_name" if error.field == "sampler_name" else "hr_scheduler"
            raise
        sampler_name = choice.sampler if sampler_name is not None else None
        scheduler = choice.scheduler if scheduler is not None else None
    upscaler = get("hr_upscaler")
    checkpoint = get("hr_checkpoint_name")
    if checkpoint is not None:
        checkpoint = _text("hr_checkpoint_name", checkpoint)
    hires = HiresFix(
        scale=_number("hr_scale", get("hr_scale")),
        resize_x=_integer("hr_resize_x", get("hr_resize_x")),
        resize_y=_integer("hr_resize_y", get("hr_resize_y")),
        upscaler="Latent" if upscaler is None else _text("hr_upscaler", upscaler),
        second_pass_steps=_integer("hr_second_pass_steps", get("hr_second_pass_steps")),
        sampler_name=sampler_name,
        scheduler=scheduler,
        prompt=_text("hr_prompt", get("hr_prompt")),
        negative_prompt=_text("hr_negative_prompt", get("hr_negative_prompt")),
        checkpoint=None if checkpoint in (None, "", *_SAME_CHECKPOINT) else checkpoint,
    )
    first_width = _integer("firstphase_width", get("firstphase_width"))
    first_height = _integer("firstphase_height", get("firstphase_height"))
    if first_width or first_height:  # legacy: width x height is the hires target
        hires = replace(hires, resize_x=request.width, resize_y=request.height)
        request = replace(
            request, width=first_width or request.width, height=first_height or request.height
        )
    return replace(request, hires=hires)


def _parse_generation(
    body: object, options: ApiOptions, defaults: dict[str, Any], used: frozenset[str]
) -> tuple[Txt2ImgCall, dict[str, Any]]:
    """The fields txt2img and img2img share; returns the call and the recognised
    `override_settings` that only img2img reads (fix steps, noise multiplier)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", field="body")
    values = {key: value for key, value in body.items() if value is not None}

    def get(name: str) -> Any:
        return values.get(name, defaults[name])

    # 1. sampler: sampler_name, else sampler_index (A1111), combined names split
    sampler_field = "sampler_name" if values.get("sampler_name") else "sampler_index"
    sampler_value = _text(sampler_field, get(sampler_field))
    scheduler_value = _text("scheduler", values["scheduler"]) if "scheduler" in values else None
    try:
        choice = resolve_sampler(sampler_value, scheduler_value)
    except InvalidRequestError as error:
        if error.field == "sampler_name":
            error.field = sampler_field
        raise

    # 2. override_settings: checkpoint, clip skip, noise source (and img2img's options);
    # other keys are ignored
    overrides = get("override_settings") or {}
    if not isinstance(overrides, dict):
        raise InvalidRequestError(
            "override_settings must be an object of option names to values",
            field="override_settings",
        )
    checkpoint = None
    vae_override = None
    clip_skip = options.clip_skip
    randn_source = options.randn_source
    ensd = options.eta_noise_seed_delta
    img2img_options: dict[str, Any] = {
        OPTION_FIX_STEPS: options.fix_steps,
        OPTION_NOISE_MULTIPLIER: options.noise_multiplier,
    }
    ignored = []
    for key, value in overrides.items():
        where = f"override_settings.{key}"
        if key == OPTION_CHECKPOINT:
            checkpoint = checkpoint_option(value, where)
        elif key == OPTION_VAE:
            vae_override = vae_option(value, where)
        elif key == OPTION_CLIP_SKIP:
            clip_skip = clip_skip_option(value, where)
        elif key == OPTION_RANDN_SOURCE:
            randn_source = randn_source_option(value, where)
        elif key == OPTION_ENSD:
            ensd = ensd_option(value, where)
        elif key == OPTION_FIX_STEPS and "init_images" in defaults:
            img2img_options[key] = fix_steps_option(value, where)
        elif key == OPTION_NOISE_MULTIPLIER and "init_images" in defaults:
            img2img_options[key] = noise_multiplier_option(value, where)
        else:
            ignored.append(where)

    # 3. the request itself; bounds are checked by the engine
    units, unit_indices, unit_ignored = parse_alwayson(values.get("alwayson_scripts"))
    ignored.extend(unit_ignored)
    request = GenerationRequest(
        prompt=_text("prompt", get("prompt")),
        negative_prompt=_text("negative_prompt", get("negative_prompt")),
        styles=_style_names(get("styles")),
        steps=_integer("steps", get("steps")),
        cfg_scale=_number("cfg_scale", get("cfg_scale")),
        seed=_integer("seed", get("seed")),
        subseed=_integer("subseed", get("subseed")),
        subseed_strength=_number("subseed_strength", get("subseed_strength")),
        seed_resize_from_w=_integer("seed_resize_from_w", get("seed_resize_from_w")),
        seed_resize_from_h=_integer("seed_resize_from_h", get("seed_resize_from_h")),
        tiling=_flag("tiling", get("tiling") or False),
        randn_source=randn_source,
        eta_noise_seed_delta=ensd,
        width=_integer("width", get("width")),
        height=_integer("height", get("height")),
        batch_size=_integer("batch_size", get("batch_size")),
        n_iter=_integer("n_iter", get("n_iter")),
        sampler_name=choice.sampler,
        scheduler=choice.scheduler,
        clip_skip=clip_skip,
        denoising_strength=_number("denoising_strength", get("denoising_strength")),
        checkpoint=checkpoint,
        vae=vae_override or options.sd_vae,
        controlnet=units,
        **_refiner(values),
    )

    # 4. A1111 fields we do not do: refused unless they ask for nothing; other keys listed
    for key, value in body.items():
        if key in used:
            continue
        if key not in defaults:
            ignored.append(key)
        elif _unimplemented_value(key, value, body, choice.sampler, defaults):
            raise _refuse_unimplemented(key, value, defaults)
    call = Txt2ImgCall(
        request=request,
        parameters={**defaults, **body},
        send_images=_flag("send_images", get("send_images")),
        save_images=_flag("save_images", get("save_images")),
        restore_checkpoint=_flag(
            "override_settings_restore_afterwards", get("override_settings_restore_afterwards")
        ),
        ignored=sorted(ignored),
        vae_override=vae_override,
        controlnet_indices=unit_indices,
    )
    return call, img2img_options


def _refiner(values: dict[str, Any]) -> dict[str, Any]:
    """A1111's `refiner_checkpoint` ("None" or empty: no refiner) and `refiner_switch_at`
    (read only with a refiner, as A1111; without one, A1111 switches at the first step, we
    take the page's default 0.8)."""
    name = values.get("refiner_checkpoint")
    if name is None or name in ("", "None", "none"):
        return {}
    fields: dict[str, Any] = {"refiner_checkpoint": _text("refiner_checkpoint", name)}
    if "refiner_switch_at" in values:
        fields["refiner_switch_at"] = _number("refiner_switch_at", values["refiner_switch_at"])
    return fields


# ------------------------------------------------------------------------ infotext


@dataclass
class InfotextFill:
    """What a body's `infotext` filled in: each API field (or `override_settings.x`) with
    the infotext key it came from, the keys not applied (`infotext.<key>`) and notes on
    what is not here (a checkpoint, VAE or LoRA hash)."""

    fields: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_FIELD_KEYS = {
    **{name: key for key, name in RECALLED.items()},
    "width": "Size",
    "height": "Size",
    "seed_resize_from_w": "Seed resize from",
    "seed_resize_from_h": "Seed resize from",
    "tiling": "Tiling",
    "randn_source": "RNG",
}
"""Request field -> the infotext key `pipelines.recall` reads it from."""
_OPTION_FIELDS = {
    "clip_skip": OPTION_CLIP_SKIP,
    "randn_source": OPTION_RANDN_SOURCE,
    "eta_noise_seed_delta": OPTION_ENSD,
}
"""Request fields A1111 takes from an infotext as options (`override_settings`)."""
_HIRES_FIELDS = {
    "hr_scale": ("scale", "Hires upscale"),
    "hr_resize_x": ("resize_x", "Hires resize"),
    "hr_resize_y": ("resize_y", "Hires resize"),
    "hr_upscaler": ("upscaler", "Hires upscaler"),
    "hr_second_pass_steps": ("second_pass_steps", "Hires steps"),
    "hr_sampler_name": ("sampler_name", "Hires sampler"),
    "hr_scheduler": ("scheduler", "Hires schedule type"),
    "hr_prompt": ("prompt", "Hires prompt"),
    "hr_negative_prompt": ("negative_prompt", "Hires negative prompt"),
}
"""API hires field -> (HiresFix attribute, infotext key)."""


def apply_infotext(
    body: object, service: GenerationService, *, img2img: bool
) -> tuple[object, InfotextFill]:
    """A1111's `apply_infotext` (API >= 1.8): every field the body does not set (a key
    present, even as null, is set) takes the infotext's value; options it names (Clip skip,
    RNG, Model hash, VAE) go to `override_settings` unless the body's have them, and its
    `ControlNet N` units to `alwayson_scripts.controlnet.args[N]` unless the body's args
    reach N (a request unit replaces the infotext's whole unit, as in sd-webui-controlnet).

    Returns the body to parse, without `infotext`, and what was filled. Raises 422 naming
    `infotext` for a value that is not what its key names, or a ControlNet unit the
    request cannot run (no control image in txt2img); 404 for a unit's model not here.
    Checkpoint, VAE, LoRA or refiner not here are notes, as A1111 falls back with a warning.
    """
    fill = InfotextFill()
    if not isinstance(body, dict) or body.get("infotext") is None:
        return body, fill
    text = _text("infotext", body["infotext"])
    merged = {key: value for key, value in body.items() if key != "infotext"}
    if not text.strip():
        return merged, fill
    parsed = parse_infotext(text)
    found = replay(parsed, service)
    malformed = list(found.malformed)
    fill.notes.extend(found.warnings)

    def offer(name: str, value: Any, key: str) -> None:
        if name not in body:
            merged[name] = value
            fill.fields[name] = key

    # 1. prompts, styles and the plain fields
    offer("prompt", found.prompt, "Prompt")
    offer("negative_prompt", found.negative_prompt, "Negative prompt")
    if found.styles:
        offer("styles", found.styles, "Prompt")
    if "Batch size" in parsed.params:
        try:
            offer("batch_size", int(parsed.params["Batch size"]), "Batch size")
        except ValueError:
            malformed.append(f"Batch size: {parsed.params['Batch size']!r} is not a number")
    options: dict[str, Any] = {}
    for name, value in found.values.items():
        if name in _OPTION_FIELDS:
            options[_OPTION_FIELDS[name]] = (value, _FIELD_KEYS[name])
        else:
            offer(name, value, _FIELD_KEYS[name])

    # 2. options: checkpoint, VAE, clip skip, noise source
    if found.checkpoint is not None:
        options[OPTION_CHECKPOINT] = (found.checkpoint, "Model hash")
    if found.vae is not None:
        options[OPTION_VAE] = (found.vae, "VAE")
    overrides = body.get("override_settings")
    if isinstance(overrides, dict) or overrides is None:
        given = dict(overrides or {})
        for option, (value, key) in options.items():
            if option not in given:
                given[option] = value
                fill.fields[f"override_settings.{option}"] = key
        merged["override_settings"] = given

    # 3. hires fix (txt2img; on with Denoising strength and a Hires key, as A1111) and refiner
    applied = set(UNDERSTOOD) | {"Batch size"}
    try:
        hires = hires_from_params(parsed.params)
    except ValueError as error:
        malformed.append(f"Hires fix: {error}")
        hires = None
    if hires is not None and "Denoising strength" in parsed.params and not img2img:
        applied |= HIRES_KEYS
        offer("enable_hr", True, "Denoising strength")
        for name, (attribute, key) in _HIRES_FIELDS.items():
            value = getattr(hires, attribute)
            if value is not None:
                offer(name, value, key)
        if hires.checkpoint is not None:
            title = listed_title(hires.checkpoint, service)
            if title is None:
                fill.notes.append(
                    f"Hires checkpoint {hires.checkpoint} is not in the models folders; the "
                    "second pass uses the same checkpoint"
                )
            else:
                offer("hr_checkpoint_name", title, "Hires checkpoint")
    try:
        refiner = refiner_from_params(parsed.params)
    except ValueError as error:
        malformed.append(f"Refiner switch at: {error}")
        refiner = None
    if refiner is not None:
        title = listed_title(refiner[0], service)
        if title is None:
            fill.notes.append(f"Refiner {refiner[0]} is not in the models folders; no refiner")
        else:
            offer("refiner_checkpoint", title, "Refiner")
            offer("refiner_switch_at", refiner[1], "Refiner switch at")

    # 4. ControlNet units the request's own args do not reach
    units = controlnet_units(parsed.params)
    applied |= {key for _, key in units}
    if units:
        malformed.extend(_infotext_units(merged, units, parsed.params, service, img2img))
    if malformed:
        raise InvalidRequestError(
            "infotext: " + "; ".join(malformed) + " (fix the value or leave the key out)",
            field="infotext",
        )
    fill.ignored = [f"infotext.{key}" for key in parsed.params if key not in applied]
    return merged, fill


def _infotext_units(
    merged: dict[str, Any],
    units: list[tuple[int, str]],
    params: dict[str, str],
    service: GenerationService,
    img2img: bool,
) -> list[str]:
    """Put the infotext's units into `merged`'s `alwayson_scripts.controlnet.args` where
    the request has none; returns malformed values."""
    scripts = merged.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        return []  # the parser refuses it, naming alwayson_scripts
    name = next((k for k in scripts if str(k).strip().lower() == "controlnet"), "controlnet")
    script = scripts.get(name) or {}
    args = script.get("args", []) if isinstance(script, dict) else script
    if not isinstance(args, list):
        return []  # refused by the parser, naming alwayson_scripts.controlnet
    args = list(args)
    malformed = []
    for index, key in units:
        if index < len(args):
            continue  # the request's unit N wins
        values, left, problems = unit_fields(key, params[key])
        malformed.extend(problems)
        if left:
            malformed.append(f"{key}: no unit field takes {', '.join(left)}")
        title = unit_model_title(values["model"], service.controlnet_models())
        if title is None:
            raise NotFoundError(
                f"infotext: {key}: model {values['model']} is not a usable model in "
                "models/ControlNet (GET /controlnet/model_list lists them)",
                field="infotext",
            )
        if not img2img:
            raise InvalidRequestError(
                f"infotext: {key} needs its control image, which an infotext never holds; "
                f"send the unit with its image as alwayson_scripts.controlnet.args[{index}] "
                "(it then replaces the infotext's unit) or leave the entry out",
                field="infotext",
            )
        if "processor_res" in values:
            values["processor_res"] = int(values["processor_res"])
        args.extend([None] * (index - len(args)))
        args.append({**values, "model": title, "enabled": True})
    merged["alwayson_scripts"] = {**scripts, name: {"args": args}}
    return malformed


# ------------------------------------------------------------------------ img2img


def _choice_flag(name: str, value: object) -> bool:
    """A1111 sends these two-way choices as a bool (webuiapi) or a radio index 0/1."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidRequestError(f"{name} must be true/false or 0/1, got {value!r}", field=name)


def _base64_image(value: object, name: str) -> Image.Image:
    """A decoded, fully read image; bombs and non-images are refused naming `name`."""
    image = open_image(decode_base64_image(value, name), field=name)
    try:
        image.load()
    except (OSError, ValueError) as error:
        raise InvalidRequestError(f"{name}: the image is damaged: {error}", field=name) from None
    return image


SD_UPSCALE_SCRIPT = "sd upscale"


def scripts_listing() -> dict[str, list[str]]:
    """`scripts`: the `script_name`s each route runs, lowercased as A1111 lists them."""
    shared = [PROMPTS_SCRIPT_NAME, XYZ_SCRIPT]
    return {
        "txt2img": sorted(shared),
        "img2img": sorted([*shared, SD_UPSCALE_SCRIPT, *OUTPAINT_METHODS]),
    }


def _sd_upscale(args: object, upscalers: list[str]) -> SdUpscale:
    """A1111's `sd upscale` script arguments: [info, overlap, upscaler_index, scale_factor]
    (the index counts in the `upscalers` listing; a name is accepted too)."""
    if not isinstance(args, list) or len(args) > 4:
        raise InvalidRequestError(
            "script_args for sd upscale must be [info, overlap, upscaler_index, scale_factor]",
            field="script_args",
        )
    padded = [*args, *[None] * (4 - len(args))]
    overlap = 64 if padded[1] is None else _integer("script_args[1] (overlap)", padded[1])
    choice = padded[2] if padded[2] is not None else 0
    if isinstance(choice, str):
        if choice not in upscalers:
            raise InvalidRequestError(
                f"script_args[2]: unknown upscaler {choice!r}; known: {', '.join(upscalers)}",
                field="script_args",
            )
        upscaler = choice
    else:
        index = _integer("script_args[2] (upscaler_index)", choice)
        if not 0 <= index < len(upscalers):
            raise InvalidRequestError(
                f"script_args[2]: upscaler index {index} is not in 0..{len(upscalers) - 1} "
                f"({', '.join(upscalers)})",
                field="script_args",
            )
        upscaler = upscalers[index]
    scale = 2.0 if padded[3] is None else _number("script_args[3] (scale_factor)", padded[3])
    return SdUpscale(scale=scale, upscaler=upscaler, overlap=overlap)


def parse_img2img(
    body: object, options: ApiOptions, upscalers: list[str] | None = None
) -> Txt2ImgCall:
    """Translate an A1111 img2img JSON body (txt2img's fields plus the init images, mask
    and inpainting fields, and the two outpainting scripts by name).

    Width and height default to the first init image's (rounded down to 8 by the
    engine); with an outpainting script they are the extended canvas's. As in A1111,
    `include_init_images` only decides whether the echoed `parameters` keep the images.

    Example:
        >>> parse_img2img({"init_images": []}, ApiOptions())  # doctest: +SKIP
        InvalidRequestError: init_images must hold at least one base64 image
    """
    from pipelines.outpainting import outpaint_size, script_outpaint

    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", field="body")
    plot, body = _xyz_script(body)
    assert isinstance(body, dict)
    script = body.get("script_name")
    outpaint = None
    script_fill = None
    sd_upscale = None
    prompts = _prompts_script(body)
    if prompts is not None:
        script = None  # its requests are made from the parsed body below
    if script and _text("script_name", script).strip().lower() == SD_UPSCALE_SCRIPT:
        sd_upscale = _sd_upscale(body.get("script_args") or [], upscalers or list(PIXEL_UPSCALERS))
    elif script:
        name = _text("script_name", script)
        if name.strip().lower() not in OUTPAINT_METHODS:
            raise InvalidRequestError(
                f"unknown script {name!r}; img2img runs " + ", ".join(scripts_listing()["img2img"]),
                field="script_name",
            )
        outpaint, script_fill = script_outpaint(name, body.get("script_args") or [])
    call, img2img_options = _parse_generation(body, options, IMG2IMG_DEFAULTS, _IMG2IMG_USED)
    values = {key: value for key, value in body.items() if value is not None}

    def get(name: str) -> Any:
        return values.get(name, IMG2IMG_DEFAULTS[name])

    sources = get("init_images")
    if not isinstance(sources, list) or not sources:
        raise InvalidRequestError(
            "init_images must hold at least one base64 image", field="init_images"
        )
    images = tuple(
        _base64_image(item, f"init_images[{index}]") for index, item in enumerate(sources)
    )
    mask = _base64_image(values["mask"], "mask") if "mask" in values else None
    blur_x, blur_y = get("mask_blur_x"), get("mask_blur_y")
    if "mask_blur" in values:  # A1111's setter: one value for both
        blur_x = blur_y = _integer("mask_blur", values["mask_blur"])
    multiplier = img2img_options[OPTION_NOISE_MULTIPLIER]
    if "initial_noise_multiplier" in values:
        multiplier = noise_multiplier_option(
            values["initial_noise_multiplier"], "initial_noise_multiplier"
        )
    fill_choice = _integer("inpainting_fill", get("inpainting_fill"))
    inputs = ImageInputs(
        images=images,
        mask=mask,
        resize_mode=_integer("resize_mode", get("resize_mode")),
        mask_blur_x=_integer("mask_blur_x", blur_x),
        mask_blur_y=_integer("mask_blur_y", blur_y),
        mask_round=_flag("mask_round", get("mask_round")),
        inpainting_fill=fill_choice if script_fill is None else script_fill,
        inpaint_full_res=_choice_flag("inpaint_full_res", get("inpaint_full_res")),
        inpaint_full_res_padding=_integer(
            "inpaint_full_res_padding", get("inpaint_full_res_padding")
        ),
        inpainting_mask_invert=_choice_flag(
            "inpainting_mask_invert", get("inpainting_mask_invert")
        ),
        initial_noise_multiplier=multiplier,
        fix_steps=img2img_options[OPTION_FIX_STEPS],
        outpaint=outpaint,
        sd_upscale=sd_upscale,
    )
    request = call.request
    width, height = request.width, request.height
    if outpaint is not None:
        width, height = outpaint_size(*images[0].size, outpaint)
    else:
        width = width if "width" in values else images[0].width
        height = height if "height" in values else images[0].height
    call.request = replace(request, width=width, height=height, img2img=inputs)
    call.include_init_images = _flag("include_init_images", get("include_init_images"))
    if not call.include_init_images:
        call.parameters = {**call.parameters, "init_images": None, "mask": None}
    if prompts is not None:
        call.series = line_requests(call.request, prompts)
    call.xyz = plot
    return call


def txt2img_info(call: Txt2ImgCall, result: GenerationResult, started: float) -> dict[str, Any]:
    """The dict A1111's `Processed.js()` returns (the response's `info`, before JSON)."""
    used = result.request
    count = max(len(result.images), 1)
    vae = parse_infotext(result.infotexts[0]).params if result.infotexts else {}
    return {
        "prompt": used.prompt,
        "all_prompts": [used.prompt] * count,
        "negative_prompt": used.negative_prompt,
        "all_negative_prompts": [used.negative_prompt] * count,
        "seed": used.seed,
        "all_seeds": list(result.seeds) or [used.seed],
        "subseed": used.subseed,
        "all_subseeds": [(used.subseed + i) % (SEED_MAX + 1) for i in range(count)],
        "subseed_strength": used.subseed_strength,
        "width": used.width,
        "height": used.height,
        "sampler_name": used.sampler_name,
        "scheduler": used.scheduler,
        "cfg_scale": used.cfg_scale,
        "steps": used.steps,
        "batch_size": used.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": result.model_name,
        "sd_model_hash": result.model_hash,
        "sd_vae_name": vae.get("VAE"),
        "sd_vae_hash": vae.get("VAE hash"),
        "seed_resize_from_w": used.seed_resize_from_w,
        "seed_resize_from_h": used.seed_resize_from_h,
        "denoising_strength": used.denoising_strength,
        "extra_generation_params": {},
        "index_of_first_image": 0,
        "infotexts": list(result.infotexts),
        "styles": list(used.styles),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
        "clip_skip": used.clip_skip,
        "is_using_inpainting_conditioning": "Conditional mask weight"
        in (result.infotexts[0] if result.infotexts else ""),
        "version": VERSION,
        "interrupted": result.interrupted,
        "ignored": call.ignored,
        "notes": [*call.notes, *result.notes],
        "lora_coverage": [report.as_dict() for report in result.lora_coverage],
    }


def series_info(
    call: Txt2ImgCall, results: list[GenerationResult], started: float
) -> dict[str, Any]:
    """A script's `info`: the base request's fields, and `all_prompts`, `all_seeds`,
    `infotexts` (...) covering every image of every request, in order."""
    first = results[0] if results else GenerationResult([], [], [], call.request, "", None)
    info = txt2img_info(call, first, started)
    done = [(result, index) for result in results for index in range(len(result.images))]
    info.update(
        prompt=call.request.prompt,
        negative_prompt=call.request.negative_prompt,
        all_prompts=[result.request.prompt for result, _ in done],
        all_negative_prompts=[result.request.negative_prompt for result, _ in done],
        all_seeds=[result.seeds[index] for result, index in done],
        all_subseeds=[(result.request.subseed + index) % (SEED_MAX + 1) for result, index in done],
        infotexts=[result.infotexts[index] for result, index in done],
        interrupted=any(r.interrupted for r in results) or len(results) < len(call.series or ()),
        notes=[*call.notes, *(note for result in results for note in result.notes)],
        lora_coverage=list(
            {
                (report.name, report.matched, report.total): report.as_dict()
                for result in results
                for report in result.lora_coverage
            }.values()
        ),
    )
    info["seed"] = info["all_seeds"][0] if info["all_seeds"] else call.request.seed
    return info


def series_response(
    call: Txt2ImgCall, results: list[GenerationResult], pngs: list[bytes], started: float
) -> dict[str, Any]:
    """A script's answer: every request's images in one A1111 response."""
    images = [base64.b64encode(png).decode("ascii") for png in pngs] if call.send_images else []
    info = series_info(call, results, started)
    return {"images": images, "parameters": call.parameters, "info": json.dumps(info)}


def txt2img_response(
    call: Txt2ImgCall, result: GenerationResult, pngs: list[bytes], started: float
) -> dict[str, Any]:
    """`{images, parameters, info}` with `info` a JSON string (as A1111 sends it)."""
    images = [base64.b64encode(png).decode("ascii") for png in pngs] if call.send_images else []
    info = txt2img_info(call, result, started)
    return {"images": images, "parameters": call.parameters, "info": json.dumps(info)}


# ------------------------------------------------------------------------ listings


def sd_model_item(entry: Any, hide_paths: bool) -> dict[str, Any]:
    """One `sd-models` item from a registry CheckpointEntry."""
    sidecar = entry.path.with_suffix(".yaml") if entry.kind == "single" else None
    config = sidecar if sidecar is not None and is_file_quietly(sidecar) else None
    shown_config = None if config is None else str(config.name if hide_paths else config)
    return {
        "title": entry.title,
        "model_name": entry.model_name,
        "hash": entry.short_hash,
        "sha256": entry.sha256,
        "filename": entry.relpath if hide_paths else printable_name(str(entry.path)),
        "config": None if shown_config is None else printable_name(shown_config),
    }


def prompt_style_item(style: PromptStyle) -> dict[str, Any]:
    """One `prompt-styles` item (A1111's `PromptStyleItem`)."""
    return {"name": style.name, "prompt": style.prompt, "negative_prompt": style.negative_prompt}


def embeddings_listing(listing: EmbeddingListing) -> dict[str, Any]:
    """`embeddings`: A1111's `{loaded: {name: item}, skipped: {name: item}}` (`shape` is the
    vector width, SDXL's two summed as A1111 sums them); a skipped item says why."""

    def item(embedding: Any) -> dict[str, Any]:
        if embedding is None:
            return {
                "step": None,
                "sd_checkpoint": None,
                "sd_checkpoint_name": None,
                "shape": None,
                "vectors": None,
            }
        return {
            "step": embedding.step,
            "sd_checkpoint": embedding.sd_checkpoint,
            "sd_checkpoint_name": embedding.sd_checkpoint_name,
            "shape": sum(embedding.vectors),
            "vectors": embedding.count,
        }

    return {
        "loaded": {name: item(embedding) for name, (_, embedding) in listing.loaded.items()},
        "skipped": {
            name: {**item(embedding), "reason": reason}
            for name, (_, embedding, reason) in listing.skipped.items()
        },
    }


def sd_vae_item(entry: Any, hide_paths: bool) -> dict[str, Any]:
    """One `sd-vae` item (A1111's `SDVaeItem`): the VAE's name and its file."""
    shown = entry.relpath if hide_paths else printable_name(str(entry.path))
    return {"model_name": entry.name, "filename": shown}


def lora_item(entry: Any, hide_paths: bool) -> dict[str, Any]:
    """One `loras` item: `{name, alias, path, metadata}` (metadata = `__metadata__`), plus
    `suggested_settings` (sampler_name, scheduler, steps, cfg_scale, ranges, source) for a
    few-step LoRA (LCM, Turbo, Lightning, Hyper-SD, TCD); A1111 clients ignore the key."""
    shown = entry.relpath if hide_paths else printable_name(str(entry.path))
    item = {"name": entry.name, "alias": entry.alias, "path": shown, "metadata": entry.metadata}
    suggestion = suggest_for_lora(entry)
    if suggestion is not None:
        item["suggested_settings"] = suggestion.as_dict()
    return item


def current_options(
    title: str | None,
    sha256: str | None,
    options: ApiOptions,
    preview_method: str,
    saving: SaveOptions = SaveOptions(),  # noqa: B008 - frozen
    paste: PasteOptions = PasteOptions(),  # noqa: B008 - frozen
    checkpoints_limit: int = 1,
) -> dict[str, Any]:
    """GET `options`: the settings clients read (SillyTavern, Open WebUI, webuiapi)."""
    return {
        OPTION_SEND_SEED: paste.send_seed,
        OPTION_SEND_SIZE: paste.send_size,
        OPTION_CHECKPOINT: title,
        "sd_checkpoint_hash": sha256,
        OPTION_CLIP_SKIP: options.clip_skip,
        OPTION_RANDN_SOURCE: options.randn_source,
        OPTION_FIX_STEPS: options.fix_steps,
        OPTION_NOISE_MULTIPLIER: options.noise_multiplier,
        OPTION_VAE: options.sd_vae,
        "samples_save": True,
        **{option: getattr(saving, name) for option, name in SAVE_OPTIONS.items()},
        "save_images_add_number": True,
        "enable_pnginfo": True,
        "live_previews_enable": True,
        "show_progress_every_n_steps": 1,
        OPTION_PREVIEW: preview_method,
        OPTION_ENSD: options.eta_noise_seed_delta,
        "sd_checkpoints_limit": checkpoints_limit,
    }


FIXED_OPTIONS = (
    "sd_checkpoint_hash",
    "samples_save",
    "save_images_add_number",
    "enable_pnginfo",
    "live_previews_enable",
    "show_progress_every_n_steps",
    "sd_checkpoints_limit",
)
"""Options GET shows that a POST may send back unchanged but not change here (a client
that posts back what it read must work; a change would be silently ignored)."""


@dataclass
class OptionsChange:
    """A POST `options` body, checked: the checkpoint to load, clip skip, noise source,
    ignored keys."""

    checkpoint: str | None = None
    clip_skip: int | None = None
    randn_source: str | None = None
    fix_steps: bool | None = None
    noise_multiplier: float | None = None
    eta_noise_seed_delta: int | None = None
    vae: str | None = None
    preview_method: str | None = None
    saving: dict[str, Any] = field(default_factory=dict)  # SaveOptions fields to change
    paste: dict[str, bool] = field(default_factory=dict)  # PasteOptions fields to change


def parse_options(body: object, current: dict[str, Any] | None = None) -> OptionsChange:
    """Check a POST `options` body before anything changes (all or nothing). Options we
    only show (`FIXED_OPTIONS`) may come back at their `current` value; any other value,
    and any unknown key, is a 422 naming it."""
    current = current or {}
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", field="body")
    change = OptionsChange()
    for key, value in body.items():
        if key == OPTION_CHECKPOINT:
            change.checkpoint = checkpoint_option(value)
        elif key == OPTION_CLIP_SKIP:
            change.clip_skip = clip_skip_option(value)
        elif key == OPTION_RANDN_SOURCE:
            change.randn_source = randn_source_option(value)
        elif key == OPTION_FIX_STEPS:
            change.fix_steps = fix_steps_option(value)
        elif key == OPTION_NOISE_MULTIPLIER:
            change.noise_multiplier = noise_multiplier_option(value)
        elif key == OPTION_ENSD:
            change.eta_noise_seed_delta = ensd_option(value)
        elif key == OPTION_VAE:
            change.vae = vae_option(value)
        elif key == OPTION_PREVIEW:
            change.preview_method = preview_option(value)
        elif key in SAVE_OPTIONS:
            change.saving[SAVE_OPTIONS[key]] = value
        elif key in (OPTION_SEND_SEED, OPTION_SEND_SIZE):
            if not isinstance(value, bool):
                raise InvalidRequestError(f"{key} must be true or false", field=key)
            change.paste[key] = value
        elif key in FIXED_OPTIONS:
            if key in current and value != current[key]:
                raise InvalidRequestError(
                    f"{key} cannot be changed through the API here (it is {current[key]!r})",
                    field=key,
                )
        else:
            known = sorted(current) or [OPTION_CHECKPOINT]
            close = difflib.get_close_matches(str(key), known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise InvalidRequestError(
                f"unknown option {key!r}{hint} (GET /sdapi/v1/options lists the options "
                "this server keeps)",
                field=str(key),
            )
    return change


# ------------------------------------------------------------------------ progress


def preview_png(image: Image.Image) -> str:
    """Base64 PNG of a live preview (A1111's "Approx cheap")."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def progress_response(progress: ProgressSnapshot, current_image: str | None) -> dict[str, Any]:
    """`progress`: `{progress, eta_relative, state{...}, current_image, textinfo}`."""
    active = bool(progress.active)
    state = {
        "skipped": progress.skipped,
        "interrupted": progress.interrupted,
        "stopping_generation": False,
        "job": progress.kind if active else "",
        "job_count": progress.job_count if active else 0,
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(time.time()))
        if active
        else "0",
        "job_no": progress.job_no if active else 0,
        "sampling_step": progress.sampling_step if active else 0,
        "sampling_steps": progress.sampling_steps if active else 0,
    }
    textinfo = (
        f"Sampling step {progress.sampling_step}/{progress.sampling_steps}" if active else None
    )
    return {
        "progress": progress.fraction if active else 0.0,
        "eta_relative": progress.eta_seconds if active else 0.0,
        "state": state,
        "current_image": current_image if active else None,
        "textinfo": textinfo,
    }


# ------------------------------------------------------------------------ png-info


def decode_base64_image(data: object, name: str = "image") -> bytes:
    """Image bytes from base64, with or without a `data:image/...;base64,` prefix."""
    text = _text(name, data).strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidRequestError(f"{name} is not valid base64: {error}", field=name) from error


def png_info(body: object, styles: tuple[PromptStyle, ...] = ()) -> dict[str, Any]:
    """`png-info`: `{info: raw infotext, items: other text chunks, parameters: parsed}`.

    As A1111 with its default "Apply if any", the `styles` the prompts carry are taken out
    of `Prompt`/`Negative prompt` and listed as `Styles array`."""
    if not isinstance(body, dict) or "image" not in body:
        raise InvalidRequestError("png-info needs a JSON object with an 'image'", field="image")
    data = decode_base64_image(body["image"])
    if not data:
        return {"info": "", "items": {}, "parameters": {}}
    infotext = read_infotext(data) or ""
    with open_image(data) as image:
        extra = dict(image.info)
    items = {
        str(key): value
        for key, value in extra.items()
        if key not in _IMAGE_FACT_KEYS and isinstance(value, str | int | float)
    }
    parameters: dict[str, Any] = parse_infotext(infotext).a1111_parameters() if infotext else {}
    if parameters and styles:
        found, prompt, negative = extract_styles(
            styles, parameters["Prompt"], parameters["Negative prompt"]
        )
        if found:
            parameters.update({"Prompt": prompt, "Negative prompt": negative})
            parameters["Styles array"] = found
    return {"info": infotext, "items": items, "parameters": parameters}


# ------------------------------------------------------------------------ errors and probes


EXTRAS_DEFAULTS: dict[str, Any] = {
    "resize_mode": 0,
    "show_extras_results": True,
    "gfpgan_visibility": 0,
    "codeformer_visibility": 0,
    "codeformer_weight": 0,
    "upscaling_resize": 2,
    "upscaling_resize_w": 512,
    "upscaling_resize_h": 512,
    "upscaling_crop": True,
    "upscaler_1": "None",
    "upscaler_2": "None",
    "extras_upscaler_2_visibility": 0,
    "upscale_first": False,
}
"""A1111's `ExtrasBaseRequest` fields and defaults. `show_extras_results` only matters for
A1111's folder mode and `upscale_first` only with face restoration: both are accepted."""
EXTRAS_MAX_RESIZE = 8  # A1111's `upscaling_resize` bound (le=8)


def parse_extras(body: object, *, batch: bool) -> ExtrasRequest:
    """An `extra-single-image` (`image`) or `extra-batch-images` (`imageList` of
    `{data, name}`) body as an ExtrasRequest; face restoration is refused (422)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", field="body")
    values = {key: value for key, value in body.items() if value is not None}

    def get(name: str) -> Any:
        return values.get(name, EXTRAS_DEFAULTS[name])

    for name in ("gfpgan_visibility", "codeformer_visibility"):
        if _number(name, get(name)) != 0:
            raise InvalidRequestError(
                f"{name}: face restoration (GFPGAN, CodeFormer) is not supported; send 0",
                field=name,
            )
    if batch:
        items = values.get("imageList")
        if not isinstance(items, list) or not items:
            raise InvalidRequestError(
                "imageList must hold at least one {data, name} object", field="imageList"
            )
        images = []
        for index, item in enumerate(items):
            if not isinstance(item, dict) or "data" not in item:
                raise InvalidRequestError(
                    f"imageList[{index}] must be an object with data (base64) and name",
                    field="imageList",
                )
            images.append(_base64_image(item["data"], f"imageList[{index}].data"))
    else:
        if not values.get("image"):
            raise InvalidRequestError("image must be a base64 image", field="image")
        images = [_base64_image(values["image"], "image")]
    resize = _number("upscaling_resize", get("upscaling_resize"))
    if not 1 <= resize <= EXTRAS_MAX_RESIZE:
        raise InvalidRequestError(
            f"upscaling_resize must be between 1 and {EXTRAS_MAX_RESIZE}, got {resize:g}",
            field="upscaling_resize",
        )
    visibility = _number("extras_upscaler_2_visibility", get("extras_upscaler_2_visibility"))
    if not 0 <= visibility <= 1:
        raise InvalidRequestError(
            "extras_upscaler_2_visibility must be between 0 and 1",
            field="extras_upscaler_2_visibility",
        )
    _flag("show_extras_results", get("show_extras_results"))
    _flag("upscale_first", get("upscale_first"))
    raw_resize = get("upscaling_resize")
    return ExtrasRequest(
        images=tuple(images),
        resize_mode=_integer("resize_mode", get("resize_mode")),
        upscaling_resize=raw_resize if isinstance(raw_resize, int) else resize,
        upscaling_resize_w=_integer("upscaling_resize_w", get("upscaling_resize_w")),
        upscaling_resize_h=_integer("upscaling_resize_h", get("upscaling_resize_h")),
        upscaling_crop=_flag("upscaling_crop", get("upscaling_crop")),
        upscaler_1=_text("upscaler_1", get("upscaler_1")),
        upscaler_2=_text("upscaler_2", get("upscaler_2")),
        upscaler_2_visibility=visibility,
    )


def plaintext_to_html(text: str) -> str:
    """A1111's `ui_common.plaintext_to_html`."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def extras_response(result: ExtrasResult, *, batch: bool) -> dict[str, Any]:
    """A1111's Extras reply: base64 PNGs and the last image's info as HTML."""
    pngs = [
        base64.b64encode(extras_png(image, parameters, text)).decode()
        for image, parameters, text in zip(
            result.images, result.parameters, result.infotexts, strict=True
        )
    ]
    info = plaintext_to_html(result.infotexts[-1] if result.infotexts else "")
    if batch:
        return {"html_info": info, "images": pngs}
    return {"html_info": info, "image": pngs[0] if pngs else ""}


def upscaler_item(name: str, entry: Any, hide_paths: bool) -> dict[str, Any]:
    """A1111's `UpscalerItem` for a built-in upscaler (entry None) or a model file."""
    if entry is None:
        return {"name": name, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
    return {
        "name": name,
        "model_name": entry.architecture,
        "model_path": None if hide_paths else str(entry.path),
        "model_url": None,
        "scale": entry.scale,
    }


def error_body(error: LorastackError | Exception, status: int) -> dict[str, Any]:
    """A1111's error body `{error, detail, body, errors}`; `detail` is the sentence, and
    it always names the field at fault."""
    message = error.message if isinstance(error, LorastackError) else str(error)
    field_name = getattr(error, "field", None)
    if field_name and field_name not in message:
        message = f"{field_name}: {message}"
    return {
        "error": type(error).__name__,
        "detail": message,
        "body": "",
        "errors": message if status != 500 else "",
    }


def cmd_flags(settings: Any) -> dict[str, Any]:
    """`cmd-flags`: the launch settings, secrets left out and paths as strings."""
    secret = {"api_auth", "gradio_auth", "admin_auth"}
    flags: dict[str, Any] = {}
    for key, value in vars(settings).items():
        if key in secret or key == "bounds":
            continue
        if isinstance(value, Path):
            value = None if settings.hide_paths else str(value)
        elif isinstance(value, tuple):
            value = None if settings.hide_paths else [str(v) for v in value]
        flags[key] = value
    return flags


NEUTRAL_PROBES: dict[str, Any] = {
    "hypernetworks": [],
    "face-restorers": [],
    "realesrgan-models": [],
}
"""Routes clients probe that we do not implement: valid, empty A1111 shapes."""
