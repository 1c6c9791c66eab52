"""Server-wide txt2img defaults kept by the admin in `<data-dir>/settings.json`.

Only the `txt2img_defaults` object of that file is read and written here (other keys are
kept as they are). Per-user choices never land here: they live in each page session.
Values are checked against schema.FIELDS and the engine's bounds; a bad value is ignored
with a warning, so a hand-edited file can never stop the server.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from pipelines.samplers import SAMPLER_NAMES, SCHEDULER_LABELS, SCHEDULER_NAMES
from pipelines.schema import Bounds, field_spec

log = logging.getLogger(__name__)

SECTION = "txt2img_defaults"
DEFAULT_FIELDS = (
    "negative_prompt",
    "sampler_name",
    "scheduler",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "batch_size",
    "n_iter",
    "clip_skip",
    "eta_noise_seed_delta",  # A1111 keeps ENSD as a server setting
)
"""The request fields an admin may give a server-wide default (schema.FIELDS names)."""


def settings_file(data_dir: Path) -> Path:
    return data_dir / "settings.json"


def check_default(name: str, value: object, bounds: Bounds) -> Any:
    """`value` as field `name` takes it, or raise ValueError saying why."""
    spec = field_spec(name, bounds)
    if spec.kind is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be text")
        schedulers = {s.lower() for s in (*SCHEDULER_NAMES, *SCHEDULER_LABELS)}
        if name == "sampler_name" and value not in SAMPLER_NAMES:
            raise ValueError(f"unknown sampler {value!r}")
        if name == "scheduler" and value.lower() not in schedulers:
            raise ValueError(f"unknown schedule type {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number")
    number = spec.kind(value)
    low, high = spec.minimum, spec.maximum
    if low is not None and high is not None and not low <= number <= high:
        raise ValueError(f"{name} must be between {spec.minimum:g} and {spec.maximum:g}")
    return number


def scheduler_label(scheduler: str) -> str:
    """A schedule name or label as the page's dropdown lists it ("karras" -> "Karras")."""
    for name, label in zip(SCHEDULER_NAMES, SCHEDULER_LABELS, strict=True):
        if scheduler.lower() in (name, label.lower()):
            return label
    return SCHEDULER_LABELS[0]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        log.warning("%s is unreadable (%s); using built-in defaults", path, error)
        return {}
    return data if isinstance(data, dict) else {}


def load_defaults(data_dir: Path, bounds: Bounds) -> dict[str, Any]:
    """Every DEFAULT_FIELDS value: the file's where valid, else schema's default."""
    stored = _read(settings_file(data_dir)).get(SECTION)
    stored = stored if isinstance(stored, dict) else {}
    values: dict[str, Any] = {}
    for name in DEFAULT_FIELDS:
        values[name] = field_spec(name, bounds).default
        if name in stored:
            try:
                values[name] = check_default(name, stored[name], bounds)
            except ValueError as error:
                log.warning("settings.json %s.%s ignored: %s", SECTION, name, error)
    return values


def save_defaults(data_dir: Path, values: dict[str, Any], bounds: Bounds) -> dict[str, Any]:
    """Check and persist `values` (atomic replace; other keys of the file are kept).
    Raises ValueError naming the first bad value."""
    checked = {name: check_default(name, values[name], bounds) for name in DEFAULT_FIELDS}
    path = settings_file(data_dir)
    data = _read(path)
    data[SECTION] = checked
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".settings-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            json.dump(data, stream, indent=2)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return checked
