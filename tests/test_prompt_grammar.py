"""Prompt schedules, alternation and AND parts beyond A1111's documented table (which
tests/test_prompt_grammar_table.py holds): prompt order, emphasis and escapes, the step
lookup, AND weights, huge step numbers."""

from __future__ import annotations

import pytest

from pipelines.prompt_grammar import prompt_schedules, split_and, text_at


def test_old_scheduling_reads_fractions_below_one_only() -> None:
    assert prompt_schedules(["a [b:.5] c"], 10, 10, use_old_scheduling=True) == [
        [(5, "a  c"), (10, "a b c")]
    ]


def test_several_prompts_keep_their_order() -> None:
    assert prompt_schedules(["x", "[x:y:1]", "x"], 4) == [
        [(4, "x")],
        [(1, "x"), (4, "y")],
        [(4, "x")],
    ]


def test_from_when_removes_and_nesting_with_emphasis_is_text() -> None:
    assert prompt_schedules(["a (red:1.2) [house::2]"], 4) == [
        [(2, "a (red:1.2) house"), (4, "a (red:1.2) ")]
    ]
    assert prompt_schedules([r"a \[literal\] [word]"], 4) == [[(4, r"a \[literal\] [word]")]]


def test_text_at_picks_the_first_entry_ending_at_or_after_the_step() -> None:
    """A1111's CFG denoiser: step index i (from 0) uses the first entry with end >= i, so
    `[a:b:0.5]` over 4 steps is a for indices 0-2 and b for 3."""
    schedule = prompt_schedules(["[a:b:0.5]"], 4)[0]
    assert [text_at(schedule, i) for i in range(4)] == ["a", "a", "a", "b"]
    alternating = prompt_schedules(["[a|b]"], 4)[0]
    assert [text_at(alternating, i) for i in range(4)] == ["a", "a", "b", "a"]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a castle", [("a castle", 1.0)]),
        # A1111 keeps a part's leading space (the tokenizer ignores it)
        ("a castle :1.2 AND a dragon :0.8", [("a castle", 1.2), (" a dragon", 0.8)]),
        ("a AND b", [("a", 1.0), (" b", 1.0)]),
        ("a:-0.5 AND b: .5", [("a", -0.5), (" b", 0.5)]),
        ("ANDROID", [("ANDROID", 1.0)]),  # only the word AND splits
        ("(red:1.2) house", [("(red:1.2) house", 1.0)]),  # emphasis is not a part weight
        ("cat :2", [("cat", 2.0)]),
    ],
)
def test_and_parts_and_weights(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert split_and(prompt) == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [("[a:b:1e400]", [(10, "a")]), ("[a:b:-1e400]", [(10, "b")]), ("[a:b:1e10]", [(10, "a")])],
)
def test_huge_step_numbers_clamp_instead_of_crashing(
    prompt: str, expected: list[tuple[int, str]]
) -> None:
    assert prompt_schedules([prompt], 10) == [expected]
