"""An A1111 infotext turned back into request values: the one reading shared by the page's
"Send to txt2img" (`frontends/page/recall.py`) and the A1111 API's `infotext` field
(`frontends/api/a1111.py` `apply_infotext`), so both replay an image the same way.

Values come back under `GenerationRequest` field names and only for keys the infotext
holds. As A1111 ("Apply if any"), the styles the prompts carry are taken out of them; the
prompt keeps its `<lora:...>` tags (a tag whose LoRA is here under another name, found by
the `Lora hashes` hash, is renamed). Checkpoints are looked up by `Model hash`, then by
`Model`; VAEs by `VAE hash`, then by `VAE`. Whatever is not here becomes a warning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import LorastackError
from pipelines.folders.controlnets import ControlNetEntry
from pipelines.infotext import ParsedInfotext
from pipelines.interface import DEMO_MODEL_NAME, GenerationService
from pipelines.prompt import extract_lora_tags, strip_lora_tags
from pipelines.samplers import split_combined_name
from pipelines.schema import CONTROL_MODES, CONTROL_RESIZE_MODES, RANDN_SOURCES, field_spec
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
    "Denoising strength": "denoising_strength",
    "ENSD": "eta_noise_seed_delta",
}
"""Infotext key -> request field (schema.FIELDS names); Size fills width and height,
`Seed resize from` the resize pair, `Tiling` the flag, `RNG` the noise source."""

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
"""Infotext keys a replay applies (or, like `Version` and the hashes, uses to find files)."""

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
"""The Hires. fix keys: applied only when hires fix is turned on (A1111 turns it on only
with `Denoising strength` and a `Hires ...` key)."""

CONTROLNET_KEY = re.compile(r"^ControlNet (\d+)$")
"""sd-webui-controlnet's infotext key of unit N."""


@dataclass
class Replay:
    """What an infotext asks for, as request values, and what is not here."""

    prompt: str
    negative_prompt: str
    styles: list[str] = field(default_factory=list)  # styles.csv names, in applied order
    values: dict[str, Any] = field(default_factory=dict)  # request field -> value
    checkpoint: str | None = None  # a listed title
    vae: str | None = None  # a listed VAE's name
    warnings: list[str] = field(default_factory=list)  # what is not here
    malformed: list[str] = field(default_factory=list)  # values that are not what they name


def replay(parsed: ParsedInfotext, service: GenerationService) -> Replay:
    """The request values `parsed` holds, looked up in `service`'s folders."""
    prompt, negative, styles = _without_styles(parsed, service)
    result = Replay(prompt, negative, styles)
    try:
        tags = extract_lora_tags(prompt)[1]
    except LorastackError as error:
        tags = []
        result.warnings.append(error.message)
    for spec in tags:
        name = _local_lora(spec.name, parsed, service, result.warnings)
        if name is not None and name != spec.name:
            result.prompt = rename_lora_tags(result.prompt, spec.name, name)
    on_cuda = service.device().device.startswith("cuda")
    _numbers(parsed, result.values, result.malformed, result.warnings, on_cuda)
    result.checkpoint = _local_checkpoint(parsed, service, result.warnings)
    result.vae = _local_vae(parsed, service, result.warnings)
    return result


def listed_title(name: str, service: GenerationService) -> str | None:
    """A listed checkpoint's title by any name `resolve_checkpoint` takes, else None."""
    try:
        return service.resolve_checkpoint(name).title
    except LorastackError:
        return None


def rename_lora_tags(prompt: str, old: str, new: str) -> str:
    """`prompt` with every `<lora:old...>` (or `<lyco:...>`) tag naming `new` instead."""
    pattern = re.compile(rf"<(lora|lyco):{re.escape(old)}(?=[:>])", re.IGNORECASE)
    return pattern.sub(lambda match: f"<{match[1]}:{new}", prompt)


def controlnet_units(params: Mapping[str, str]) -> list[tuple[int, str]]:
    """The (index, key) of every `ControlNet N` entry, by index."""
    return sorted((int(m.group(1)), key) for key in params if (m := CONTROLNET_KEY.match(key)))


_UNIT_PAIR = re.compile(r"\s*([^:,]+): ([^,]*)(?:,|$)")
_UNIT_NUMBERS = {
    "Weight": "weight",
    "Processor Res": "processor_res",
    "Threshold A": "threshold_a",
    "Threshold B": "threshold_b",
    "Guidance Start": "guidance_start",
    "Guidance End": "guidance_end",
}
_UNIT_CHOICES = {"Control Mode": ("control_mode", CONTROL_MODES)}
_UNIT_CHOICES["Resize Mode"] = ("resize_mode", CONTROL_RESIZE_MODES)


