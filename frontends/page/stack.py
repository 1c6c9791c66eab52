"""The page's LoRA stack as plain data, and the rules that tie it to the prompt.

A stack is a JSON list of rows `{"name", "weight", "te_weight"}` (te_weight null: same as
weight), with optional `"blocks"`: `{"in", "mid", "out"}` or `{"lbw": preset}`. It is
per session (a component value), travels with every request as `loras`, and is what the
API's `loras` parameter accepts.

The rule between stack rows and `<lora:...>` tags in the prompt is the core's
(`combine_stacks`): both apply; a LoRA named in both takes the tag's weight, and the page
shows the note "the prompt tag's weight replaces the stack weight" before and after
generating, so the two never disagree silently.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipelines.errors import InvalidRequestError, LorastackError
from pipelines.fewstep import FewStepSettings, suggest_for_lora
from pipelines.folders.loras import LoraEntry
from pipelines.images import open_image
from pipelines.interface import LoraCoverage
from pipelines.prompt import combine_stacks, extract_lora_tags, strip_lora_tags
from pipelines.schema import LORA_WEIGHT_LIMIT, BlockWeights, LoraSpec

REGION_KEYS = ("in", "mid", "out")

Row = dict[str, Any]
WEIGHT_MIN, WEIGHT_MAX, WEIGHT_STEP = -LORA_WEIGHT_LIMIT, LORA_WEIGHT_LIMIT, 0.05
THUMBNAIL = 128


def rows_from_value(value: object) -> list[Row]:
    """A stack from the `loras` value (a list, a JSON string of one, or None)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as error:
            raise InvalidRequestError(f"loras is not valid JSON: {error}", field="loras") from None
    if not isinstance(value, list):
        raise InvalidRequestError("loras must be a list of {name, weight}", field="loras")
    rows = []
    for index, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequestError(f"loras[{index}] must be {{name, weight}}", field="loras")
        te = item.get("te_weight")
        row: Row = {
            "name": item["name"],
            "weight": _number(item.get("weight", 1.0), index),
            "te_weight": None if te is None else _number(te, index),
        }
        if item.get("blocks"):
            row["blocks"] = _blocks_row(item["blocks"], index)
        rows.append(row)
    return rows


def _blocks_row(value: object, index: int) -> dict[str, Any]:
    """A row's block weights: `{"in", "mid", "out"}` numbers or `{"lbw": preset or list}`."""
    where = f"loras[{index}].blocks"
    if not isinstance(value, dict) or not set(value) <= {*REGION_KEYS, "lbw"}:
        raise InvalidRequestError(f"{where} must be {{in, mid, out}} or {{lbw}}", field="loras")
    lbw = value.get("lbw")
    if isinstance(lbw, list):
        lbw = tuple(_number(v, index) for v in lbw)
    regions = [None if value.get(k) is None else _number(value[k], index) for k in REGION_KEYS]
    try:
        BlockWeights(*regions, lbw=lbw).check(where)
    except InvalidRequestError as error:
        raise InvalidRequestError(error.message, field="loras") from None
    return dict(value)


def blocks_of(row: Row) -> BlockWeights | None:
    """A row's block weights as the request's type (None: plain)."""
    blocks = row.get("blocks")
    if not blocks:
        return None
    lbw = blocks.get("lbw")
    regions = (blocks.get(key) for key in REGION_KEYS)
    return BlockWeights(*regions, lbw=tuple(lbw) if isinstance(lbw, list) else lbw)


def row_of(spec: LoraSpec) -> Row | None:
    """The stack row of a tag's spec, or None when a row cannot hold it (keyframes, hires
    weights)."""
    if not spec.steady:
        return None
    row: Row = {"name": spec.name, "weight": spec.weight, "te_weight": spec.te_weight}
    blocks = spec.blocks
    if blocks is not None:
        if blocks.lbw is not None:
            lbw = blocks.lbw
            row["blocks"] = {"lbw": lbw if isinstance(lbw, str) else list(lbw)}
        else:
            regions = zip(REGION_KEYS, (blocks.down, blocks.mid, blocks.up), strict=True)
            row["blocks"] = {key: value for key, value in regions if value is not None}
    return row


