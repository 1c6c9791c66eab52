"""PNG Info: read an image's generation parameters and turn them back into page values.

"Send to txt2img" fills every field named in `RECALLED`, the Hires fix section, the
checkpoint and the styles: as A1111 ("Apply if any"), the styles the prompts carry are
taken out of them and selected instead. The prompt keeps its `<lora:...>` tags as written
(as A1111) and the stack is emptied, so the image replays with exactly its LoRAs; a tag
whose LoRA is here under another name (found by the `Lora hashes` hash) is renamed.
Checkpoints are looked up by name, then by `Model hash`. Whatever is missing, and every
parameter the page does not apply, is reported, never silently dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from frontends.page.controlnet_panel import recall_controlnet
from frontends.page.defaults import scheduler_label
from frontends.page.hires_panel import recall_hires
from frontends.page.refiner_panel import recall_refiner
from frontends.page.stack import strip_lora_tags
from pipelines.errors import LorastackError
from pipelines.images import open_image
from pipelines.infotext import ParsedInfotext, parse_infotext, read_infotext
from pipelines.interface import DEMO_MODEL_NAME, GenerationService
from pipelines.prompt import extract_lora_tags
from pipelines.samplers import split_combined_name
from pipelines.schema import RANDN_SOURCES, field_spec
from pipelines.styles import extract_styles

RECALLED: dict[str, str] = {
    "Steps": "steps",
    "Sampler": "sampler_name",
    "Schedule type": "scheduler",
    "CFG scale": "cfg_scale",
    "Seed": "seed",
    "Clip skip": "clip_skip",
    "Variation seed": "subseed",
    "Variation seed strength": "subseed_strength",
    "Denoising strength": "denoising_strength",  # img2img's; txt2img has no such field
    "ENSD": "eta_noise_seed_delta",
}
"""Infotext key -> request field (schema.FIELDS names); Size fills width and height,
`Seed resize from` the resize pair, `Tiling` the checkbox."""

UNDERSTOOD = {
    *RECALLED,
    "Size",
    "Seed resize from",
    "Tiling",
    "RNG",
    "Model",
    "Model hash",
    "VAE",
    "VAE hash",
    "Lora hashes",
    "TI hashes",
    "Version",
    "Refiner",
    "Refiner switch at",
}
"""Infotext keys a recall applies (or, like `Version` and the hashes, uses to find files);
every other key is listed as not applied."""
HIRES_KEYS = {
    "Hires upscale",
    "Hires resize",
    "Hires steps",
    "Hires upscaler",
    "Hires checkpoint",
    "Hires sampler",
    "Hires schedule type",
    "Hires prompt",
    "Hires negative prompt",
}
"""The Hires. fix keys: applied only when the section is turned on (A1111 turns it on only
with `Denoising strength` and a `Hires ...` key)."""

REPLAY_DEFAULTS: dict[str, Any] = {
    "subseed_strength": 0.0,
    "seed_resize_from_w": 0,
    "seed_resize_from_h": 0,
    "tiling": False,
    "eta_noise_seed_delta": 0,
}
"""What an infotext without these keys means, so a pasted one replays its image even when
the page held other values."""


@dataclass
class Recall:
    """Page values recovered from one infotext."""

    values: dict[str, Any] = field(default_factory=dict)  # schema.FIELDS name -> value
    checkpoint: str | None = None  # a listed title
    warnings: list[str] = field(default_factory=list)
    not_applied: list[str] = field(default_factory=list)  # infotext keys the page has no use for
    styles: list[str] = field(default_factory=list)  # styles.csv names, in applied order
    vae: str | None = None  # a listed VAE's name, when the infotext names one


@dataclass
class ImageInfo:
    """What an image carries: the A1111 infotext, and any other text chunks (raw)."""

    infotext: str | None
    other: dict[str, str]


def read_image_info(data: bytes | str | Path) -> ImageInfo:
    """Infotext (PNG chunk or EXIF UserComment) plus other text chunks, e.g. ComfyUI's
    `prompt`/`workflow` or InvokeAI's `invokeai_metadata`, shown as they are."""
    raw = Path(data).read_bytes() if isinstance(data, str | Path) else data
    infotext = read_infotext(raw)
    with open_image(raw) as image:
        chunks = dict(image.info)
    other = {
        str(key): value
        for key, value in chunks.items()
        if key != "parameters" and isinstance(value, str) and value
    }
    return ImageInfo(infotext, other)


