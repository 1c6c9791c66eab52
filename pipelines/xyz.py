"""A1111 1.10's "X/Y/Z plot" script (`scripts/xyz_grid.py`, `modules/images.py`
`image_grid`/`draw_grid_annotations`): one request per cell, run as one series job in an
order that prepares each checkpoint and LoRA stack once, then the grid with its legend.

Axes are A1111's, by label and by the index A1111's API uses (its txt2img or img2img
list, which differ), plus our "LoRA weight" axis appended after A1111's list. An axis we
lack is refused, naming it. Values take A1111's syntax: a comma-separated list (CSV
quoting), `1-5`, `1-5 (+2)`, `0.2-1 [5]`.
"""

from __future__ import annotations

import csv
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from io import StringIO
from itertools import chain, permutations
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipelines.errors import InvalidRequestError
from pipelines.schema import (
    SEED_MAX,
    VAE_AUTOMATIC,
    VAE_NONE,
    Bounds,
    GenerationRequest,
    GenerationResult,
    LoraSpec,
)

SCRIPT_TITLE = "X/Y/Z plot"
FIELD = "script_args"
GRID_PIXEL_FACTOR = 16
"""A grid may have this many times the generation pixel limit (it is made cell by cell)."""
LORA_WEIGHT = "LoRA weight"

Apply = Callable[[GenerationRequest, Any, list[Any]], GenerationRequest]


@dataclass(frozen=True)
class Axis:
    """One axis kind: A1111's label and value type; `apply` None means we lack it."""

    label: str
    kind: str  # "int", "float", "str", "permutations", "lora", "nothing"
    apply: Apply | None
    cost: float = 0.0  # the costliest axis is iterated outermost
    labelled: bool = True  # the legend writes "Label: value" (A1111's format_value_add_label)
    only: str | None = None  # "txt2img" or "img2img": A1111's AxisOptionTxt2Img/Img2Img


def _field(name: str) -> Apply:
    return lambda request, value, _values: replace(request, **{name: value})


def _hires(name: str) -> Apply:
    def apply(request: GenerationRequest, value: Any, _values: list[Any]) -> GenerationRequest:
        if request.hires is None:
            raise InvalidRequestError(
                "X/Y/Z plot: a Hires axis needs Hires fix on (enable_hr)", field=FIELD
            )
        return replace(request, hires=replace(request.hires, **{name: value}))

    return apply


def _prompt_sr(request: GenerationRequest, value: str, values: list[Any]) -> GenerationRequest:
    search = values[0]
    if search not in request.prompt and search not in request.negative_prompt:
        raise InvalidRequestError(
            f"Prompt S/R did not find {search} in prompt or negative prompt.", field=FIELD
        )
    return replace(
        request,
        prompt=request.prompt.replace(search, value),
        negative_prompt=request.negative_prompt.replace(search, value),
    )


def _prompt_order(
    request: GenerationRequest, value: tuple[str, ...], _values: list[Any]
) -> GenerationRequest:
    """A1111's apply_order: the tokens, found in the prompt, put back in `value`'s order."""
    prompt = request.prompt
    found = sorted((prompt.find(token), token) for token in value)
    parts = []
    for _, token in found:
        at = prompt.find(token)
        parts.append(prompt[:at])
        prompt = prompt[at + len(token) :]
    rebuilt = "".join(part + value[index] for index, part in enumerate(parts))
    return replace(request, prompt=rebuilt + prompt)


def _size(request: GenerationRequest, value: str, _values: list[Any]) -> GenerationRequest:
    width, _, height = value.partition("x")
    try:
        return replace(request, width=int(width.strip()), height=int(height.strip()))
    except ValueError:
        raise InvalidRequestError(
            f"X/Y/Z plot: Size {value!r} must be WIDTHxHEIGHT, e.g. 512x768", field=FIELD
        ) from None


