"""Settings for few-step models, suggested from a LoRA's or checkpoint's name and metadata.

Distilled models (LCM, SD/SDXL-Turbo, SDXL-Lightning, Hyper-SD, TCD) make good images only
with the sampler, schedule, step count and CFG they were distilled for; with a normal
model's 20 steps at CFG 7 they give burnt noise. The values follow the model cards:

- LCM / LCM-LoRA (latent-consistency/lcm-lora-sdv1-5, lcm-lora-sdxl): the LCM sampler,
  4-8 steps, guidance 1-2.
- SD-Turbo / SDXL-Turbo (stabilityai): 1-4 steps, no guidance (CFG 1 here: one UNet pass),
  Euler a as A1111 users run it.
- SDXL-Lightning (ByteDance, `sdxl_lightning_Nstep_lora`): Euler with "trailing" timesteps
  (A1111's SGM Uniform), CFG 1, exactly the N steps of the file; the 1-step model is
  experimental (x0 prediction).
- Hyper-SD (ByteDance, `Hyper-SD15-Nsteps-lora`, `Hyper-SDXL-Nsteps-CFG-lora`): TCD (or
  DDIM with trailing spacing) at the file's N steps, CFG 1; the "CFG" variants keep
  guidance (CFG about 5-8).
- TCD (h1t/TCD-SD15, TCD-SDXL-LoRA): the TCD sampler, 4 steps, CFG 1 (gamma 0.3).

A name or metadata matching none of these gets no suggestion.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Suggestion:
    """What to set for a few-step model (A1111 names), and a one-line reason."""

    kind: str  # "LCM", "Turbo", "Lightning", "Hyper-SD", "TCD"
    sampler_name: str
    scheduler: str  # our schedule name ("automatic", "sgm_uniform")
    steps: int
    cfg_scale: float
    note: str

    def describe(self) -> str:
        schedule = "" if self.scheduler == "automatic" else f", {self.scheduler} schedule"
        return (
            f"{self.kind}: {self.sampler_name}{schedule}, {self.steps} steps, "
            f"CFG {self.cfg_scale:g} ({self.note})"
        )


METADATA_NAME_KEYS = ("modelspec.title", "ss_output_name", "ss_sd_model_name", "name")
"""Safetensors metadata that names what a file is (kohya's training name, ModelSpec)."""

_WORD = r"(?<![a-z0-9]){}(?![a-z])"
_STEPS = re.compile(r"(\d{1,2})[-_ ]?steps?", re.IGNORECASE)


def _has(word: str, text: str) -> bool:
    return re.search(_WORD.format(word), text) is not None


def _steps(text: str, default: int) -> int:
    found = _STEPS.search(text)
    return int(found.group(1)) if found else default


def suggest(name: str, metadata: Mapping[str, str] | None = None) -> Suggestion | None:
    """The settings the file's name (or the names in its metadata) marks it as needing."""
    texts = [name, *((metadata or {}).get(key, "") for key in METADATA_NAME_KEYS)]
    text = " ".join(t for t in texts if t).lower()
    if not text:
        return None
    if _has("hyper", text) or "hypersd" in text:
        steps = _steps(text, 8)
        if "cfg" in text:
            return Suggestion("Hyper-SD", "DDIM", "sgm_uniform", steps, 6.0, "CFG-preserving")
        if steps <= 2:
            return Suggestion("Hyper-SD", "TCD", "automatic", steps, 1.0, "no guidance")
        return Suggestion("Hyper-SD", "DDIM", "sgm_uniform", steps, 1.0, "trailing timesteps")
    if _has("lightning", text):
        steps = _steps(text, 4)
        note = "experimental 1-step model" if steps == 1 else "trailing timesteps"
        return Suggestion("Lightning", "Euler", "sgm_uniform", steps, 1.0, note)
    if _has("tcd", text):
        return Suggestion("TCD", "TCD", "automatic", _steps(text, 4), 1.0, "gamma 0.3")
    if _has("lcm", text):
        return Suggestion("LCM", "LCM", "automatic", _steps(text, 4), 1.5, "4-8 steps, CFG 1-2")
    if _has("turbo", text):
        return Suggestion("Turbo", "Euler a", "automatic", _steps(text, 1), 1.0, "1-4 steps")
    return None
