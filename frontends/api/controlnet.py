"""sd-webui-controlnet's API, translated: `alwayson_scripts.controlnet.args[]` units on
txt2img and img2img, and its own routes (`/controlnet/version`, `model_list`,
`module_list`, `detect`, `settings`).

Names, defaults, aliases and answer shapes follow sd-webui-controlnet 1.1.455
(`internal_controlnet/args.py` `ControlNetUnit`, `scripts/api.py`). Differences, on purpose:
a unit without `enabled` is run (its old default; 1.1.455 silently skips it); a path as a
unit's image is refused (base64 only: a request never names a server file); fields for what
lorastack does not do (advanced weighting, effective region masks, batch and merge inputs,
IP-Adapter tensors) are a 422 naming the field unless they ask for nothing; unknown keys are
listed in `info["ignored"]`, as for the rest of a body.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any

from PIL import Image

from pipelines.errors import InvalidRequestError
from pipelines.images import open_image
from pipelines.schema import CONTROL_MODES, CONTROL_RESIZE_MODES, HR_OPTIONS, ControlNetUnit

SCRIPT = "controlnet"
"""The always-on script's name, as A1111 matches it (case-insensitively)."""
API_VERSION = 2
"""sd-webui-controlnet's `get_api_version()`."""
UNIT_COUNT = 3
"""sd-webui-controlnet's default `control_net_unit_count` (`/controlnet/settings`)."""

RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Envelope (Outer Fit)": "Resize and Fill",
}
KEY_ALIASES = {"input_image": "image", "mask_image": "mask", "lowvram": "low_vram"}
KEY_ALIASES["guidance"] = "guidance_end"
NO_OP_FIELDS: dict[str, tuple[object, ...]] = {
    "low_vram": (True, False),  # memory placement only
    "is_ui": (True, False),
    "input_mode": ("simple",),
    "loopback": (False,),
    "output_dir": ("",),
    "batch_images": ("", None),
    "advanced_weighting": (None,),
    "effective_region_mask": (None,),
    "ipadapter_input": (None,),
    "union_control_type": ("Unknown", "UNKNOWN"),
    "pulid_mode": ("Fidelity", "Extremely style"),  # read by PuLID models only
    "animatediff_batch": (False,),
    "guessmode": (None, False, 0),
    "guess_mode": (None, False, 0),
}
"""sd-webui-controlnet unit fields lorastack does not act on, with the values that ask for
nothing (any other value is a 422 naming the field)."""
UNIT_FIELDS = {
    "enabled",
    "image",
    "mask",
    "module",
    "model",
    "weight",
    "resize_mode",
    "processor_res",
    "threshold_a",
    "threshold_b",
    "guidance_start",
    "guidance_end",
    "pixel_perfect",
    "control_mode",
    "hr_option",
    "save_detected_map",
    "inpaint_crop_input_image",
}


def _where(index: int, name: str = "") -> str:
    base = f"alwayson_scripts.controlnet.args[{index}]"
    return f"{base}.{name}" if name else base


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequestError(f"{name} must be a number, got {value!r}", field=name)
    return float(value)


def _integer(name: str, value: object) -> int:
    number = _number(name, value)
    if not number.is_integer():
        raise InvalidRequestError(f"{name} must be an integer, got {value!r}", field=name)
    return int(number)


def _flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be true or false, got {value!r}", field=name)
    return value


def _choice(name: str, value: object, names: tuple[str, ...], ints: bool = True) -> str:
    """A name of `names` (aliases resolved), or its index."""
    if isinstance(value, str):
        value = RESIZE_ALIASES.get(value, value)
        if value in names:
            return value
    elif ints and isinstance(value, int) and not isinstance(value, bool):
        if names == CONTROL_RESIZE_MODES and value == 3:  # "Just Resize (Latent upscale)"
            return names[0]
        if 0 <= value < len(names):
            return names[value]
    allowed = ", ".join(f"{i} or {n!r}" for i, n in enumerate(names))
    raise InvalidRequestError(f"{name} must be one of {allowed}; got {value!r}", field=name)