def _vae(request: GenerationRequest, value: str, _values: list[Any]) -> GenerationRequest:
    """A1111's apply_vae: `auto`/`automatic` and `none` (any case) are the special
    choices; anything else names a VAE (resolved, case-insensitively, when queued)."""
    special = {"auto": VAE_AUTOMATIC, "automatic": VAE_AUTOMATIC, "none": VAE_NONE}
    return replace(request, vae=special.get(value.strip().lower(), value.strip()))


def _styles(request: GenerationRequest, value: str, _values: list[Any]) -> GenerationRequest:
    """A1111's apply_styles: the value's comma-separated names added to the request's."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    return replace(request, styles=(*request.styles, *names))


def _noise_multiplier(
    request: GenerationRequest, value: float, _values: list[Any]
) -> GenerationRequest:
    assert request.img2img is not None  # an img2img-only axis
    return replace(request, img2img=replace(request.img2img, initial_noise_multiplier=value))


def lora_weight(request: GenerationRequest, name: str, weight: float) -> GenerationRequest:
    """`name` at `weight`: its prompt tags rewritten, else its stack row, else added."""
    pattern = re.compile(r"<lora:" + re.escape(name) + r"(:[^>]*)?>")
    if pattern.search(request.prompt):
        written = f"{weight:.8f}".rstrip("0").rstrip(".")
        prompt = pattern.sub(f"<lora:{name}:{written}>", request.prompt)
        return replace(request, prompt=prompt)
    rows = list(request.loras)
    for index, row in enumerate(rows):
        if row.name == name:
            rows[index] = LoraSpec(name, weight)
            return replace(request, loras=tuple(rows))
    return replace(request, loras=(*rows, LoraSpec(name, weight)))


def _lora(request: GenerationRequest, value: tuple[str, float], _values: list[Any]) -> Any:
    return lora_weight(request, *value)


def _refiner(request: GenerationRequest, value: str, _values: list[Any]) -> GenerationRequest:
    """A1111's choices start with "None": no refiner."""
    return replace(request, refiner_checkpoint=None if value in ("", "None") else value)


def _lacking(label: str, only: str | None = None) -> Axis:
    return Axis(label, "str", None, only=only)


AXES: tuple[Axis, ...] = (
    Axis("Nothing", "nothing", lambda request, _v, _vs: request, labelled=False),
    Axis("Seed", "int", _field("seed")),
    Axis("Var. seed", "int", _field("subseed")),
    Axis("Var. strength", "float", _field("subseed_strength")),
    Axis("Steps", "int", _field("steps")),
    Axis("Hires steps", "int", _hires("second_pass_steps"), only="txt2img"),
    Axis("CFG Scale", "float", _field("cfg_scale")),
    _lacking("Image CFG Scale", "img2img"),
    Axis("Prompt S/R", "str", _prompt_sr, labelled=False),
    Axis("Prompt order", "permutations", _prompt_order, labelled=False),
    Axis("Sampler", "str", _field("sampler_name"), labelled=False, only="txt2img"),
    Axis("Hires sampler", "str", _hires("sampler_name"), only="txt2img"),
    Axis("Sampler", "str", _field("sampler_name"), labelled=False, only="img2img"),
    Axis("Checkpoint name", "str", _field("checkpoint"), cost=1.0, labelled=False),
    _lacking("Negative Guidance minimum sigma"),
    _lacking("Sigma Churn"),
    _lacking("Sigma min"),
    _lacking("Sigma max"),
    _lacking("Sigma noise"),
    Axis("Schedule type", "str", _field("scheduler")),
    _lacking("Schedule min sigma"),
    _lacking("Schedule max sigma"),
    _lacking("Schedule rho"),
    _lacking("Beta schedule alpha"),
    _lacking("Beta schedule beta"),
    _lacking("Eta"),
    Axis("Clip skip", "int", _field("clip_skip")),
    Axis("Denoising", "float", _field("denoising_strength")),
    Axis("Initial noise multiplier", "float", None),  # img2img only: set in axes_for
    _lacking("Extra noise"),
    Axis("Hires upscaler", "str", _hires("upscaler"), only="txt2img"),
    _lacking("Cond. Image Mask Weight", "img2img"),
    Axis("VAE", "str", _vae, cost=0.7),
    Axis("Styles", "str", _styles),
    _lacking("UniPC Order"),
    _lacking("Face restore"),
    _lacking("Token merging ratio"),
    _lacking("Token merging ratio high-res"),
    _lacking("Always discard next-to-last sigma"),
    _lacking("SGM noise multiplier"),
    Axis("Refiner checkpoint", "str", _refiner, cost=1.0, labelled=False),
    Axis("Refiner switch at", "float", _field("refiner_switch_at")),
    Axis("RNG source", "str", _field("randn_source")),
    _lacking("FP8 mode"),
    Axis("Size", "str", _size),
    Axis(LORA_WEIGHT, "lora", _lora, cost=0.8, labelled=False),  # ours, after A1111's list
)
"""A1111 1.10's `axis_options` in order (txt2img and img2img entries both), then ours."""


