"""A second, independently written table of A1111 1.10 prompt scheduling (its doctests,
hires / old-scheduling arithmetic, the step lookup of reconstruct_cond_batch, AND
splitting), each value checked against A1111's own function run outside the repository."""

from __future__ import annotations

import pytest

from pipelines.prompt_grammar import prompt_schedules, split_and, text_at

ALTERNATING_A_B = [(step, "a" if step % 2 else "(b:1.1)") for step in range(1, 11)]

# get_learned_conditioning_prompt_schedules([prompt], 10) doctests, verbatim.
DOCTESTS_10_STEPS = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    # A1111's doctest says [(5, "a  c"), (10, "a {b|d{ c")] ("not handling this right now"), but
    # its parser rejects the lone `|` and falls back to plain text: the doctest fails in A1111 too.
    ("a [{b|d{:.5] c", [(10, "a [{b|d{:.5] c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", ALTERNATING_A_B),
    ("[fe|]male", [(step, "female" if step % 2 else "male") for step in range(1, 11)]),
    ("[fe|||]male", [(step, "female" if step % 4 == 1 else "male") for step in range(1, 11)]),
]

# Beyond the doctests, worked out from the same source at 10 steps.
MORE_10_STEPS = [
    ("", [(10, "")]),
    ("a [b:0] c", [(10, "a b c")]),  # switches before step 1: `to` only
    ("a [b:-2] c", [(10, "a b c")]),
    ("a [b:30] c", [(10, "a  c")]),  # beyond the last step: `from` only
    ("a [b:1.5] c", [(10, "a  c")]),  # a fraction >= 1 scales past the end
    ("a [b:c:1e1]", [(10, "a b")]),  # no "." in the number: a whole step count
    ("a [b:c:0.25] d", [(2, "a b d"), (10, "a c d")]),  # int() truncates 2.5
    ("a [b:c:3 ] d", [(3, "a b d"), (10, "a c d")]),
    ("[a:b|c:3]", [(10, "[a:b|c:3]")]),  # `|` outside alternation does not parse
    ("a [word] (b:1.2) c", [(10, "a [word] (b:1.2) c")]),  # emphasis is not scheduling
    (r"a \[b:3\] c", [(10, r"a \[b:3\] c")]),  # escaped brackets are plain text
    (r"a \(b\) [c:3]", [(3, r"a \(b\) "), (10, r"a \(b\) c")]),
    ("a [b:c:3] [d:e:6]", [(3, "a b d"), (6, "a c d"), (10, "a c e")]),
    (
        "[[a|b]:3]",
        [(1, ""), (2, ""), (3, ""), (4, "b"), (5, "a"), (6, "b"), (7, "a"), (8, "b")]
        + [(9, "a"), (10, "b")],
    ),
    # AND is text here: callers split_and first and schedule each part, as A1111 does.
    ("a [b:c:3] d AND e", [(3, "a b d AND e"), (10, "a c d AND e")]),
    # A1111's lark 1.1.2 parses these or falls back to plain text depending on PYTHONHASHSEED;
    # lark 1.3.1 always parses them (one of A1111's two outcomes).
    ("[a:3]:", [(3, ":"), (10, "a:")]),
    ("[a:b:3]:", [(3, "a:"), (10, "b:")]),
]


@pytest.mark.parametrize(("prompt", "expected"), DOCTESTS_10_STEPS + MORE_10_STEPS)
def test_schedule_at_10_steps(prompt: str, expected: list[tuple[int, str]]) -> None:
    assert prompt_schedules([prompt], 10) == [expected]


def test_header_example_at_100_steps() -> None:
    prompt = (
        "fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75]"
        "[ in foreground::0.6][ in background:0.25] [shoddy:masterful:0.5]"
    )
    assert prompt_schedules([prompt], 100) == [
        [
            (25, "fantasy landscape with a mountain and an oak in foreground shoddy"),
            (50, "fantasy landscape with a lake and an oak in foreground in background shoddy"),
            (60, "fantasy landscape with a lake and an oak in foreground in background masterful"),
            (75, "fantasy landscape with a lake and an oak in background masterful"),
            (100, "fantasy landscape with a lake and a christmas tree in background masterful"),
        ]
    ]


# (prompt, base steps, hires steps, use_old_scheduling, expected schedule).
PASS_CASES = [
    # The two hires doctests: 10 first-pass steps, 10 hires steps.
    ("a [b:.5] c", 10, 10, False, [(10, "a b c")]),
    ("a [b:1.5] c", 10, 10, False, [(5, "a  c"), (10, "a b c")]),
    # Hires: whole numbers count on from the first pass's last step.
    ("a [b:3] c", 10, 10, False, [(10, "a b c")]),
    ("a [b:13] c", 10, 10, False, [(3, "a  c"), (10, "a b c")]),
    ("a [b:13] c", 10, 20, False, [(3, "a  c"), (20, "a b c")]),
    ("a [b:1.25] c", 10, 20, False, [(5, "a  c"), (20, "a b c")]),
    ("[a|b]", 10, 3, False, [(1, "a"), (2, "b"), (3, "a")]),
    ("a [unbalanced", 10, 4, False, [(4, "a [unbalanced")]),  # fallback ends at hires steps
    # Old scheduling (A1111 before 1.6): fractions < 1 scale, anything else is a step count,
    # and hires_steps is ignored.
    ("a [b:.5] c", 10, None, True, [(5, "a  c"), (10, "a b c")]),
    ("a [b:1.5] c", 10, None, True, [(1, "a  c"), (10, "a b c")]),
    ("a [b:3.9] c", 10, None, True, [(3, "a  c"), (10, "a b c")]),
    ("a [b:1.5] c", 10, 10, True, [(1, "a  c"), (10, "a b c")]),
    ("a [b:13] c", 10, 10, True, [(10, "a  c")]),
    # New scheduling: a number with "." is always a fraction.
    ("a [b:3.9] c", 10, None, False, [(10, "a  c")]),
]


@pytest.mark.parametrize(("prompt", "steps", "hires_steps", "old", "expected"), PASS_CASES)
def test_schedule_hires_and_old_scheduling(
    prompt: str,
    steps: int,
    hires_steps: int | None,
    old: bool,
    expected: list[tuple[int, str]],
) -> None:
    assert prompt_schedules([prompt], steps, hires_steps, use_old_scheduling=old) == [expected]


def test_overflowing_number_switches_at_the_end_instead_of_raising() -> None:
    assert prompt_schedules(["a [b:c:1e400]", "a [b:c:-1e400]"], 10) == [
        [(10, "a b")],
        [(10, "a c")],
    ]


def test_schedules_keep_prompt_order_and_duplicates() -> None:
    assert prompt_schedules(["a [b:2]", "c", "a [b:2]"], 4) == [
        [(2, "a "), (4, "a b")],
        [(4, "c")],
        [(2, "a "), (4, "a b")],
    ]


# reconstruct_cond_batch: the 0-based denoiser step picks the first entry with step <= end.
TEXT_AT_CASES = [
    ([(3, "a "), (10, "a b")], [0, 1, 2, 3], "a "),
    ([(3, "a "), (10, "a b")], [4, 9, 10], "a b"),
    ([(3, "a "), (10, "a b")], [11, 25], "a "),  # past the end: back to the first entry
    (ALTERNATING_A_B, [0, 1, 3], "a"),
    (ALTERNATING_A_B, [2, 4, 10], "(b:1.1)"),
    ([(10, "test")], [0, 10, 11], "test"),
]


@pytest.mark.parametrize(("schedule", "steps", "expected"), TEXT_AT_CASES)
def test_text_at(schedule: list[tuple[int, str]], steps: list[int], expected: str) -> None:
    assert [text_at(schedule, step) for step in steps] == [expected] * len(steps)


SPLIT_AND_CASES = [
    ("a cat", [("a cat", 1.0)]),
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
    ("a cat :1.2 AND a dog: 0.5", [("a cat", 1.2), (" a dog", 0.5)]),
    ("a cat:-1 AND a dog:+.5", [("a cat", -1.0), (" a dog", 0.5)]),
    ("a cat:2.", [("a cat", 2.0)]),  # a lone prompt's weight is split off too
    ("a cat  ", [("a cat", 1.0)]),
    ("a cat AND", [("a cat", 1.0), ("", 1.0)]),
    ("a cat ANDROID AND candy", [("a cat ANDROID", 1.0), (" candy", 1.0)]),
    ("a cat and a dog", [("a cat and a dog", 1.0)]),
    ("a,AND(b)", [("a,", 1.0), ("(b)", 1.0)]),
    ("a (cat:1.2) AND [dog:cat:3]:0.7", [("a (cat:1.2)", 1.0), (" [dog:cat:3]", 0.7)]),
    ("a cat:1.2.3", [("a cat:1.2.3", 1.0)]),
    ("a\ncat:1.5\n", [("a\ncat", 1.5)]),
]


@pytest.mark.parametrize(("prompt", "expected"), SPLIT_AND_CASES)
def test_split_and(prompt: str, expected: list[tuple[str, float]]) -> None:
    assert split_and(prompt) == expected
