"""The page's Script dropdown: its choices, the prompts-from-file controls, and the
requests their values make."""

from __future__ import annotations

import asyncio

import gradio as gr
import pytest

from frontends.page.scripts_panel import (
    SCRIPT_CHOICES,
    SCRIPT_FIELDS,
    ScriptsPanel,
    build_scripts_panel,
    load_prompt_file,
    script_requests,
)
from pipelines.errors import InvalidRequestError
from pipelines.schema import GenerationRequest


def test_choices_are_a1111s_script_titles() -> None:
    assert SCRIPT_CHOICES == ("None", "Prompts from file or textbox", "X/Y/Z plot")


def test_controls_as_a1111_s() -> None:
    async def build() -> ScriptsPanel:  # in an event loop, as Gradio wants (test_files_tab)
        with gr.Blocks():
            return build_scripts_panel()

    panel = asyncio.run(build())
    assert len(panel.inputs) == len(SCRIPT_FIELDS)
    assert panel.script.value == "None" and list(panel.script.choices)[1][0] == SCRIPT_CHOICES[1]
    assert panel.iterate_seed.label == "Iterate seed every line"
    assert panel.same_seed.label == "Use same random seed for all lines"
    assert panel.position.label == "Insert prompts at the" and panel.position.value == "start"
    assert panel.text.label == "List of prompt inputs"
    assert panel.upload.label == "Upload prompt inputs"


def test_values_become_one_request_per_line() -> None:
    base = GenerationRequest(prompt="photo", seed=3, steps=5)
    text = 'a cat\n\n--prompt "a dog" --steps 2'
    assert script_requests(base, "None", True, False, "start", text) is None
    assert script_requests(base, None, False, False, None, None) is None
    requests = script_requests(base, SCRIPT_CHOICES[1], True, False, "end", text)
    assert requests is not None
    assert [(r.prompt, r.steps, r.seed) for r in requests] == [
        ("photo a cat", 5, 3),
        ("photo a dog", 2, 4),
    ]
    with pytest.raises(InvalidRequestError, match="line 2"):
        script_requests(base, SCRIPT_CHOICES[1], False, False, "start", "a\n--stepz 3")
    with pytest.raises(InvalidRequestError, match="unknown script"):
        script_requests(base, "Nope", False, False, "start", "a")


def test_an_upload_fills_the_textbox() -> None:
    cleared, text = load_prompt_file(b"  a cat \r\n--prompt dog\n\xff")
    assert cleared is None and text == "a cat\n--prompt dog\n"
    assert load_prompt_file(None) == (gr.skip(), gr.skip())