def unit_fields(key: str, text: str) -> tuple[dict[str, Any], dict[str, str], list[str]]:
    """sd-webui-controlnet's serialized unit (`ControlNetUnit.serialize`) read back:
    `ControlNetUnit` field values (`module` and `model` as written), the pairs no unit
    field takes, and warnings for values that are not what the field takes."""
    pairs = {name.strip(): value.strip() for name, value in _UNIT_PAIR.findall(text)}
    values: dict[str, Any] = {
        "module": pairs.pop("Module", "none"),
        "model": pairs.pop("Model", "None"),
    }
    warnings = []
    for name, target in _UNIT_NUMBERS.items():
        if name in pairs:
            raw = pairs.pop(name)
            try:
                values[target] = float(raw)
            except ValueError:
                warnings.append(f"{key}: {name} {raw} is not a number")
    for name, (target, choices) in _UNIT_CHOICES.items():
        if name in pairs:
            raw = pairs.pop(name)
            if raw in choices:
                values[target] = raw
            else:
                warnings.append(f"{key}: {name} {raw} is not one of {', '.join(choices)}")
    if "Pixel Perfect" in pairs:
        values["pixel_perfect"] = pairs.pop("Pixel Perfect") == "True"
    return values, pairs, warnings


def unit_model_title(name: str, entries: Sequence[ControlNetEntry]) -> str | None:
    """A usable listed ControlNet model by its title, else by the title's stem (the same
    model with another hash); None when it is not here."""
    usable = [entry for entry in entries if not entry.error]
    for entry in usable:
        if entry.title == name:
            return entry.title
    stem = name.rsplit(" [", 1)[0] if name.endswith("]") else name
    return next((entry.title for entry in usable if entry.stem == stem), None)


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


def _numbers(
    parsed: ParsedInfotext,
    values: dict[str, Any],
    malformed: list[str],
    warnings: list[str],
    on_cuda: bool,
) -> None:
    """The plain fields: RECALLED, size, seed resize, tiling and the noise source."""
    for key, name in RECALLED.items():
        value = parsed.params.get(key)
        if value is None:
            continue
        kind = field_spec(name).kind
        try:
            values[name] = kind(float(value)) if kind in (int, float) else value
        except ValueError:
            malformed.append(f"{key}: {value!r} is not a number")
    if "sampler_name" in values:
        sampler, schedule = split_combined_name(values["sampler_name"])
        values["sampler_name"] = sampler
        if schedule and parsed.params.get("Schedule type", "Automatic") == "Automatic":
            values["scheduler"] = schedule
    if parsed.width and parsed.height:
        values["width"], values["height"] = parsed.width, parsed.height
    elif "Size" in parsed.params:
        malformed.append(f"Size: {parsed.params['Size']!r} is not WIDTHxHEIGHT")
    resize_text = parsed.params.get("Seed resize from")
    resize = re.fullmatch(r"(\d+)x(\d+)", resize_text or "")
    if resize:
        values["seed_resize_from_w"] = int(resize[1])
        values["seed_resize_from_h"] = int(resize[2])
    elif resize_text is not None and resize_text != "-1x-1":
        malformed.append(f"Seed resize from: {resize_text!r} is not WIDTHxHEIGHT")
    if "Tiling" in parsed.params:
        values["tiling"] = parsed.params["Tiling"] == "True"
    source = parsed.params.get("RNG")
    if source in RANDN_SOURCES:
        values["randn_source"] = source
    elif source is None and parsed.params.get("Version", "").startswith("lorastack"):
        values["randn_source"] = "CPU"  # ours from before RNG was written: CPU
    elif source is None:  # A1111's default: torch's generator on the GPU it ran on
        values["randn_source"] = "GPU" if on_cuda else "NV"
        if not on_cuda:
            warnings.append(
                "no RNG in the parameters: made on an NVIDIA GPU, so its noise source NV "
                "was chosen to draw the same initial noise here"
            )
    else:
        malformed.append(f"RNG: {source!r} is not one of {', '.join(RANDN_SOURCES)}")


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
        title = listed_title(model, service)
        if title is not None:
            return title
    if model or model_hash:
        what = " ".join(p for p in (model, f"[{model_hash}]" if model_hash else "") if p)
        warnings.append(f"checkpoint {what} is not in the models folders; kept the current one")
    return None
