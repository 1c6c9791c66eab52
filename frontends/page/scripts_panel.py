"""The txt2img tab's "Script" dropdown, as A1111's at the bottom of the tab.

"Prompts from file or textbox" (A1111 1.10's `scripts/prompts_from_file.py` controls) and
"X/Y/Z plot" (`frontends/page/xyz_panel.py`). Prompts from file:
the two seed checkboxes, "Insert prompts at the" start/end, the "List of prompt inputs"
box and an upload that fills it. Its values turn the tab's request into one request per
line (`pipelines.prompts_from_file`), which the page runs as one series job. Another
script is a new entry in `SCRIPT_CHOICES`, a group of controls shown when chosen, and a
branch in `script_requests`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from frontends.page.lora_panel import QUICK
from frontends.page.xyz_panel import XYZ_TITLE, XYZ_VALUES, build_xyz_controls
from pipelines.errors import InvalidRequestError
from pipelines.prompts_from_file import (
    PROMPT_POSITIONS,
    SCRIPT_TITLE,
    PromptsScript,
    line_requests,
)
from pipelines.schema import GenerationRequest

SCRIPT_NONE = "None"
SCRIPT_PROMPTS = SCRIPT_TITLE
SCRIPT_CHOICES: tuple[str, ...] = (SCRIPT_NONE, SCRIPT_PROMPTS, XYZ_TITLE)
"""The Script dropdown's choices, in order (append a script here)."""
SCRIPT_FIELDS = (
    "script_name",
    "prompts_iterate_seed",
    "prompts_same_seed",
    "prompts_position",
    "prompts_text",
    *(f"xyz_{name}" for name in XYZ_VALUES),
)
"""The txt2img endpoint's script parameters, in order (after the Hires fix fields)."""


@dataclass
class ScriptsPanel:
    """The Script dropdown and the prompts-from-file controls."""

    script: gr.Dropdown
    iterate_seed: gr.Checkbox
    same_seed: gr.Checkbox
    position: gr.Radio
    text: gr.Textbox
    upload: gr.File
    prompts_group: gr.Group
    xyz: dict[str, Any]  # the X/Y/Z plot's controls, by XYZ_VALUES name

    @property
    def inputs(self) -> list[Any]:
        """The components behind `SCRIPT_FIELDS`, in that order."""
        prompts = [self.script, self.iterate_seed, self.same_seed, self.position, self.text]
        return [*prompts, *(self.xyz[name] for name in XYZ_VALUES)]


def build_scripts_panel(prefix: str = "") -> ScriptsPanel:
    """The dropdown, and the prompts-from-file controls shown while it is chosen."""
    script = gr.Dropdown(
        list(SCRIPT_CHOICES), value=SCRIPT_NONE, label="Script", elem_id=f"{prefix}script_list"
    )
    with gr.Group(visible=False, elem_id=f"{prefix}script_prompts_from_file") as group:
        iterate_seed = gr.Checkbox(
            False, label="Iterate seed every line", elem_id=f"{prefix}prompts_checkbox_iterate"
        )
        same_seed = gr.Checkbox(
            False,
            label="Use same random seed for all lines",
            elem_id=f"{prefix}prompts_checkbox_iterate_batch",
        )
        position = gr.Radio(
            list(PROMPT_POSITIONS),
            value="start",
            label="Insert prompts at the",
            elem_id=f"{prefix}prompts_prompt_position",
        )
        text = gr.Textbox(
            "",
            label="List of prompt inputs",
            lines=2,
            elem_id=f"{prefix}prompts_prompt_txt",
            placeholder='one request per line: a prompt, or --prompt "a dog" --steps 3 --seed 7',
        )
        upload = gr.File(
            label="Upload prompt inputs", type="binary", elem_id=f"{prefix}prompts_file"
        )
    with gr.Group(visible=False, elem_id=f"{prefix}script_xyz") as xyz_group:
        xyz = build_xyz_controls(prefix or "txt2img_")
    script.change(
        lambda choice: (
            gr.update(visible=choice == SCRIPT_PROMPTS),
            gr.update(visible=choice == XYZ_TITLE),
        ),
        script,
        [group, xyz_group],
        **QUICK,
    )
    upload.change(load_prompt_file, upload, [upload, text], **QUICK)
    return ScriptsPanel(script, iterate_seed, same_seed, position, text, upload, group, xyz)


def load_prompt_file(data: bytes | None) -> tuple[Any, Any]:
    """An uploaded file's lines, stripped, into the textbox (and the upload cleared), as
    A1111's `load_prompt_file`."""
    if data is None:
        return gr.skip(), gr.skip()
    lines = [line.strip() for line in data.decode("utf8", errors="ignore").split("\n")]
    return None, "\n".join(lines)


def script_requests(
    base: GenerationRequest,
    script_name: str | None,
    iterate_seed: bool,
    same_seed: bool,
    position: str | None,
    text: str | None,
) -> list[GenerationRequest] | None:
    """The requests the chosen script makes from the tab's request (None: no script).

    Raises:
        InvalidRequestError naming the line and option of a bad line.
    """
    if not script_name or script_name == SCRIPT_NONE:
        return None
    if script_name == SCRIPT_PROMPTS:
        script = PromptsScript(bool(iterate_seed), bool(same_seed), position or "start", text or "")
        return line_requests(base, script)
    raise InvalidRequestError(
        f"unknown script {script_name!r}; choose one of {', '.join(SCRIPT_CHOICES)}",
        field="script_name",
    )