def decode_image(value: object, name: str) -> Image.Image:
    """A base64 image (with or without a `data:` prefix), fully read; bombs refused."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a base64 image", field=name)
    text = value.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except ValueError as error:
        raise InvalidRequestError(
            f"{name} must be a base64 image (a file path is not accepted): {error}", field=name
        ) from error
    image = open_image(data, field=name)
    try:
        image.load()
    except (OSError, ValueError) as error:
        raise InvalidRequestError(f"{name}: the image is damaged: {error}", field=name) from None
    return image


def _images(
    value: object, mask: object, index: int
) -> tuple[Image.Image | None, Image.Image | None]:
    """sd-webui-controlnet's image field: a base64 image (mask beside it), {"image",
    "mask"}, [image, mask], or a list of one {"image", "mask"}."""
    where = _where(index, "image")
    if isinstance(value, list | tuple):
        if len(value) == 1 and isinstance(value[0], dict):
            value = value[0]
        elif len(value) == 2 and not isinstance(value[0], dict):
            value, mask = value[0], value[1]
        else:
            raise InvalidRequestError(
                f"{where}: one image per unit (sd-webui-controlnet takes several for an "
                "IP-Adapter unit; lorastack takes one)",
                field=where,
            )
    if isinstance(value, dict):
        value, mask = value.get("image"), value.get("mask", mask)
    if value in (None, ""):
        return None, None
    image = decode_image(value, where)
    masked = None if mask in (None, "") else decode_image(mask, _where(index, "mask"))
    return image, masked


def parse_unit(raw: dict[str, Any], index: int, ignored: list[str]) -> ControlNetUnit | None:
    """One `args[]` item; None when it is not enabled."""
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = KEY_ALIASES.get(key, key)
        if name in values and key != name:
            raise InvalidRequestError(
                f"{_where(index, key)} and {name} are the same field; send one",
                field=_where(index, key),
            )
        values[name] = value
    enabled = values.get("enabled", True)
    if enabled is None:
        enabled = True
    if not _flag(_where(index, "enabled"), enabled):
        return None
    for key, value in values.items():
        if key in UNIT_FIELDS:
            continue
        if key in NO_OP_FIELDS:
            neutral = value is None or value in ([], {}, "") or value in NO_OP_FIELDS[key]
            if not neutral:
                raise InvalidRequestError(
                    f"{_where(index, key)}={str(value)[:60]!r} asks for an sd-webui-controlnet "
                    "feature lorastack does not implement; leave it out",
                    field=_where(index, key),
                )
        else:
            ignored.append(_where(index, key))
    image, mask = _images(values.get("image"), values.get("mask"), index)
    fields: dict[str, Any] = {"image": image, "mask": mask}
    for name in ("module", "model"):
        if name in values and values[name] is not None:
            if not isinstance(values[name], str):
                raise InvalidRequestError(
                    f"{_where(index, name)} must be a string", field=_where(index, name)
                )
            fields[name] = values[name]
    for name in ("weight", "threshold_a", "threshold_b", "guidance_start", "guidance_end"):
        if values.get(name) is not None:
            fields[name] = _number(_where(index, name), values[name])
    if values.get("processor_res") is not None:
        fields["processor_res"] = _integer(_where(index, "processor_res"), values["processor_res"])
    for name in ("pixel_perfect", "save_detected_map", "inpaint_crop_input_image"):
        if values.get(name) is not None:
            fields[name] = _flag(_where(index, name), values[name])
    for name, names in (
        ("resize_mode", CONTROL_RESIZE_MODES),
        ("control_mode", CONTROL_MODES),
        ("hr_option", HR_OPTIONS),
    ):
        if values.get(name) is not None:
            fields[name] = _choice(_where(index, name), values[name], names)
    return ControlNetUnit(**fields)


def parse_alwayson(value: object) -> tuple[tuple[ControlNetUnit, ...], list[int], list[str]]:
    """`alwayson_scripts`: the ControlNet units (enabled ones), the `args` index of each,
    and the keys ignored. Another always-on script asking for something is a 422."""
    if value in (None, {}):
        return (), [], []
    if not isinstance(value, dict):
        raise InvalidRequestError(
            "alwayson_scripts must be an object of script names to {args: [...]}",
            field="alwayson_scripts",
        )
    units: list[ControlNetUnit] = []
    indices: list[int] = []
    ignored: list[str] = []
    for name, script in value.items():
        if str(name).strip().lower() != SCRIPT:
            if script in (None, {}):
                continue
            raise InvalidRequestError(
                f"alwayson_scripts.{name} asks for an A1111 script lorastack does not "
                f"implement; the always-on scripts it runs: {SCRIPT}",
                field="alwayson_scripts",
            )
        args = script.get("args", []) if isinstance(script, dict) else script
        if not isinstance(args, list):
            raise InvalidRequestError(
                "alwayson_scripts.controlnet must be {args: [unit, ...]}",
                field="alwayson_scripts.controlnet",
            )
        for index, raw in enumerate(args):
            if raw is None:
                continue
            if not isinstance(raw, dict):
                raise InvalidRequestError(
                    f"{_where(index)} must be a unit object (sd-webui-controlnet's fields)",
                    field=_where(index),
                )
            unit = parse_unit(raw, index, ignored)
            if unit is not None:
                units.append(unit)
                indices.append(index)
    return tuple(units), indices, ignored


def api_field(field: str | None, indices: list[int]) -> str | None:
    """A request error's `controlnet[k].x` field as the API's `args[i].x`."""
    if field is None or not field.startswith("controlnet["):
        return field
    number, _, rest = field[len("controlnet[") :].partition("]")
    if not number.isdigit() or int(number) >= len(indices):
        return field
    return _where(indices[int(number)]) + rest


# ------------------------------------------------------------------ its own routes


def model_list(entries: list[Any]) -> dict[str, Any]:
    """`/controlnet/model_list`: the usable models by title; lorastack adds the unusable
    ones with their reasons under `unusable` (clients read only `model_list`)."""
    return {
        "model_list": [entry.title for entry in entries if not entry.error],
        "unusable": {entry.title: entry.error for entry in entries if entry.error},
    }


def module_list(modules: list[Any], alias_names: bool) -> dict[str, Any]:
    """`/controlnet/module_list`: names (or labels) in sd-webui-controlnet's order, with
    each one's visible sliders."""
    names = [module.label if alias_names else module.name for module in modules]
    return {
        "module_list": names,
        "module_detail": {
            name: module.detail() for name, module in zip(names, modules, strict=True)
        },
    }