def recall(text: str, service: GenerationService) -> Recall:
    """Page values for `text` (an A1111 infotext), with warnings for what is not here."""
    parsed = parse_infotext(text)
    result = Recall()
    prompt, negative, result.styles = _without_styles(parsed, service)
    try:
        tags = extract_lora_tags(prompt)[1]
    except LorastackError as error:
        tags = []
        result.warnings.append(error.message)
    for spec in tags:
        name = _local_lora(spec.name, parsed, service, result.warnings)
        if name is not None and name != spec.name:
            prompt = rename_lora_tags(prompt, spec.name, name)
    result.values["prompt"] = prompt
    result.values["negative_prompt"] = negative
    _recall_numbers(parsed, result, service.device().device.startswith("cuda"))
    result.checkpoint = _local_checkpoint(parsed, service, result.warnings)
    result.vae = _local_vae(parsed, service, result.warnings)

    def title(name: str) -> str | None:
        return _listed_title(name, service)

    for recalled, warnings in (
        recall_hires(parsed.params, title),
        recall_refiner(parsed.params, title),
        recall_controlnet(parsed.params, service),
    ):
        result.values.update(recalled)
        result.warnings.extend(warnings)
    understood = UNDERSTOOD | (HIRES_KEYS if result.values.get("enable_hr") else set())
    # ControlNet units: recall_controlnet reports what each one could not restore
    understood |= {key for key in parsed.params if re.fullmatch(r"ControlNet \d+", key)}
    result.not_applied = [key for key in parsed.params if key not in understood]
    return result


def rename_lora_tags(prompt: str, old: str, new: str) -> str:
    """`prompt` with every `<lora:old...>` (or `<lyco:...>`) tag naming `new` instead."""
    pattern = re.compile(rf"<(lora|lyco):{re.escape(old)}(?=[:>])", re.IGNORECASE)
    return pattern.sub(lambda match: f"<{match[1]}:{new}", prompt)


def _without_styles(
    parsed: ParsedInfotext, service: GenerationService
) -> tuple[str, str, list[str]]:
    """The prompts without the styles they end with (A1111's `extract_styles_from_prompt`),
    and those styles. The page's stack LoRAs follow the styled prompt as tags, so when
    nothing matches the prompt as written it is tried without its LoRA tags."""
    styles = service.styles().styles
    found, prompt, negative = extract_styles(styles, parsed.prompt, parsed.negative_prompt)
    if not found and "<" in parsed.prompt:
        bare = strip_lora_tags(parsed.prompt)
        names, rest, rest_negative = extract_styles(styles, bare, parsed.negative_prompt)
        if names:
            tags = " ".join(re.findall(r"<(?:lora|lyco):[^>]+>", parsed.prompt))
            return f"{rest} {tags}".strip(), rest_negative, names
    return prompt, negative, found


def _listed_title(name: str, service: GenerationService) -> str | None:
    try:
        return service.resolve_checkpoint(name).title
    except LorastackError:
        return None


