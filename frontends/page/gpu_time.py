"""On ZeroGPU, the GPU time a request will ask for, shown under the size and step sliders
and updated as they move, before the click (a shorter request gets a GPU sooner)."""

from __future__ import annotations

from typing import Any

import gradio as gr

from pipelines.interface import GenerationService
from pipelines.schema import GenerationRequest

WORK_FIELDS = ("steps", "width", "height", "n_iter", "batch_size")
"""The sliders the duration grows with, in `gpu_time_text`'s argument order."""


def gpu_time_text(service: GenerationService, *values: Any) -> str:
    """One Markdown line for the current slider values ("" off ZeroGPU)."""
    fields = {name: int(value) for name, value in zip(WORK_FIELDS, values, strict=True)}
    seconds = service.gpu_seconds(GenerationRequest(**fields))
    if seconds is None:
        return ""
    return f"ZeroGPU: this request asks for **{seconds} s** of GPU time."


def build_gpu_time(service: GenerationService, controls: dict[str, Any]) -> None:
    """The line and its updates; nothing where generation is not billed per call."""
    if service.gpu_seconds(GenerationRequest()) is None:
        return
    sliders = [controls[name] for name in WORK_FIELDS]
    values = [slider.value for slider in sliders]
    note = gr.Markdown(gpu_time_text(service, *values), elem_id="gpu_time")
    for slider in sliders:
        slider.change(lambda *v: gpu_time_text(service, *v), sliders, note)
