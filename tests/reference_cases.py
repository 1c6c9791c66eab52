"""The requests whose images were recorded before the Engine v2 refactor.

`tests/fixtures/reference-outputs.npz` holds their images as made by the first engine
(commit cd14a27, 2 torch threads, this project's CPU torch); the regression test renders
them again through the service and compares within 1/255. DPM++ SDE is left out: its
Brownian noise was seeded from the global RNG, so it never reproduced (device issue).
LCM is left out since it became A1111's own LCM loop (another ladder and noise by
design); `tests/test_fewstep_samplers.py` checks it against A1111's loop instead. So is
DPM++ 2S a, now A1111's own `sample_dpmpp_2s_ancestral` (it was diffusers' single-step SDE
solver, another method), checked against that loop in `tests/test_dpmpp_2s_a.py`.
"""

from __future__ import annotations

from collections.abc import Iterator

from pipelines.schema import GenerationRequest, LoraSpec

REFERENCE_SAMPLERS = (
    "DPM++ 2M",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 2S a",
    "DPM++ 3M SDE",
    "Euler a",
    "Euler",
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DDIM",
    "PLMS",
    "UniPC",
)
"""The samplers as recorded, in order: each case's seed is 1000 + its index here."""
NOT_COMPARED = {"DPM++ 2S a"}
"""Recorded, but now another method by design (see the module docstring)."""


def reference_cases() -> Iterator[tuple[str, GenerationRequest]]:
    """(name, request) pairs: every sampler on the tiny SD1, plus a LoRA, clip skip,
    batch, Karras and SDXL case."""
    base = GenerationRequest(
        prompt="a red house, (blue sky:1.2)",
        negative_prompt="blurry",
        width=64,
        height=64,
        steps=5,
        cfg_scale=6.5,
        checkpoint="tiny-sd1",
    )
    for index, sampler in enumerate(REFERENCE_SAMPLERS):  # seeds as recorded: by index
        if sampler not in NOT_COMPARED:
            yield sampler, _with(base, sampler_name=sampler, seed=1000 + index)
    yield "lora", _with(base, seed=7, loras=(LoraSpec("ink", 0.8),))
    yield "lora-tag", _with(base, seed=8, prompt="a red house <lora:ink:1.3:0.5>")
    yield "clip-skip-2", _with(base, seed=9, clip_skip=2)
    yield "batch-2", _with(base, seed=10, batch_size=2, width=72, height=64)
    yield "karras-euler", _with(base, seed=11, sampler_name="Euler", scheduler="karras")
    yield "sdxl", _with(base, seed=12, checkpoint="tiny-sdxl", sampler_name="Euler a")
    yield "cfg-1", _with(base, seed=13, cfg_scale=1.0, sampler_name="Euler")


def _with(request: GenerationRequest, **changes: object) -> GenerationRequest:
    from dataclasses import replace

    return replace(request, **changes)  # type: ignore[arg-type]
