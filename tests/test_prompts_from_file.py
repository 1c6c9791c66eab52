"""A1111's "Prompts from file or textbox": the line parser (table-driven), the requests it
makes (seeds, prompt position), and each line run through the service equals that line's
request run alone."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import InvalidRequestError
from pipelines.loading import LoadedModel
from pipelines.prompts_from_file import (
    PromptsScript,
    is_prompts_script,
    line_requests,
    parse_line,
    parse_lines,
    script_from_args,
)
from pipelines.schema import GenerationRequest
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.service_contract import SMALL


@pytest.mark.parametrize(
    ("line", "fields"),
    [
        ("a cat", {"prompt": "a cat"}),
        ("a cat -- in a hat", {"prompt": "a cat -- in a hat"}),  # not options: a prompt
        ('--prompt "a dog" --steps 3', {"prompt": "a dog", "steps": 3}),
        ("--prompt a dog in snow --seed 7", {"prompt": "a dog in snow", "seed": 7}),
        (
            "--negative_prompt 'blurry, ugly' --cfg_scale 4.5 --width 64 --height 128",
            {"negative_prompt": "blurry, ugly", "cfg_scale": 4.5, "width": 64, "height": 128},
        ),
        (
            "--prompt x --batch_size 2 --n_iter 3 --subseed 5 --subseed_strength 0.5",
            {"prompt": "x", "batch_size": 2, "n_iter": 3, "subseed": 5, "subseed_strength": 0.5},
        ),
        ("--prompt x --sampler_name euler", {"prompt": "x", "sampler_name": "Euler"}),
        (
            '--prompt x --sampler_name "DPM++ 2M Karras"',
            {"prompt": "x", "sampler_name": "DPM++ 2M", "scheduler": "karras"},
        ),
        ("--prompt x --sd_model tiny-sd1", {"prompt": "x", "checkpoint": "tiny-sd1"}),
        ("--prompt x --tiling true", {"prompt": "x", "tiling": True}),
        ("--prompt x --restore_faces false --do_not_save_grid true", {"prompt": "x"}),
        (
            "--seed_resize_from_w 64 --seed_resize_from_h 32",
            {"seed_resize_from_w": 64, "seed_resize_from_h": 32},
        ),
    ],
)
def test_parse_line(line: str, fields: dict) -> None:
    assert parse_line(line, 1) == fields


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("--prompt x --stepz 3", ["line 4", "unknown commandline option: --stepz"]),
        ("--prompt x --steps three", ["line 4", "--steps", "three"]),
        ("--prompt x --steps", ["line 4", "--steps has no value"]),
        ("--prompt x --cfg_scale high", ["line 4", "--cfg_scale"]),
        ('--prompt "a dog', ["line 4", "quotation"]),
        ("--prompt x --tiling yes", ["line 4", "--tiling"]),
        ("--prompt x --restore_faces true", ["line 4", "face restoration"]),
        ("--prompt x --outpath_samples /tmp", ["line 4", "--outpath_samples"]),
        ("--prompt x --sampler_name nope", ["line 4", "--sampler_name"]),
        ("--steps 3 stray", ["line 4", "stray"]),
    ],
)
def test_bad_lines_name_the_line_and_option(line: str, words: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_lines(f"a cat\n\n  \n{line}\n")
    assert caught.value.field == "script_args"
    for word in words:
        assert word in caught.value.message


def test_blank_lines_are_skipped_and_lines_stripped() -> None:
    parsed = parse_lines("  a cat  \n\n\t\n--prompt dog\r\nlast")
    assert parsed == [(1, {"prompt": "a cat"}), (4, {"prompt": "dog"}), (5, {"prompt": "last"})]


def test_line_requests_seeds_and_positions() -> None:
    base = GenerationRequest(
        prompt="photo", negative_prompt="blur", seed=10, batch_size=2, n_iter=3
    )
    text = "a cat\n--prompt dog --negative_prompt ugly --n_iter 1\n--seed 99 --steps 3\n"
    plain = line_requests(base, PromptsScript(text=text))
    assert [r.seed for r in plain] == [10, 10, 99]
    assert [r.prompt for r in plain] == ["a cat photo", "dog photo", "photo"]
    assert [r.negative_prompt for r in plain] == ["blur", "ugly blur", "blur"]
    assert [r.n_iter for r in plain] == [3, 1, 3] and plain[2].steps == 3
    # A1111: the seed advances by the *base* batch_size x n_iter, a line's --seed wins
    iterated = line_requests(base, PromptsScript(iterate_seed=True, position="end", text=text))
    assert [r.seed for r in iterated] == [10, 16, 99]
    assert [r.prompt for r in iterated] == ["photo a cat", "photo dog", "photo"]
    assert iterated[1].negative_prompt == "blur ugly"
    # an empty base prompt: the line's prompt alone
    alone = line_requests(GenerationRequest(), PromptsScript(text="a cat"))
    assert alone[0].prompt == "a cat" and alone[0].seed == -1


def test_random_seed_is_drawn_once_with_either_checkbox() -> None:
    base = GenerationRequest(seed=-1)
    text = "a\nb\nc"
    assert [r.seed for r in line_requests(base, PromptsScript(text=text))] == [-1, -1, -1]
    same = line_requests(base, PromptsScript(same_seed=True, text=text), random.Random(1))
    assert len({r.seed for r in same}) == 1 and same[0].seed >= 0
    iterated = line_requests(base, PromptsScript(iterate_seed=True, text=text), random.Random(1))
    first = iterated[0].seed
    assert first == same[0].seed and [r.seed for r in iterated] == [first, first + 1, first + 2]


def test_no_lines_and_bad_position_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="no line"):
        line_requests(GenerationRequest(), PromptsScript(text=" \n\n"))
    with pytest.raises(InvalidRequestError, match="1001 lines; the limit is 1000"):
        line_requests(GenerationRequest(), PromptsScript(text="a\n" * 1001))
    with pytest.raises(InvalidRequestError, match="start or end"):
        line_requests(GenerationRequest(), PromptsScript(position="middle", text="a"))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], PromptsScript()),
        ([True, False, "end", "a\nb"], PromptsScript(True, False, "end", "a\nb")),
        ([0, 1, None, "a"], PromptsScript(False, True, "start", "a")),
    ],
)
def test_script_args_in_a1111_order(args: list, expected: PromptsScript) -> None:
    assert script_from_args(args) == expected


@pytest.mark.parametrize(
    "args",
    [
        "a cat",
        [False, False, "start", "a", 1],
        ["yes"],
        [False, False, "middle", "a"],
        [0, 0, "start", 5],
    ],
)
def test_bad_script_args_are_refused(args: object) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        script_from_args(args)
    assert caught.value.field == "script_args"


def test_script_name_any_case() -> None:
    assert is_prompts_script("Prompts from file or textbox")
    assert is_prompts_script(" prompts from FILE or textbox ")
    assert not is_prompts_script("x/y/z plot") and not is_prompts_script(None)


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Service:
    data = tmp_path_factory.mktemp("prompts")
    return build_service(Settings(data_dir=data, ckpt_dirs=(models_dir,), threads=2))


def test_each_line_equals_its_request_run_alone(service: Service) -> None:
    base = GenerationRequest(**{**SMALL, "prompt": "photo", "seed": 21})
    text = 'a cat\n--prompt "a dog" --steps 3 --batch_size 2\n--seed 5 --cfg_scale 3'
    requests = line_requests(base, PromptsScript(iterate_seed=True, text=text))
    results = service.series(requests, label="prompts")
    assert [r.seeds for r in results] == [[21], [22, 23], [5]]
    assert [r.request.prompt for r in results] == ["a cat photo", "a dog photo", "photo"]
    assert "Steps: 3" in results[1].infotexts[0] and "CFG scale: 3" in results[2].infotexts[0]
    for request, result in zip(requests, results, strict=True):
        alone = service.generate(request)
        assert len(alone.images) == len(result.images)
        for a, b in zip(alone.images, result.images, strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_bad_line_value_fails_before_anything_runs(service: Service) -> None:
    requests = line_requests(GenerationRequest(**SMALL), PromptsScript(text="a\n--steps 999"))
    before = len(service.jobs())
    with pytest.raises(InvalidRequestError, match="steps"):
        service.submit_series(requests, label="prompts")
    assert len(service.jobs()) == before
