"""Suggested settings for few-step models: LCM, Turbo, Lightning, Hyper-SD, TCD.

A LoRA or checkpoint distilled for few steps only looks right with its own sampler, step
count and CFG. Its file name (or, failing that, its safetensors metadata: kohya's
`ss_output_name`, the ModelSpec `modelspec.title`) says which kind it is; this module
turns that into the settings its model card recommends. A plain file gets None.

The rule table (`RULES`, first match wins; names are compared lower-cased with camelCase
split, so "dreamshaperXL_lightning" and "HyperSD" match), with each value from its card:

| kind | sampler | schedule | steps | CFG |
|---|---|---|---|---|
| Hyper-SD N-step | DDIM | SGM Uniform (= trailing) | N | 1 |
| Hyper-SD 1-step | TCD | Automatic | 1 | 1 |
| Hyper-SD N-step CFG | DDIM | SGM Uniform (= trailing) | N | 5 (5-8) |
| TCD | TCD | Automatic | 4 (4-8) | 1 |
| SDXL-Lightning | Euler | SGM Uniform | N from the name, else 4 (2-8) | 1 |
| SD/SDXL-Turbo | Euler a | Automatic | 4 (1-4) | 1 |
| LCM / LCM-LoRA | LCM | Automatic | 4 (2-8) | 1.5 (1-2) |

Sources (read with the project's search tool):
- LCM-LoRA, https://huggingface.co/latent-consistency/lcm-lora-sdxl: `LCMScheduler`,
  "reduce the number of inference steps to just 2 to 8 steps", "either disable
  guidance_scale or use values between 1.0 and 2.0".
- SDXL Turbo, https://huggingface.co/docs/diffusers/api/pipelines/stable_diffusion/sdxl_turbo:
  "disable guidance scale by setting guidance_scale=0.0", "timestep_spacing='trailing'",
  "between 1 and 4 steps"; its scheduler_config is `EulerAncestralDiscreteScheduler`.
- SDXL-Lightning, https://huggingface.co/ByteDance/SDXL-Lightning: "use the correct
  checkpoint for the corresponding inference steps" (1, 2, 4, 8), `EulerDiscreteScheduler`
  with "trailing" timesteps and `guidance_scale=0`; its ComfyUI workflows: euler,
  sgm_uniform, CFG 1. The 1-step model predicts x0 ("experimental").
- Hyper-SD, https://huggingface.co/ByteDance/Hyper-SD: N-step LoRAs with `DDIMScheduler`
  `timestep_spacing="trailing"`, `guidance_scale=0`, N steps; the 1-step unified LoRA
  with `TCDScheduler`; the "CFG-Preserved" 8/12-step LoRAs "support 5~8 guidance scales".
- TCD, https://huggingface.co/h1t/TCD-SD15-LoRA (and TCD-SDXL-LoRA): `TCDScheduler`,
  `num_inference_steps=4`, `guidance_scale=0`, eta (gamma) 0.3, "a higher eta when
  increasing the number of inference steps".

In A1111 terms CFG 1 is diffusers' `guidance_scale=0` (or 1): no unconditional pass.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

METADATA_KEYS = ("ss_output_name", "modelspec.title")
"""Metadata read when the file name says nothing: kohya's output name, ModelSpec title."""

LCM_CARD = "https://huggingface.co/latent-consistency/lcm-lora-sdxl"
TURBO_CARD = "https://huggingface.co/docs/diffusers/api/pipelines/stable_diffusion/sdxl_turbo"
LIGHTNING_CARD = "https://huggingface.co/ByteDance/SDXL-Lightning"
HYPER_CARD = "https://huggingface.co/ByteDance/Hyper-SD"
TCD_CARD = "https://huggingface.co/h1t/TCD-SD15-LoRA"


@dataclass(frozen=True)
class FewStepSettings:
    """What a few-step model's card recommends, in A1111 request terms.

    `scheduler` is an A1111 schedule name ("automatic", "sgm_uniform"); `steps` and
    `cfg_scale` are the values "use suggested settings" applies, inside `steps_range` /
    `cfg_range`; `matched` says what gave the kind away; `source` is the model card.
    """

    kind: str
    sampler_name: str
    scheduler: str
    steps: int
    steps_range: tuple[int, int]
    cfg_scale: float
    cfg_range: tuple[float, float]
    source: str
    matched: str = ""
    note: str = ""

    def summary(self) -> str:
        """One line for a card: "SDXL-Lightning: Euler · SGM Uniform · 4 steps · CFG 1"."""
        from pipelines.samplers import SCHEDULER_LABELS, SCHEDULER_NAMES

        label = dict(zip(SCHEDULER_NAMES, SCHEDULER_LABELS, strict=True))[self.scheduler]
        steps = f"{self.steps} steps" if self.steps != 1 else "1 step"
        if self.steps_range[0] != self.steps_range[1]:
            steps += f" ({self.steps_range[0]}–{self.steps_range[1]})"
        cfg = f"CFG {self.cfg_scale:g}"
        if self.cfg_range[0] != self.cfg_range[1]:
            cfg += f" ({self.cfg_range[0]:g}–{self.cfg_range[1]:g})"
        return f"{self.kind}: {self.sampler_name} · {label} · {steps} · {cfg}"

    def as_dict(self) -> dict[str, Any]:
        """For the API: A1111 request field names, so a client can merge it into a
        txt2img payload."""
        return {
            "kind": self.kind,
            "sampler_name": self.sampler_name,
            "scheduler": self.scheduler,
            "steps": self.steps,
            "steps_range": list(self.steps_range),
            "cfg_scale": self.cfg_scale,
            "cfg_range": list(self.cfg_range),
            "matched": self.matched,
            "source": self.source,
            "note": self.note,
        }