def axes_for(img2img: bool) -> list[Axis]:
    """The axis list A1111's script shows for a tab; an API's `x_type` indexes it."""
    listed = []
    for axis in AXES:
        if axis.only not in (None, "img2img" if img2img else "txt2img"):
            continue
        if axis.label == "Initial noise multiplier" and img2img:
            axis = replace(axis, apply=_noise_multiplier)
        listed.append(axis)
    return listed


_RE_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_RE_RANGE_FLOAT = re.compile(
    r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*"
)
_RE_RANGE_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
_RE_RANGE_COUNT_FLOAT = re.compile(
    r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*"
)


def csv_values(text: str) -> list[str]:
    """A1111's `csv_string_to_list_strip`: CSV cells, stripped (empty ones kept out)."""
    cells = chain.from_iterable(csv.reader(StringIO(text)))
    return [cell.strip() for cell in cells if cell.strip()]


def _number(text: str, kind: type, label: str) -> Any:
    try:
        return kind(text.replace(" ", "")) if isinstance(text, str) else kind(text)
    except ValueError:
        raise InvalidRequestError(
            f"X/Y/Z plot: {label} value {text!r} is not a {kind.__name__} or a range "
            "(1-5, 1-5 (+2), 0.2-1 [5])",
            field=FIELD,
        ) from None


def expand_numbers(values: Sequence[Any], kind: type, label: str = "axis") -> list[Any]:
    """A1111's ranges: `1-5`, `1-5 (+2)` (step), `0.2-1 [5]` (count, ends included)."""
    out: list[Any] = []
    for value in values:
        if not isinstance(value, str):
            out.append(_number(value, kind, label))
            continue
        whole = kind is int
        step_match = (_RE_RANGE if whole else _RE_RANGE_FLOAT).fullmatch(value)
        count_match = (_RE_RANGE_COUNT if whole else _RE_RANGE_COUNT_FLOAT).fullmatch(value)
        if step_match is not None:
            start = _number(step_match[1], kind, label)
            end = _number(step_match[2], kind, label)
            step = _number(step_match[3], kind, label) if step_match[3] else kind(1)
            if step == 0:
                raise InvalidRequestError(f"X/Y/Z plot: {label} range step 0", field=FIELD)
            if whole:
                out += list(range(start, end + 1, step))
            else:
                out += np.arange(start, end + step, step).tolist()
        elif count_match is not None:
            start = _number(count_match[1], kind, label)
            end = _number(count_match[2], kind, label)
            count = int(float(count_match[3])) if count_match[3] else 1
            spaced = np.linspace(start=start, stop=end, num=count).tolist()
            out += [int(x) for x in spaced] if whole else spaced
        else:
            out.append(_number(value, kind, label))
    return out