NONE_MODEL = "None"
TAG_ALIASES = {"ip-adapter": ("ip_adapter", "ipadapter"), "t2i-adapter": ("t2i_adapter",)}
"""sd-webui-controlnet's `tag_to_filters`: other spellings a tag matches in model names."""


def control_types(modules: list[Any], entries: list[Any]) -> dict[str, Any]:
    """`/controlnet/control_types`, as sd-webui-controlnet's `select_control_type`: for
    "All" and each preprocessor tag, the modules carrying the tag (`none` first, labels),
    the usable models whose title holds the tag or an alias (`None` first), the default
    module (the first after `none`) and the default model (the first after `None`, a v1.1
    one, `11` in its name, preferred)."""
    titles = [NONE_MODEL, *(entry.title for entry in entries if not entry.error)]
    tags = sorted({tag for module in modules for tag in module.tags})
    found: dict[str, Any] = {
        "All": {
            "module_list": [module.label for module in modules],
            "model_list": titles,
            "default_option": "none",
            "default_model": NONE_MODEL,
        }
    }
    for tag in tags:
        chosen = [m for m in modules if tag in m.tags or m.name == "none"]
        patterns = (tag.lower(), *TAG_ALIASES.get(tag.lower(), ()))
        models = [t for t in titles if t == NONE_MODEL or any(p in t.lower() for p in patterns)]
        default_model = models[1] if len(models) > 1 else NONE_MODEL
        default_model = next((t for t in models[1:] if "11" in t.split("[")[0]), default_model)
        found[tag] = {
            "module_list": [module.label for module in chosen],
            "model_list": models,
            "default_option": (chosen[1] if len(chosen) > 1 else chosen[0]).label,
            "default_model": default_model,
        }
    return {"control_types": found}


def detect_request(body: object) -> tuple[str, list[Image.Image], int, float, float]:
    """`/controlnet/detect`'s body: module, images (`controlnet_input_images`, or
    webuiapi's `controlnet_images`), resolution and thresholds (-1: the module's)."""
    if not isinstance(body, dict):
        raise InvalidRequestError("the request body must be a JSON object", field="body")
    module = body.get("controlnet_module", "none")
    if not isinstance(module, str):
        raise InvalidRequestError("controlnet_module must be a string", field="controlnet_module")
    images = body.get("controlnet_input_images", body.get("controlnet_images", []))
    if not isinstance(images, list) or not images:
        raise InvalidRequestError("No image selected", field="controlnet_input_images")
    decoded = [
        decode_image(image, f"controlnet_input_images[{i}]") for i, image in enumerate(images)
    ]
    resolution = _integer("controlnet_processor_res", body.get("controlnet_processor_res", -1))
    a = _number("controlnet_threshold_a", body.get("controlnet_threshold_a", -1))
    b = _number("controlnet_threshold_b", body.get("controlnet_threshold_b", -1))
    return module, decoded, resolution, a, b


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def detect_response(maps: list[Image.Image]) -> dict[str, Any]:
    return {"images": [png_base64(image) for image in maps], "info": "Success"}
