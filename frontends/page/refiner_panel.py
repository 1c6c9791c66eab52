"""The Refiner section of the txt2img and img2img tabs, as A1111 1.10's ("Refiner":
checkpoint and "Switch at"). Its values become the request's `refiner_checkpoint` and
`refiner_switch_at`; a pasted infotext's `Refiner` keys fill them back."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import gradio as gr

from pipelines.infotext import refiner_from_params
from pipelines.schema import REFINER_SWITCH_AT

NO_REFINER = "None"
REFINER_FIELDS = ("refiner_checkpoint", "refiner_switch_at")
"""The section's values, named as A1111's API fields."""


def build_refiner(
    checkpoint_choices: Callable[[], list[str]],
    slider: Callable[[str, str], gr.Slider],
    prefix: str = "",
) -> dict[str, Any]:
    """The section's components by `REFINER_FIELDS` name, in a closed accordion."""
    with gr.Accordion("Refiner", open=False, elem_id=f"{prefix}refiner"), gr.Row():
        checkpoint = gr.Dropdown(
            [NO_REFINER, *checkpoint_choices()],
            value=NO_REFINER,
            label="Checkpoint",
            info="a checkpoint of the same family; an SDXL refiner for SDXL",
            elem_id=f"{prefix}refiner_checkpoint",
            scale=3,
        )
        switch_at = slider("refiner_switch_at", prefix)
    return {"refiner_checkpoint": checkpoint, "refiner_switch_at": switch_at}


def refiner_request_fields(checkpoint: str | None, switch_at: float | None) -> dict[str, Any]:
    """The request fields for the section's values (none when no refiner is chosen)."""
    if checkpoint in (None, "", NO_REFINER):
        return {}
    return {
        "refiner_checkpoint": checkpoint,
        "refiner_switch_at": REFINER_SWITCH_AT if switch_at is None else float(switch_at),
    }


def recall_refiner(
    params: Mapping[str, str], checkpoint_title: Callable[[str], str | None]
) -> tuple[dict[str, Any], list[str]]:
    """The section's values for an infotext's parameters, and warnings; without `Refiner`
    keys the refiner is turned off so the pasted image replays."""
    try:
        found = refiner_from_params(params)
    except ValueError as error:
        return {"refiner_checkpoint": NO_REFINER}, [f"Refiner: {error}; turned off"]
    if found is None:
        return {"refiner_checkpoint": NO_REFINER}, []
    name, switch_at = found
    title = checkpoint_title(name)
    if title is None:
        warning = f"Refiner {name} is not in the models folders; the refiner is off"
        return {"refiner_checkpoint": NO_REFINER}, [warning]
    return {"refiner_checkpoint": title, "refiner_switch_at": switch_at}, []