def axis_values(axis: Axis, text: str, dropdown: Sequence[str] | None = None) -> list[Any]:
    """The typed values of one axis from its text (or, for the page's dropdown mode, the
    chosen values), as A1111's `process_axis`."""
    if axis.kind == "nothing":
        return [0]
    cells = list(dropdown) if dropdown else csv_values(text)
    if not cells:
        raise InvalidRequestError(f"X/Y/Z plot: {axis.label} has no values", field=FIELD)
    if axis.kind == "int":
        return expand_numbers(cells, int, axis.label)
    if axis.kind == "float":
        return expand_numbers(cells, float, axis.label)
    if axis.kind == "permutations":
        return list(permutations(cells))
    if axis.kind == "lora":
        return _lora_values(text, dropdown)
    return cells


def _lora_values(text: str, dropdown: Sequence[str] | None) -> list[tuple[str, float]]:
    """`NAME: weights` (weights in the number syntax), e.g. `ink: 0-1 [5]`."""
    source = ", ".join(dropdown) if dropdown else text
    name, colon, weights = source.partition(":")
    if not colon or not name.strip():
        raise InvalidRequestError(
            "X/Y/Z plot: LoRA weight values are NAME: WEIGHTS, e.g. `ink: 0, 0.5, 1` or "
            "`ink: 0-1 [5]`",
            field=FIELD,
        )
    numbers = expand_numbers(csv_values(weights), float, LORA_WEIGHT)
    if not numbers:
        raise InvalidRequestError(f"X/Y/Z plot: LoRA {name.strip()} has no weights", field=FIELD)
    # ranges make 0.6000000000000001; a weight is written into tags and infotexts
    return [(name.strip(), round(weight, 8)) for weight in numbers]


def format_value(axis: Axis, value: Any) -> str:
    """The legend text of one value (A1111's format_value functions)."""
    if axis.kind == "nothing":
        return ""
    if isinstance(value, float):
        value = round(value, 8)
    if axis.kind == "permutations":
        return ", ".join(value)
    if axis.kind == "lora":
        name, weight = value
        return f"{name}: {round(weight, 8)}"
    if axis.label in ("Checkpoint name", "Refiner checkpoint"):
        return str(value).replace("\\", "/").rsplit("/", 1)[-1]
    return f"{axis.label}: {value}" if axis.labelled else str(value)


@dataclass(frozen=True)
class AxisSpec:
    """One axis as a client sets it: A1111's type (label or index), values text, and the
    page's dropdown choices."""

    type: str | int = "Nothing"
    values: str = ""
    dropdown: tuple[str, ...] = ()


@dataclass(frozen=True)
class XyzPlot:
    """The script's settings, as A1111 1.10's `run` arguments."""

    x: AxisSpec = AxisSpec("Seed")
    y: AxisSpec = AxisSpec()
    z: AxisSpec = AxisSpec()
    draw_legend: bool = True
    include_lone_images: bool = False
    include_sub_grids: bool = False
    no_fixed_seeds: bool = False
    vary_seeds_x: bool = False
    vary_seeds_y: bool = False
    vary_seeds_z: bool = False
    margin_size: int = 0
    csv_mode: bool = False