def _number(value: object, index: int) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequestError(f"loras[{index}] weight must be a number", field="loras")
    return float(value)


def specs_from_rows(rows: list[Row]) -> tuple[LoraSpec, ...]:
    """The request's `loras` (the engine validates names and weights)."""
    return tuple(LoraSpec(r["name"], r["weight"], r.get("te_weight"), blocks_of(r)) for r in rows)


def add_row(rows: list[Row], entry: LoraEntry) -> list[Row]:
    """Append `entry` at its sidecar's preferred weight (else 1); a second click is a no-op."""
    if any(r["name"] == entry.name for r in rows):
        return rows
    return [*rows, {"name": entry.name, "weight": entry.preferred_weight or 1.0, "te_weight": None}]


def set_row(rows: list[Row], name: str, key: str, value: object) -> list[Row]:
    """Rows with `name`'s `key` ("weight", "te_weight" or "blocks") set to `value`."""
    return [{**r, key: value} if r["name"] == name else r for r in rows]


NO_PRESET = "(sliders)"
"""The preset picker's choice that leaves the in/mid/out sliders in force."""


def blocks_value(down: float, mid: float, up: float, preset: str | None) -> dict[str, Any] | None:
    """A row's `blocks` from its per-block section: the preset when one is picked, else
    the three sliders (None when all are 1: the plain LoRA)."""
    if preset and preset != NO_PRESET:
        return {"lbw": preset}
    values = {"in": float(down), "mid": float(mid), "out": float(up)}
    return None if all(v == 1.0 for v in values.values()) else values


def remove_row(rows: list[Row], name: str) -> list[Row]:
    return [r for r in rows if r["name"] != name]


def conflict_notes(prompt: str, rows: list[Row]) -> list[str]:
    """What the engine will say about this prompt + stack, before generating."""
    try:
        _, tags = extract_lora_tags(prompt or "")
    except LorastackError as error:
        return [error.message]
    return combine_stacks(specs_from_rows(rows), tags)[1]


def fit_notes(
    prompt: str,
    rows: list[Row],
    resolve: Callable[[str], LoraEntry],
    family: str | None,
) -> list[str]:
    """Rows and prompt tags that will not apply on a `family` checkpoint, each with why
    (unknown, unusable, made for another base): said as soon as they stop fitting, not
    at Generate. `resolve` looks a name up as the engine does (raising when unknown)."""
    try:
        _, tags = extract_lora_tags(prompt or "")
    except LorastackError:
        tags = []  # conflict_notes reports the malformed tag
    found = []
    places = [("stack row", r["name"], r["name"]) for r in rows]
    places += [("prompt tag", f"<lora:{spec.name}>", spec.name) for spec in tags]
    for where, label, name in places:
        try:
            reason = incompatibility(resolve(name), family)
        except LorastackError as error:
            reason = error.message
        if reason:
            found.append(f"{where} {label} does not fit: {reason}")
    return found


def move_tags_to_stack(prompt: str, rows: list[Row]) -> tuple[str, list[Row]]:
    """Take the prompt's `<lora:...>` tags out into stack rows (a tag replaces a row of the
    same name, as it would when generating); other text and tags stay."""
    _, tags = extract_lora_tags(prompt or "")
    if not tags:
        return prompt, rows
    tagged = {spec.name.lower() for spec in tags}
    kept = [r for r in rows if r["name"].lower() not in tagged]
    added = [row for row in map(row_of, tags) if row is not None]
    # a tag with keyframes or hires weights says more than a row can hold
    stay = {spec.name.lower() for spec in tags if row_of(spec) is None}
    return strip_lora_tags(prompt, keep=stay), [*kept, *added]


def trigger_text(entry: LoraEntry) -> str:
    """What "insert trigger words" adds: the sidecar's activation text, else the top tags."""
    return entry.activation_text.strip() or ", ".join(entry.trigger_words)


def insert_text(prompt: str, text: str) -> str:
    """`prompt` with `text` appended after a comma, unless it is already there."""
    if not text or text in (prompt or ""):
        return prompt
    base = (prompt or "").rstrip().rstrip(",")
    return f"{base}, {text}" if base else text