def _words(text: str) -> str:
    """Lower case with camelCase split ("dreamshaperXL" -> "dreamshaper_xl")."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", text).lower()


def _steps(text: str) -> int | None:
    """The N of "4step", "8-steps", "2_step" in a name, if any."""
    found = re.search(r"(?<![0-9])(\d{1,2})[-_ ]?steps?(?![a-z])", text)
    return int(found.group(1)) if found else None


def _hyper(text: str) -> FewStepSettings:
    steps = _steps(text)
    if re.search(r"(?<![a-z])cfg(?![a-z])", text):
        n = steps or 8
        return FewStepSettings(
            "Hyper-SD (CFG)",
            "DDIM",
            "sgm_uniform",
            n,
            (n, n),
            5.0,
            (5.0, 8.0),
            HYPER_CARD,
            note="CFG-preserving: negative prompts work",
        )
    if steps == 1:
        return FewStepSettings(
            "Hyper-SD",
            "TCD",
            "automatic",
            1,
            (1, 1),
            1.0,
            (1.0, 1.0),
            HYPER_CARD,
            note="the 1-step unified LoRA, sampled with TCD",
        )
    n = steps or 8
    return FewStepSettings(
        "Hyper-SD",
        "DDIM",
        "sgm_uniform",
        n,
        (n, n),
        1.0,
        (1.0, 1.0),
        HYPER_CARD,
        note="DDIM with trailing spacing (SGM Uniform here), as the model card",
    )


def _tcd(text: str) -> FewStepSettings:
    return FewStepSettings(
        "TCD",
        "TCD",
        "automatic",
        4,
        (4, 8),
        1.0,
        (1.0, 1.0),
        TCD_CARD,
        note="gamma 0.3",
    )


def _lightning(text: str) -> FewStepSettings:
    steps = _steps(text)
    if steps in (1, 2, 4, 8):
        note = "the 1-step model predicts x0; 2 steps or more are safer" if steps == 1 else ""
        return FewStepSettings(
            "SDXL-Lightning",
            "Euler",
            "sgm_uniform",
            steps,
            (steps, steps),
            1.0,
            (1.0, 1.0),
            LIGHTNING_CARD,
            note=note,
        )
    return FewStepSettings(
        "SDXL-Lightning",
        "Euler",
        "sgm_uniform",
        4,
        (2, 8),
        1.0,
        (1.0, 1.0),
        LIGHTNING_CARD,
        note="the step count is not in the name",
    )


def _turbo(text: str) -> FewStepSettings:
    return FewStepSettings(
        "SD/SDXL-Turbo", "Euler a", "automatic", 4, (1, 4), 1.0, (1.0, 1.0), TURBO_CARD
    )


def _lcm(text: str) -> FewStepSettings:
    return FewStepSettings(
        "LCM",
        "LCM",
        "automatic",
        4,
        (2, 8),
        1.5,
        (1.0, 2.0),
        LCM_CARD,
        note="CFG 1 skips the negative prompt",
    )


RULES: tuple[tuple[str, re.Pattern[str], Callable[[str], FewStepSettings]], ...] = (
    ("Hyper-SD", re.compile(r"hyper[-_ ]?sd|(?<![a-z])hyper(?![a-z])"), _hyper),
    ("TCD", re.compile(r"(?<![a-z])tcd(?![a-z])"), _tcd),
    ("SDXL-Lightning", re.compile(r"lightning"), _lightning),
    ("Turbo", re.compile(r"turbo"), _turbo),
    ("LCM", re.compile(r"(?<![a-z])lcm"), _lcm),
)
"""(kind, pattern over `_words(name)`, settings for that name), first match wins: Hyper-SD
before TCD (its 1-step LoRA is sampled with TCD) and Lightning/Turbo before LCM."""


def suggest(name: str, metadata: Mapping[str, str] | None = None) -> FewStepSettings | None:
    """The settings a few-step file's card recommends, or None for a plain one.

    Args:
        name: the file name or stem (a path's last part is used).
        metadata: safetensors `__metadata__`; `METADATA_KEYS` are read when the name
            matches no rule.

    Returns:
        The settings with `matched` naming what matched, e.g.
        `suggest("sdxl_lightning_4step_lora")` -> Euler, SGM Uniform, 4 steps, CFG 1.
    """
    sources = [("name", Path(name).name)]
    sources += [(key, str((metadata or {}).get(key) or "")) for key in METADATA_KEYS]
    for where, raw in sources:
        text = _words(raw)
        for _kind, pattern, settings in RULES:
            if text and pattern.search(text):
                found = settings(text)
                label = f'{where} "{raw}"' if where != "name" else f'file name "{raw}"'
                return replace(found, matched=label)
    return None


def suggest_for_lora(entry: Any) -> FewStepSettings | None:
    """For a listed LoRA (`LoraEntry`): its file name, then its metadata."""
    return suggest(Path(entry.relpath).stem, entry.metadata)


def suggest_for_checkpoint(entry: Any) -> FewStepSettings | None:
    """For a listed checkpoint (`CheckpointEntry`): its name, then its safetensors
    metadata (read from the header only; an unreadable header counts as none)."""
    metadata: dict[str, str] = {}
    path = Path(entry.path)
    if entry.kind == "single" and path.suffix.lower() == ".safetensors":
        from pipelines.errors import LorastackError
        from pipelines.safeload import read_safetensors_header

        try:
            metadata = dict(read_safetensors_header(path).metadata)
        except (OSError, LorastackError):
            metadata = {}
    return suggest(Path(entry.model_name).name, metadata)
