"""A1111's prompt scheduling: prompt editing, alternation and composable `AND` parts.

The rules are AUTOMATIC1111 1.10's (`modules/prompt_parser.py`), reimplemented here:

- `[from:to:when]`, `[to:when]`, `[from::when]`, nested: `when` with a decimal point is a
  fraction of the steps, without one a step number; the text changes after that step.
- `[a|b|c]` alternates every step (an empty option is the empty text).
- A prompt that does not parse (unbalanced brackets) is used as written.
- `AND` splits a prompt into parts, each with an optional trailing weight `:1.2`.

A schedule is a list of `(end_at_step, text)`; sampling step `i` (0-based, one per model
evaluation) uses the first entry whose `end_at_step >= i`, exactly as A1111's CFG
denoiser picks it.
"""

from __future__ import annotations

import re
from functools import lru_cache

import lark

_GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""
"""A1111's schedule grammar: emphasis is kept as text, scheduled and alternate parts are
chosen per step."""

_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")

Schedule = list[tuple[int, str]]


@lru_cache(maxsize=1)
def _parser() -> lark.Lark:
    return lark.Lark(_GRAMMAR)


def _switch_step(
    number: str, steps: int, base_steps: int, hires: bool, use_old_scheduling: bool
) -> int:
    """The step after which a scheduled part changes (A1111's `collect_steps`)."""
    value = float(number)
    if use_old_scheduling:
        value = value * steps if value < 1 else value
    elif "." in number:
        value = (value - (1.0 if hires else 0.0)) * steps
    else:
        value = value - (base_steps if hires else 0)
    # A1111 crashes on a number too large for an int; past either end means the same
    return min(steps, int(max(min(value, steps), -1.0)))


def _render(node: lark.Tree | lark.Token | None, step: int, when: dict[int, int]) -> str:
    """The text of `node` at `step` (1-based schedule step, as A1111's `at_step`)."""
    if node is None:
        return ""
    if isinstance(node, lark.Token):
        return str(node)
    if node.data == "scheduled":
        before, after, _, _, _ = node.children
        return _render(before if step <= when[id(node)] else after, step, when)
    if node.data == "alternate":
        options = node.children
        return _render(options[(step - 1) % len(options)], step, when)
    return "".join(_render(child, step, when) for child in node.children)


def _schedule(
    prompt: str, steps: int, base_steps: int, hires: bool, use_old_scheduling: bool
) -> Schedule:
    try:
        tree = _parser().parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    ends = {steps}
    when: dict[int, int] = {}
    for node in tree.iter_subtrees():
        if node.data == "scheduled":
            number = str(node.children[-2])
            when[id(node)] = _switch_step(number, steps, base_steps, hires, use_old_scheduling)
            if when[id(node)] >= 1:
                ends.add(when[id(node)])
        elif node.data == "alternate":
            ends.update(range(1, steps + 1))
    return [(end, _render(tree, end, when)) for end in sorted(ends)]


def prompt_schedules(
    prompts: list[str],
    steps: int,
    hires_steps: int | None = None,
    use_old_scheduling: bool = False,
) -> list[Schedule]:
    """Each prompt's schedule over `steps` (or, with `hires_steps`, over the hires pass,
    where fractions count from 1.0 and step numbers from `steps`, as A1111 1.6+)."""
    hires = hires_steps is not None and not use_old_scheduling
    total = hires_steps if hires and hires_steps is not None else steps
    made = {
        prompt: _schedule(prompt, total, steps, hires, use_old_scheduling)
        for prompt in set(prompts)
    }
    return [made[prompt] for prompt in prompts]


def text_at(schedule: Schedule, step: int) -> str:
    """The text in force at sampling step `step` (0-based model evaluation)."""
    for end, text in schedule:
        if step <= end:
            return text
    return schedule[0][1]  # A1111 falls back to the first entry


def split_and(prompt: str) -> list[tuple[str, float]]:
    """A prompt's `AND` parts with their weights (`a castle :1.2 AND a dragon`)."""
    parts = []
    for part in _AND.split(prompt):
        match = _WEIGHT.search(part)
        if match is None:
            parts.append((part, 1.0))
        else:
            text, weight = match.groups()
            parts.append((text, float(weight) if weight is not None else 1.0))
    return parts
