"""A1111's "Prompts from file or textbox" script: one request per line.

Each non-blank line is a plain prompt, or A1111's per-line options (`--prompt "a dog"
--steps 3 --seed 7 ...`, read with shlex as A1111 1.10's `scripts/prompts_from_file.py`
does). Every line becomes one GenerationRequest made from a base request (the page's
fields, the API body, the CLI flags); the service runs them in order as one job.

Stricter than A1111 on purpose: a line that starts with `--` but cannot be read as
options (an unknown option, a missing or malformed value) is refused naming the line and
the option, where A1111 would silently use the whole line as the prompt. A line that does
not start with an option is a plain prompt, as in A1111.
"""

from __future__ import annotations

import random
import shlex
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pipelines.errors import InvalidRequestError
from pipelines.samplers import SAMPLER_NAMES, resolve_sampler, split_combined_name
from pipelines.schema import SEED_MAX, GenerationRequest

SCRIPT_TITLE = "Prompts from file or textbox"
SCRIPT_NAME = SCRIPT_TITLE.lower()
"""The `script_name` API clients send (matched without regard to case, as A1111)."""
PROMPT_POSITIONS = ("start", "end")
"""A1111's "Insert prompts at the" choices: where a line's prompt joins the base prompt."""
FIELD = "script_args"
MAX_LINES = 1000
"""The most lines one script run takes (each line is a request checked before any runs)."""


@dataclass(frozen=True)
class PromptsScript:
    """The script's settings, in A1111 1.10's `script_args` order.

    `iterate_seed`: "Iterate seed every line" (each line's seed is the previous one's plus
    the base request's batch_size x n_iter). `same_seed`: "Use same random seed for all
    lines" (a -1 seed is drawn once for all lines). `position`: "start" or "end". `text`:
    "List of prompt inputs", one request per line.
    """

    iterate_seed: bool = False
    same_seed: bool = False
    position: str = "start"
    text: str = ""


def _text(value: str) -> str:
    return value


def _integer(value: str) -> int:
    return int(value)


def _number(value: str) -> float:
    return float(value)


def _boolean(value: str) -> bool:
    if value not in ("true", "false"):
        raise ValueError(f"expected true or false, got {value!r}")
    return value == "true"


def _sampler_index(value: str) -> str:
    index = int(value)
    if not 0 <= index < len(SAMPLER_NAMES):
        raise ValueError(f"sampler index {index} is not in 0..{len(SAMPLER_NAMES) - 1}")
    return SAMPLER_NAMES[index]


_OPTIONS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "sd_model": ("checkpoint", _text),
    "seed": ("seed", _integer),
    "subseed": ("subseed", _integer),
    "subseed_strength": ("subseed_strength", _number),
    "seed_resize_from_h": ("seed_resize_from_h", _integer),
    "seed_resize_from_w": ("seed_resize_from_w", _integer),
    "sampler_index": ("sampler_name", _sampler_index),
    "sampler_name": ("sampler_name", _text),
    "batch_size": ("batch_size", _integer),
    "n_iter": ("n_iter", _integer),
    "steps": ("steps", _integer),
    "cfg_scale": ("cfg_scale", _number),
    "width": ("width", _integer),
    "height": ("height", _integer),
    "tiling": ("tiling", _boolean),
    "restore_faces": ("restore_faces", _boolean),
    "do_not_save_samples": ("do_not_save_samples", _boolean),
    "do_not_save_grid": ("do_not_save_grid", _boolean),
}
"""A1111's `prompt_tags` we run: option -> (request field, value type)."""

_REFUSED = {
    "outpath_samples": "the output folders are the server's",
    "outpath_grids": "the output folders are the server's",
    "prompt_for_display": "it is not supported",
    "styles": "styles are not supported here yet",
}
"""A1111's options we do not run, with the reason."""

_ONLY_FALSE = {
    "restore_faces": "face restoration is not supported",
    "do_not_save_samples": "every image is saved as the front end saves it",
}
"""Options accepted only at false (what asks for nothing)."""