def xyz_from_script_args(args: Sequence[Any]) -> XyzPlot:
    """A1111 1.10's `script_args` for "x/y/z plot": x_type, x_values, x_values_dropdown,
    y_type, ..., z_values_dropdown, draw_legend, include_lone_images, include_sub_grids,
    no_fixed_seeds, vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode."""
    if not isinstance(args, list | tuple):
        raise InvalidRequestError("x/y/z plot: script_args must be a list", field=FIELD)
    defaults = [0, "", [], 0, "", [], 0, "", [], True, False, False, False]
    padded = list(args) + [None] * (18 - len(args))
    if len(args) > 18:
        raise InvalidRequestError(
            f"x/y/z plot: script_args has {len(args)} values; A1111 1.10's script takes 18",
            field=FIELD,
        )
    values = [
        default if given is None else given
        for given, default in zip(padded[:13], defaults, strict=True)
    ]
    flags = [bool(v) if v is not None else False for v in padded[13:16]]

    def axis(at: int) -> AxisSpec:
        kind, text, chosen = values[at], values[at + 1], values[at + 2]
        if not isinstance(kind, int | str) or isinstance(kind, bool):
            raise InvalidRequestError(
                f"x/y/z plot: script_args[{at}] must be an axis index or label", field=FIELD
            )
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"x/y/z plot: script_args[{at + 1}] must be text", field=FIELD
            )
        if not isinstance(chosen, list) or not all(isinstance(c, str) for c in chosen):
            raise InvalidRequestError(
                f"x/y/z plot: script_args[{at + 2}] must be a list of strings", field=FIELD
            )
        return AxisSpec(kind, text, tuple(chosen))

    margin = padded[16] if padded[16] is not None else 0
    if not isinstance(margin, int | float) or isinstance(margin, bool) or not 0 <= margin <= 500:
        raise InvalidRequestError("x/y/z plot: margin_size must be 0..500", field=FIELD)
    return XyzPlot(
        axis(0),
        axis(3),
        axis(6),
        draw_legend=bool(values[9]),
        include_lone_images=bool(values[10]),
        include_sub_grids=bool(values[11]),
        no_fixed_seeds=bool(values[12]),
        vary_seeds_x=flags[0],
        vary_seeds_y=flags[1],
        vary_seeds_z=flags[2],
        margin_size=int(margin),
        csv_mode=bool(padded[17]),
    )


def find_axis(kind: str | int, img2img: bool) -> Axis:
    """The axis a client names, by A1111's index for the tab or by label (any case)."""
    listed = axes_for(img2img)
    if isinstance(kind, int):
        if not 0 <= kind < len(listed):
            raise InvalidRequestError(
                f"x/y/z plot: axis index {kind} is not in 0..{len(listed) - 1}", field=FIELD
            )
        axis = listed[kind]
    else:
        matches = [a for a in listed if a.label.casefold() == kind.strip().casefold()]
        if not matches:
            names = ", ".join(a.label for a in listed if a.apply is not None)
            raise InvalidRequestError(
                f"x/y/z plot: unknown axis {kind!r}; axes: {names}", field=FIELD
            )
        axis = matches[0]
    if axis.apply is None:
        raise InvalidRequestError(
            f"x/y/z plot: the {axis.label!r} axis is not implemented in lorastack", field=FIELD
        )
    return axis


@dataclass
class Cell:
    ix: int
    iy: int
    iz: int
    request: GenerationRequest


@dataclass
class GridPlan:
    """The cells in the order they run, and what the grid needs afterwards."""

    axes: tuple[Axis, Axis, Axis]
    values: tuple[list[Any], list[Any], list[Any]]
    texts: tuple[str, str, str]  # the values text each axis was given
    cells: list[Cell]  # in run order
    plot: XyzPlot
    base: GenerationRequest

    @property
    def shape(self) -> tuple[int, int, int]:
        return len(self.values[0]), len(self.values[1]), len(self.values[2])


