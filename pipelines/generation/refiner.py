"""A1111's refiner (`modules/sd_samplers_common.py` `apply_refiner`, A1111 >= 1.6) as a
step of the denoising: at `refiner_switch_at` the run switches to another checkpoint of the
same family and carries on with the same latents and the same sampler state.

When it switches: A1111's default rule (`refiner_switch_by_sample_steps` off) judges each
step by its timestep: the step whose sigma is nearest the model's discrete timestep `t`
has done `(999 - t) / 1000` of the schedule, and the first step with at least
`switch_at` done, and every later one, runs on the refiner. This is also diffusers'
`denoising_end` / `denoising_start` rule, so `switch_at` 1.0 never switches.

What the refiner gets, as A1111's `setup_conds` after the switch: the prompts encoded again
with its own text encoder(s) (an SDXL refiner has only OpenCLIP-G; its UNet takes the
aesthetic-score time ids, see `Txt2ImgRun.unet_conditioning`), and the LoRAs of the stack
that fit it; a note names those that do not. The model that ran before the switch is made
current again once the refiner's steps are done, so the next batch and the decode start
from it (A1111 decodes with the refiner's VAE; the SDXL refiner ships the base's VAE).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from pipelines.errors import InvalidRequestError, UnusableFileError
from pipelines.folders.checkpoints import CheckpointEntry
from pipelines.folders.loras import LoraEntry
from pipelines.model_manager import ActiveModel

if TYPE_CHECKING:
    from pipelines.generation.run import Adapters, Conditioning, RunInputs, Txt2ImgRun

SwitchModel = Callable[[str | ActiveModel], ActiveModel]
"""Make a checkpoint (by key) or an already loaded model current (the engine's)."""


def discrete_timestep(scheduler: Any, index: int, timestep: torch.Tensor) -> int:
    """The model's discrete timestep nearest step `index` (A1111: argmin over the model's
    sigmas for k-diffusion samplers; the timestep itself for the others)."""
    sigmas = getattr(scheduler, "sigmas", None)
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if sigmas is None or alphas is None or index >= len(sigmas):
        return int(timestep)
    model_sigmas = ((1 - alphas) / alphas) ** 0.5
    sigma = sigmas[index].to(model_sigmas)
    return int(torch.argmin((model_sigmas - sigma).abs()))


def switch_index(scheduler: Any, timesteps: torch.Tensor, switch_at: float, start: int = 0) -> int:
    """Index into `timesteps` of the first step run on the refiner (`len(timesteps)`:
    none). `start` is the index of `timesteps[0]` in the scheduler's own schedule (an
    img2img tail)."""
    for index, timestep in enumerate(timesteps):
        done = (999 - discrete_timestep(scheduler, start + index, timestep)) / 1000
        if done >= switch_at:
            return index
    return len(timesteps)


@dataclass
class RefinerSwitch:
    """One run's refiner: the checkpoint (a registry key), the switch point, and what was
    made on it (loaded model, notes), kept across the run's batches and passes.

    Example:
        >>> run.refiner = RefinerSwitch("xl/refiner.safetensors", 0.8, engine.switch_model)
        ... # doctest: +SKIP
    """

    checkpoint: str
    switch_at: float
    switch_model: SwitchModel
    model: ActiveModel | None = None
    switched: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def may_switch(self) -> bool:
        """False when no step can reach the switch point (`switch_at` 1: no refiner)."""
        return self.switch_at < 1

    def index(self, scheduler: Any, timesteps: torch.Tensor) -> int:
        """Where this pass's steps go over to the refiner."""
        begin = getattr(scheduler, "begin_index", None) or 0
        return switch_index(scheduler, timesteps, self.switch_at, begin)

    def enter(self, run: Txt2ImgRun, inputs: RunInputs, conditioning: Conditioning) -> Conditioning:
        """Make the refiner current on `run` (the caller makes its model current again
        afterwards); returns the conditioning encoded by the refiner, with the stack's
        LoRAs that fit it applied."""
        adapters = self.activate(run, inputs)
        return run.encode_prompts(inputs, adapters, conditioning.hires_steps)

    def activate(self, run: Txt2ImgRun, inputs: RunInputs) -> Adapters:
        """Make the refiner current on `run` with the stack's LoRAs that fit it applied
        (`enter` without the prompts: what ZeroGPU prepares before its GPU call)."""
        before = run.model
        run.model = self.switch_model(self.model or self.checkpoint)
        if self.model is None:
            self.model = run.model
            if run.model.family != before.family:
                raise InvalidRequestError(
                    f"refiner_checkpoint: {self.model.title} is {self.model.architecture.value}"
                    f" but the checkpoint is {before.architecture.value}; a refiner must share "
                    "the checkpoint's latent space (the same family)",
                    field="refiner_checkpoint",
                )
        self.switched = True
        return self.apply_fitting(run, inputs)

    def apply_fitting(self, run: Txt2ImgRun, inputs: RunInputs) -> Adapters:
        """Apply the stack's LoRAs that fit the refiner; note the others once per run."""
        assert self.model is not None
        kept = []
        for spec in inputs.stack:
            entry = run.folders.resolve("lora", spec.name)
            reason = self.misfit(entry)
            note = f"refiner {self.model.name}: LoRA '{entry.name}' not applied: {reason}"
            if reason is None:
                kept.append(spec)
            elif note not in self.notes:  # once per run, not per batch
                self.notes.append(note)
        return run.apply_adapters(replace(inputs, stack=tuple(kept)))

    def misfit(self, entry: LoraEntry) -> str | None:
        """Why a LoRA does not fit the refiner (None: it fits)."""
        assert self.model is not None
        if entry.error:
            return str(entry.error)
        return self.model.adapters.misfit(entry.path, entry.name)

    def infotext(self, entry: CheckpointEntry) -> dict[str, object]:
        """A1111's keys, written only when the refiner ran (as `apply_refiner` does)."""
        if not self.switched:
            return {}
        short = entry.short_hash
        return {
            "Refiner": f"{entry.infotext_name} [{short}]" if short else entry.infotext_name,
            "Refiner switch at": self.switch_at,
        }


def refuse_refiner_as_base() -> UnusableFileError:
    return UnusableFileError(
        "SDXL refiner checkpoints only refine images: use it as the refiner "
        "(refiner_checkpoint) of an SDXL checkpoint, or for img2img",
        field="checkpoint",
    )
