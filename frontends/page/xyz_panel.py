"""The "X/Y/Z plot" script's controls, as A1111 1.10's (`scripts/xyz_grid.py` ui with
"Use text inputs instead of dropdowns": values are typed, in A1111's syntax), and the
XyzPlot its values make. The axis lists are A1111's for the tab, so an infotext's
`X Type` names the same axis here."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import gradio as gr

from frontends.page.lora_panel import QUICK
from pipelines.xyz import LORA_WEIGHT, AxisSpec, XyzPlot, axes_for

XYZ_TITLE = "X/Y/Z plot"
SCRIPTS = ("None", XYZ_TITLE)
"""The txt2img tab's Script choices (A1111's titles)."""
XYZ_VALUES = (
    "x_type",
    "x_values",
    "y_type",
    "y_values",
    "z_type",
    "z_values",
    "draw_legend",
    "no_fixed_seeds",
    "vary_seeds_x",
    "vary_seeds_y",
    "vary_seeds_z",
    "include_lone_images",
    "include_sub_grids",
    "margin_size",
)
"""The controls `build_xyz_controls` returns, in the order the page's endpoint takes them
(prefixed `xyz_`)."""
AXIS_HINT = (
    "Values as in A1111: `1,2,3`, `1-5`, `1-5 (+2)`, `0.2-1 [5]`, quoted CSV for text. "
    f"**{LORA_WEIGHT}**: `NAME: weights`, e.g. `ink: 0-1 [5]` (overrides the LoRA's tag "
    "or stack weight, or adds it)."
)


def axis_labels(img2img: bool) -> list[str]:
    """The axis choices of a tab: A1111's list for it (with the axes we lack, which are
    refused with their name when chosen), then ours."""
    return [axis.label for axis in axes_for(img2img)]


def build_xyz_controls(prefix: str, img2img: bool = False) -> dict[str, Any]:
    """X, Y and Z rows (type and values), A1111's options and the swap buttons; the
    components by the names `xyz_plot_from_values` reads."""
    labels = axis_labels(img2img)
    values: dict[str, Any] = {}
    gr.Markdown(AXIS_HINT)
    for axis, default in (("x", labels[1]), ("y", labels[0]), ("z", labels[0])):
        with gr.Row():
            values[f"{axis}_type"] = gr.Dropdown(
                labels,
                value=default,
                label=f"{axis.upper()} type",
                elem_id=f"{prefix}xyz_{axis}_type",
                scale=1,
            )
            values[f"{axis}_values"] = gr.Textbox(
                "", label=f"{axis.upper()} values", elem_id=f"{prefix}xyz_{axis}_values", scale=3
            )
    with gr.Row():
        values["draw_legend"] = gr.Checkbox(
            True, label="Draw legend", elem_id=f"{prefix}xyz_draw_legend"
        )
        values["no_fixed_seeds"] = gr.Checkbox(
            False, label="Keep -1 for seeds", elem_id=f"{prefix}xyz_no_fixed_seeds"
        )
        for axis in "xyz":
            values[f"vary_seeds_{axis}"] = gr.Checkbox(
                False, label=f"Vary seeds for {axis.upper()}", elem_id=f"{prefix}xyz_vary_{axis}"
            )
    with gr.Row():
        values["include_lone_images"] = gr.Checkbox(
            False, label="Include Sub Images", elem_id=f"{prefix}xyz_include_lone_images"
        )
        values["include_sub_grids"] = gr.Checkbox(
            False, label="Include Sub Grids", elem_id=f"{prefix}xyz_include_sub_grids"
        )
        values["margin_size"] = gr.Slider(
            0, 500, value=0, step=2, label="Grid margins (px)", elem_id=f"{prefix}xyz_margin"
        )
    with gr.Row():
        for first, second in (("x", "y"), ("y", "z"), ("x", "z")):
            button = gr.Button(
                f"Swap {first.upper()}/{second.upper()} axes",
                size="sm",
                elem_id=f"{prefix}xyz_swap_{first}{second}",
            )
            pair = [
                values[f"{first}_type"],
                values[f"{first}_values"],
                values[f"{second}_type"],
                values[f"{second}_values"],
            ]
            button.click(lambda a, b, c, d: (c, d, a, b), pair, pair, **QUICK)
    return values


def xyz_plot_from_values(values: Mapping[str, Any]) -> XyzPlot:
    """The XyzPlot of the controls' values (typed values, A1111's csv mode)."""
    axes = [
        AxisSpec(values[f"{axis}_type"] or "Nothing", values[f"{axis}_values"] or "")
        for axis in "xyz"
    ]
    return XyzPlot(
        *axes,
        draw_legend=bool(values["draw_legend"]),
        include_lone_images=bool(values["include_lone_images"]),
        include_sub_grids=bool(values["include_sub_grids"]),
        no_fixed_seeds=bool(values["no_fixed_seeds"]),
        vary_seeds_x=bool(values["vary_seeds_x"]),
        vary_seeds_y=bool(values["vary_seeds_y"]),
        vary_seeds_z=bool(values["vary_seeds_z"]),
        margin_size=int(values["margin_size"] or 0),
        csv_mode=True,
    )