def plan_grid(
    base: GenerationRequest,
    plot: XyzPlot,
    bounds: Bounds,
    choose_seed: Callable[[], int] = lambda: random.randint(0, SEED_MAX),
) -> GridPlan:
    """Every cell's request, ordered as A1111 orders them (the costliest axis outermost:
    checkpoint, then LoRA weight), so each checkpoint and stack is prepared once."""
    img2img = base.img2img is not None
    axes = tuple(find_axis(spec.type, img2img) for spec in (plot.x, plot.y, plot.z))
    specs = (plot.x, plot.y, plot.z)
    values = tuple(
        axis_values(axis, spec.values, spec.dropdown if not plot.csv_mode else None)
        for axis, spec in zip(axes, specs, strict=True)
    )
    if not plot.no_fixed_seeds:  # A1111's fix_seed and fix_axis_seeds
        base = replace(
            base,
            seed=choose_seed() if base.seed == -1 else base.seed,
            subseed=choose_seed() if base.subseed == -1 else base.subseed,
        )
        values = tuple(
            [choose_seed() if v in (-1, "", None) else v for v in vals]
            if axis.label in ("Seed", "Var. seed")
            else vals
            for axis, vals in zip(axes, values, strict=True)
        )
    xs, ys, zs = values
    cells_count = len(xs) * len(ys) * len(zs)
    pixels = cells_count * base.width * base.height
    if pixels > GRID_PIXEL_FACTOR * bounds.max_pixels:
        raise InvalidRequestError(
            f"x/y/z plot: {cells_count} cells of {base.width}x{base.height} exceed the grid "
            f"limit of {GRID_PIXEL_FACTOR * bounds.max_pixels} pixels "
            f"({GRID_PIXEL_FACTOR} x the image limit)",
            field=FIELD,
        )
    order = _order(axes)
    cells = []
    for indices in _iterate(order, (len(xs), len(ys), len(zs))):
        ix, iy, iz = indices
        request = base
        for axis, vals, index in zip(axes, values, indices, strict=True):
            assert axis.apply is not None
            request = axis.apply(request, vals[index], vals)
        seed_offset = (
            (ix if plot.vary_seeds_x else 0)
            + (iy * len(xs) if plot.vary_seeds_y else 0)
            + (iz * len(xs) * len(ys) if plot.vary_seeds_z else 0)
        )
        if seed_offset and request.seed != -1:
            request = replace(request, seed=(request.seed + seed_offset) % (SEED_MAX + 1))
        cells.append(Cell(ix, iy, iz, request))
    texts = tuple(spec.values for spec in specs)
    return GridPlan(axes, values, texts, cells, plot, base)  # type: ignore[arg-type]


def _order(axes: tuple[Axis, Axis, Axis]) -> tuple[str, str]:
    """A1111's first and second processed axes (the costliest outermost; ties: z, y)."""
    x, y, z = (axis.cost for axis in axes)
    if x > y and x > z:
        return "x", "y" if y > z else "z"
    if y > x and y > z:
        return "y", "x" if x > z else "z"
    if z > x and z > y:
        return "z", "x" if x > y else "y"
    return "z", "y"