def incompatibility(entry: LoraEntry, family: str | None) -> str | None:
    """Why `entry` cannot be stacked on a `family` checkpoint, or None when it can."""
    if entry.error:
        return entry.error
    if family and entry.families and family not in entry.families:
        return f"made for {entry.architecture}; the checkpoint is {family}"
    return None


def matches(entry: LoraEntry, query: str, kind: str, family: str | None) -> bool:
    """The list's search (name, alias, trigger words, path) and architecture filter."""
    if kind == "Compatible" and incompatibility(entry, family):
        return False
    if kind not in ("All", "Compatible") and kind not in entry.families:
        return False
    words = (query or "").lower().split()
    haystack = " ".join((entry.name, entry.alias, entry.relpath, *entry.trigger_words)).lower()
    return all(word in haystack for word in words)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


@lru_cache(maxsize=512)
def _thumbnail(path: str, mtime_ns: int) -> str | None:
    """A small inline JPEG of a preview image (inline, so no file path is ever served)."""
    try:
        with open_image(path, "preview") as image:
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            image.convert("RGB").save(buffer, format="JPEG", quality=80)
    except (OSError, InvalidRequestError):
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def preview_uri(preview: Path | None) -> str | None:
    if preview is None:
        return None
    try:
        return _thumbnail(str(preview), preview.stat().st_mtime_ns)
    except OSError:
        return None


def fewstep_html(suggestion: FewStepSettings | None) -> str:
    """The suggested settings of a few-step model (LCM, Turbo, Lightning, Hyper-SD, TCD),
    its model card and what gave it away in the tooltip; "" for a plain one."""
    if suggestion is None:
        return ""
    tip = f"from the {suggestion.matched}; model card {suggestion.source}"
    if suggestion.note:
        tip += f"; {suggestion.note}"
    return (
        f'<div class="lora-fewstep" title="{html.escape(tip)}">'
        f"⚡ {html.escape(suggestion.summary())}</div>"
    )


def coverage_html(report: LoraCoverage | str) -> str:
    """A card's coverage report against the loaded checkpoint: modules matched by region
    and every skipped or ignored key, or the sentence saying why there is none yet."""
    if isinstance(report, str):
        return f'<div class="lora-coverage">{html.escape(report)}</div>'
    mark = "✓" if report.complete else "⚠"
    head = f"{mark} {report.matched} of {report.total} modules match ({report.breakdown()})"
    lists = [("skipped (no such layer)", report.skipped), ("ignored (not merged)", report.ignored)]
    details = "".join(
        f"<details><summary>{len(keys)} {label}</summary>"
        + "".join(f"<div><code>{html.escape(key)}</code></div>" for key in keys)
        + "</details>"
        for label, keys in lists
        if keys
    )
    return f'<div class="lora-coverage">{html.escape(head)}{details}</div>'


def card_html(entry: LoraEntry, reason: str | None) -> str:
    """One card of the list: preview, name, architecture, rank, size, trigger words, and
    a few-step LoRA's suggested sampler, schedule, steps and CFG."""
    uri = preview_uri(entry.preview)
    image = (
        f'<img class="lora-thumb" src="{uri}" alt="">'
        if uri
        else '<div class="lora-thumb lora-nothumb">no preview</div>'
    )
    ranks = ", ".join(str(r) for r in entry.ranks) or "?"
    facts = f"{entry.architecture or 'unknown'} · rank {ranks} · {human_size(entry.size)}"
    alias = (
        f'<div class="lora-alias">alias {html.escape(entry.alias)}</div>'
        if entry.alias != entry.name
        else ""
    )
    words = trigger_text(entry)
    trigger = f'<div class="lora-words">{html.escape(words)}</div>' if words else ""
    why = f'<div class="lora-why">⚠ {html.escape(reason)}</div>' if reason else ""
    fewstep = fewstep_html(suggest_for_lora(entry))
    return (
        f'<div class="lora-card-body" title="{html.escape(entry.relpath)}">{image}'
        f'<div class="lora-name">{html.escape(entry.name)}</div>{alias}'
        f'<div class="lora-facts">{html.escape(facts)}</div>{fewstep}{trigger}{why}</div>'
    )