_PROMPTS = ("prompt", "negative_prompt")


def parse_line(line: str, number: int) -> dict[str, Any]:
    """One line as request fields: `{"prompt": line}` for a plain prompt, else its options.

    Args:
        line: the stripped, non-blank line.
        number: its 1-based line number (for errors).
    Returns:
        Request field -> value (`checkpoint` for `--sd_model`, `sampler_name` and maybe
        `scheduler` for `--sampler_name`).
    Raises:
        InvalidRequestError (field "script_args") naming the line and the option.
    Example:
        >>> parse_line('--prompt "a dog" in snow --steps 3', 1)
        {'prompt': 'a dog in snow', 'steps': 3}
    """
    if not line.startswith("--"):
        return {"prompt": line}
    where = f"line {number}"
    try:
        args = shlex.split(line)
    except ValueError as error:
        raise InvalidRequestError(f"{where}: {error}: {line[:80]}", field=FIELD) from None
    values: dict[str, Any] = {}
    pos = 0
    while pos < len(args):
        arg = args[pos]
        if not arg.startswith("--"):
            raise InvalidRequestError(
                f'{where}: expected an option starting with "--", got {arg!r}', field=FIELD
            )
        if pos + 1 >= len(args):
            raise InvalidRequestError(f"{where}: option {arg} has no value", field=FIELD)
        tag = arg[2:]
        if tag in _PROMPTS:  # A1111: the words up to the next option, joined by spaces
            pos += 1
            words = [args[pos]]
            pos += 1
            while pos < len(args) and not args[pos].startswith("--"):
                words.append(args[pos])
                pos += 1
            values[tag] = " ".join(words)
            continue
        if tag in _REFUSED:
            raise InvalidRequestError(
                f"{where}: option {arg} is not supported ({_REFUSED[tag]})", field=FIELD
            )
        if tag not in _OPTIONS:
            known = ", ".join(f"--{name}" for name in (*_PROMPTS, *_OPTIONS))
            raise InvalidRequestError(
                f"{where}: unknown commandline option: {arg}; known: {known}", field=FIELD
            )
        name, kind = _OPTIONS[tag]
        raw = args[pos + 1]
        try:
            value = kind(raw)
        except ValueError as error:
            raise InvalidRequestError(f"{where}: {arg} {raw!r}: {error}", field=FIELD) from None
        if tag in _ONLY_FALSE:
            if value:
                raise InvalidRequestError(
                    f"{where}: {arg} true is not supported ({_ONLY_FALSE[tag]})", field=FIELD
                )
        elif tag == "do_not_save_grid":
            pass  # the script never makes a grid (A1111 sets it itself)
        elif name == "sampler_name":
            try:
                choice = resolve_sampler(value)
            except InvalidRequestError as error:
                raise InvalidRequestError(f"{where}: {arg}: {error.message}", field=FIELD) from None
            values["sampler_name"] = choice.sampler
            if split_combined_name(value)[1] is not None:  # "DPM++ 2M Karras": its schedule
                values["scheduler"] = choice.scheduler
        else:
            values[name] = value
        pos += 2
    return values


def parse_lines(text: str) -> list[tuple[int, dict[str, Any]]]:
    """Every non-blank line's number and fields (see `parse_line`)."""
    parsed = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line:
            parsed.append((number, parse_line(line, number)))
    return parsed