def _recall_numbers(parsed: ParsedInfotext, result: Recall, on_cuda: bool) -> None:
    for key, name in RECALLED.items():
        value = parsed.params.get(key)
        if value is None:
            continue
        kind = field_spec(name).kind
        try:
            result.values[name] = kind(float(value)) if kind in (int, float) else value
        except ValueError:
            result.warnings.append(f"{key}: {value!r} is not a number; left unchanged")
    if "sampler_name" in result.values:
        sampler, schedule = split_combined_name(result.values["sampler_name"])
        result.values["sampler_name"] = sampler
        if schedule and parsed.params.get("Schedule type", "Automatic") == "Automatic":
            result.values["scheduler"] = schedule
    if "scheduler" in result.values:
        result.values["scheduler"] = scheduler_label(result.values["scheduler"])
    if parsed.width and parsed.height:
        result.values["width"], result.values["height"] = parsed.width, parsed.height
    result.values.update({k: v for k, v in REPLAY_DEFAULTS.items() if k not in result.values})
    resize = re.fullmatch(r"(\d+)x(\d+)", parsed.params.get("Seed resize from", ""))
    if resize:
        result.values["seed_resize_from_w"] = int(resize[1])
        result.values["seed_resize_from_h"] = int(resize[2])
    result.values["tiling"] = parsed.params.get("Tiling", "") == "True"
    source = parsed.params.get("RNG")
    if source in RANDN_SOURCES:
        result.values["randn_source"] = source
    elif source is None and parsed.params.get("Version", "").startswith("lorastack"):
        result.values["randn_source"] = "CPU"  # ours from before RNG was written: CPU
    elif source is None:  # A1111's default: torch's generator on the GPU it ran on
        result.values["randn_source"] = "GPU" if on_cuda else "NV"
        if not on_cuda:
            result.warnings.append(
                "no RNG in the parameters: made on an NVIDIA GPU, so its noise source NV "
                "was chosen to draw the same initial noise here"
            )
    else:
        result.warnings.append(f"RNG: {source!r} is not a noise source here; left unchanged")


def _local_lora(
    name: str, parsed: ParsedInfotext, service: GenerationService, warnings: list[str]
) -> str | None:
    """The name a tag should use here: its own when it resolves (a name or alias), else
    the listed LoRA with its `Lora hashes` hash; None when neither is here."""
    try:
        service.resolve_lora(name)
        return name
    except LorastackError as error:
        reason = error.message
    wanted = parsed.lora_hashes.get(name.replace(":", "").replace(",", ""))
    if wanted:
        found = [e for e in service.loras() if e.short_hash and e.short_hash == wanted.lower()]
        if len(found) == 1:
            warnings.append(f"LoRA '{name}' is here as '{found[0].name}' (same hash {wanted})")
            return found[0].name
    hint = f" (hash {wanted})" if wanted else ""
    warnings.append(
        f"LoRA '{name}'{hint} is not in the LoRA folders; its tag stays in the prompt (add "
        f"the file or remove the tag): {reason}"
    )
    return None


def _local_vae(
    parsed: ParsedInfotext, service: GenerationService, warnings: list[str]
) -> str | None:
    """The listed VAE the infotext names (A1111's `VAE` -> `sd_vae`): by `VAE hash`, else
    by name. None when it names none (the checkpoint's own was used)."""
    vae_hash = parsed.params.get("VAE hash", "").lower()
    name = parsed.params.get("VAE")
    usable = [e for e in service.vaes() if not e.error]
    for entry in usable:
        if vae_hash and entry.short_hash == vae_hash:
            return entry.name
    for entry in usable:
        if name and name in (entry.name, entry.relpath):
            return entry.name
    if name or vae_hash:
        what = " ".join(p for p in (name, f"[{vae_hash}]" if vae_hash else "") if p)
        warnings.append(f"VAE {what} is not in the VAE folders; kept the current one")
    return None


def _local_checkpoint(
    parsed: ParsedInfotext, service: GenerationService, warnings: list[str]
) -> str | None:
    """The listed checkpoint the infotext names: by `Model hash`, else by `Model`."""
    model_hash = parsed.params.get("Model hash", "").lower()
    model = parsed.params.get("Model")
    if model == DEMO_MODEL_NAME and not model_hash:
        return None  # made by the built-in demo model, which is always here
    if model_hash:
        found = [e for e in service.checkpoints() if e.short_hash == model_hash]
        if found:
            return found[0].title
    if model:
        try:
            return service.resolve_checkpoint(model).title
        except LorastackError:
            pass
    if model or model_hash:
        what = " ".join(p for p in (model, f"[{model_hash}]" if model_hash else "") if p)
        warnings.append(f"checkpoint {what} is not in the models folders; kept the current one")
    return None