def _iterate(order: tuple[str, str], sizes: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    first, second = order
    third = ({"x", "y", "z"} - {first, second}).pop()
    names = (first, second, third)
    position = {"x": 0, "y": 1, "z": 2}
    out = []
    for a in range(sizes[position[first]]):
        for b in range(sizes[position[second]]):
            for c in range(sizes[position[third]]):
                index = [0, 0, 0]
                for name, value in zip(names, (a, b, c), strict=True):
                    index[position[name]] = value
                out.append((index[0], index[1], index[2]))
    return out


# -- the grid image


def image_grid(images: Sequence[Image.Image], rows: int | None = None) -> Image.Image:
    """A1111's `image_grid` (default options: rows = round(sqrt(n)))."""
    rows = rows or max(1, round(math.sqrt(len(images))))
    cols = math.ceil(len(images) / rows)
    width, height = images[0].size
    grid = Image.new("RGB", (cols * width, rows * height), "black")
    for index, image in enumerate(images):
        grid.paste(image, (index % cols * width, index // cols * height))
    return grid


@dataclass
class _Line:
    text: str
    size: tuple[int, int] = (0, 0)
    allowed: float = 0.0


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font (A1111 ships Roboto; the layout is the same)."""
    return ImageFont.load_default(max(size, 1))


def draw_grid_annotations(
    grid: Image.Image,
    width: int,
    height: int,
    hor_texts: list[str],
    ver_texts: list[str],
    margin: int = 0,
) -> Image.Image:
    """A1111 1.10's `draw_grid_annotations`: column labels on top, row labels on the left
    (wrapped to the cell, shrunk when a word is wider), cells `margin` pixels apart."""
    fontsize = (width + height) // 25
    spacing = fontsize // 2
    font = _font(fontsize)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1), "white"))
    pad_left = 0 if sum(len(t) for t in ver_texts) == 0 else width * 3 // 4
    cols, rows = grid.width // width, grid.height // height

    def wrap(text: str, allowed: float) -> list[_Line]:
        lines = [""]
        for word in text.split():
            line = f"{lines[-1]} {word}".strip()
            if measure.textlength(line, font=font) <= allowed:
                lines[-1] = line
            else:
                lines.append(word)
        out = []
        for line in lines:
            box = measure.multiline_textbbox((0, 0), line, font=font)
            out.append(_Line(line, (box[2] - box[0], box[3] - box[1]), allowed))
        return out

    hor = [wrap(text, width) for text in hor_texts]
    ver = [wrap(text, pad_left) for text in ver_texts]
    hor_heights = [sum(li.size[1] + spacing for li in lines) - spacing for lines in hor]
    ver_heights = [
        sum(li.size[1] + spacing for li in lines) - spacing * len(lines) for lines in ver
    ]
    pad_top = 0 if sum(hor_heights) == 0 else max(hor_heights) + spacing * 2
    result = Image.new(
        "RGB",
        (grid.width + pad_left + margin * (cols - 1), grid.height + pad_top + margin * (rows - 1)),
        "white",
    )
    for row in range(rows):
        for col in range(cols):
            cell = grid.crop((width * col, height * row, width * (col + 1), height * (row + 1)))
            result.paste(
                cell, (pad_left + (width + margin) * col, pad_top + (height + margin) * row)
            )
    draw = ImageDraw.Draw(result)

    def draw_lines(x: float, y: float, lines: list[_Line]) -> None:
        for line in lines:
            size, fitted = fontsize, font
            while size > 1 and draw.multiline_textbbox((0, 0), line.text, font=fitted)[2] > max(
                line.allowed, 1
            ):
                size -= 1
                fitted = _font(size)
            draw.multiline_text(
                (x, y + line.size[1] / 2), line.text, font=fitted, fill=(0, 0, 0), anchor="mm"
            )
            y += line.size[1] + spacing

    for col in range(cols):
        x = pad_left + (width + margin) * col + width / 2
        draw_lines(x, pad_top / 2 - hor_heights[col] / 2, hor[col])
    for row in range(rows):
        y = pad_top + (height + margin) * row + height / 2 - ver_heights[row] / 2
        draw_lines(pad_left / 2, y, ver[row])
    return result


@dataclass
class GridOutput:
    """What the script returns, as A1111's Processed: the grid first (then sub-grids and
    cell images when asked), an infotext and a seed per image, and which are grids."""

    images: list[Image.Image] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    grids: int = 0  # the first `grids` images are grids (saved to the grids folder)
    interrupted: bool = False
    first: GenerationResult | None = None  # the first cell's result (model, request used)
    unshown: list[tuple[Image.Image, str, int]] = field(default_factory=list)
    """Cell images not among `images` (no Include Sub Images): saved all the same, each
    with its own infotext, as A1111 saves every image it makes."""

    def as_result(self, request: GenerationRequest) -> GenerationResult:
        """The output as one GenerationResult (what the API and the page show)."""
        first = self.first
        return GenerationResult(
            images=list(self.images),
            seeds=list(self.seeds),
            infotexts=list(self.infotexts),
            request=first.request if first is not None else request,
            model_name=first.model_name if first is not None else "",
            model_hash=first.model_hash if first is not None else None,
            interrupted=self.interrupted,
            notes=[note for note in (first.notes if first is not None else [])],
            lora_coverage=list(first.lora_coverage) if first is not None else [],
        )


def _with_params(infotext: str, params: dict[str, str]) -> str:
    """`infotext` with `params` added before its `Version` (A1111 writes a script's keys
    among the extra generation parameters)."""
    from pipelines.infotext import quote

    head, _, last = infotext.rpartition("\n")
    added = ", ".join(f"{key}: {quote(value)}" for key, value in params.items())
    marker = ", Version: "
    if marker in last:
        before, _, version = last.rpartition(marker)
        last = f"{before}, {added}{marker}{version}"
    else:
        last = f"{last}, {added}" if last else added
    return f"{head}\n{last}" if head else last


def assemble_grid(plan: GridPlan, results: Sequence[GenerationResult]) -> GridOutput:
    """The grid(s) from the cells' results (in the plan's run order); a cell that did not
    run (interrupted) is black, as A1111's empty cells."""
    xs, ys, zs = plan.values
    count = len(xs) * len(ys) * len(zs)
    images: list[Image.Image | None] = [None] * count
    infotexts: list[str | None] = [None] * count
    seeds: list[int | None] = [None] * count
    for cell, result in zip(plan.cells, results, strict=False):
        if not result.images:
            continue
        index = cell.ix + cell.iy * len(xs) + cell.iz * len(xs) * len(ys)
        shown = result.images if len(result.images) == 1 else [image_grid(result.images)]
        images[index] = shown[0].convert("RGB")
        infotexts[index] = result.infotexts[0]
        seeds[index] = result.seeds[0]
    made = [image for image in images if image is not None]
    output_first = results[0] if results else None
    output = GridOutput(
        interrupted=len(results) < len(plan.cells) or any(r.interrupted for r in results)
    )
    output.first = output_first
    if not made:
        return output
    size = made[0].size
    filled = [image if image is not None else Image.new("RGB", size) for image in images]
    x_labels = [format_value(plan.axes[0], v) for v in xs]
    y_labels = [format_value(plan.axes[1], v) for v in ys]
    z_labels = [format_value(plan.axes[2], v) for v in zs]
    first_text = next(text for text in infotexts if text is not None)
    first_seed = next(seed for seed in seeds if seed is not None)
    sub_grids = []
    for iz in range(len(zs)):
        part = filled[iz * len(xs) * len(ys) : (iz + 1) * len(xs) * len(ys)]
        grid = image_grid(part, rows=len(ys))
        if plan.plot.draw_legend:
            grid = draw_grid_annotations(grid, *size, x_labels, y_labels, plan.plot.margin_size)
        sub_grids.append(grid)
    main = image_grid(sub_grids, rows=1)
    if plan.plot.draw_legend:
        main = draw_grid_annotations(main, *sub_grids[0].size, z_labels, [""])
    params = {"Script": SCRIPT_TITLE}
    for name, axis, text, vals in zip("XYZ", plan.axes, plan.texts, plan.values, strict=True):
        if axis.kind == "nothing":
            continue
        params[f"{name} Type"] = axis.label
        params[f"{name} Values"] = text
        if axis.label in ("Seed", "Var. seed") and not plan.plot.no_fixed_seeds:
            params[f"Fixed {name} Values"] = ", ".join(str(v) for v in vals)
    grid_text = _with_params(first_text, params)
    output.images.append(main)
    output.infotexts.append(grid_text)
    output.seeds.append(first_seed)
    if plan.plot.include_sub_grids and len(zs) > 1:
        output.images += sub_grids
        output.infotexts += [grid_text] * len(sub_grids)
        output.seeds += [first_seed] * len(sub_grids)
    output.grids = len(output.images)
    if plan.plot.include_lone_images:
        for image, text, seed in zip(images, infotexts, seeds, strict=True):
            if image is not None and text is not None and seed is not None:
                output.images.append(image)
                output.infotexts.append(text)
                output.seeds.append(seed)
    else:
        output.unshown = [
            (image, text, seed)
            for result in results
            for image, text, seed in zip(result.images, result.infotexts, result.seeds, strict=True)
        ]
    return output


def run_xyz(
    service: Any,
    base: GenerationRequest,
    plot: XyzPlot,
    *,
    user: str,
    on_progress: Callable[[Any], None] | None = None,
) -> GridOutput:
    """Plan, run the cells as one series job of `service` (a GenerationService), assemble."""
    plan = plan_grid(base, plot, service.bounds())
    results = service.series(
        [cell.request for cell in plan.cells],
        label=f"{SCRIPT_TITLE}: {base.prompt}",
        user=user,
        on_progress=on_progress,
    )
    return assemble_grid(plan, results)