def line_requests(
    base: GenerationRequest, script: PromptsScript, rng: random.Random | None = None
) -> list[GenerationRequest]:
    """One request per line, as A1111's script makes them from the base request.

    A line's options replace the base's fields; its prompt (and negative prompt) goes
    before ("start") or after ("end") a non-empty base prompt, joined by a space. Seeds:
    with either checkbox a base seed of -1 is drawn once; with "iterate" each line's seed
    is the previous line's plus the base's batch_size x n_iter (a line's `--seed` wins
    for that line). Without either, a -1 seed stays -1, so each line draws its own.

    Args:
        base: the request the lines start from (txt2img or img2img).
        script: the script's settings.
        rng: where a drawn seed comes from (tests pass a seeded one).
    Returns:
        The requests in line order (not yet validated: the service checks them all
        before queueing).
    Raises:
        InvalidRequestError (field "script_args") for a bad line, no lines, or a bad
        position.
    Example:
        >>> script = PromptsScript(iterate_seed=True, text="a cat\\n--prompt dog --steps 3")
        >>> [(r.prompt, r.steps, r.seed) for r in line_requests(
        ...     GenerationRequest(prompt="photo", seed=5, steps=20), script)]
        [('a cat photo', 20, 5), ('dog photo', 3, 6)]
    """
    if script.position not in PROMPT_POSITIONS:
        raise InvalidRequestError(
            f"the prompt position must be start or end, got {script.position!r}", field=FIELD
        )
    count = sum(1 for line in script.text.splitlines() if line.strip())
    if count > MAX_LINES:
        raise InvalidRequestError(
            f"the list of prompt inputs holds {count} lines; the limit is {MAX_LINES}",
            field=FIELD,
        )
    lines = parse_lines(script.text)
    if not lines:
        raise InvalidRequestError("the list of prompt inputs holds no line", field=FIELD)
    seed = base.seed
    if (script.iterate_seed or script.same_seed) and seed == -1:
        seed = (rng or random.Random()).randrange(SEED_MAX - 1)  # A1111: randrange(2**32 - 2)
    requests = []
    for _, values in lines:
        request = replace(base, **{"seed": seed, **values})
        for name in _PROMPTS:
            line_text, base_text = values.get(name), getattr(base, name)
            if line_text and base_text:
                joined = (
                    (line_text, base_text) if script.position == "start" else (base_text, line_text)
                )
                request = replace(request, **{name: " ".join(joined)})
        requests.append(request)
        if script.iterate_seed and seed != -1:
            seed = (seed + base.batch_size * base.n_iter) % (SEED_MAX + 1)
    return requests


def script_from_args(args: object) -> PromptsScript:
    """A1111 1.10's `script_args` for this script: `[checkbox_iterate,
    checkbox_iterate_batch, prompt_position, prompt_txt]`, checked (missing trailing
    values take the page's defaults)."""
    if not isinstance(args, list | tuple):
        raise InvalidRequestError(f"script_args must be a list, got {args!r}", field=FIELD)
    names = ("checkbox_iterate", "checkbox_iterate_batch", "prompt_position", "prompt_txt")
    if len(args) > len(names):
        raise InvalidRequestError(
            f"script_args has {len(args)} values; {SCRIPT_NAME} takes at most {len(names)} "
            f"({', '.join(names)})",
            field=FIELD,
        )
    defaults: tuple[Any, ...] = (False, False, "start", "")
    values = [*args, *defaults[len(args) :]]
    for index in (0, 1):
        if not isinstance(values[index], bool | int) or values[index] not in (0, 1):
            raise InvalidRequestError(
                f"script_args[{index}] ({names[index]}) must be true or false, "
                f"got {values[index]!r}",
                field=FIELD,
            )
    position = values[2] if values[2] is not None else "start"
    if position not in PROMPT_POSITIONS:
        raise InvalidRequestError(
            f"script_args[2] (prompt_position) must be start or end, got {position!r}",
            field=FIELD,
        )
    if not isinstance(values[3], str):
        raise InvalidRequestError(
            f"script_args[3] (prompt_txt) must be a string, got {values[3]!r}", field=FIELD
        )
    return PromptsScript(bool(values[0]), bool(values[1]), position, values[3])


def is_prompts_script(script_name: object) -> bool:
    """Whether an API `script_name` asks for this script (any case, as A1111)."""
    return isinstance(script_name, str) and script_name.strip().lower() == SCRIPT_NAME
