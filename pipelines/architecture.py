"""Which Stable Diffusion family a checkpoint belongs to, from its keys and tensor shapes.

Works on shapes alone (a safetensors header, or a state dict on the meta device), so the
registry can classify a multi-GB file without reading its weights.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import torch

UNET_PREFIX = "model.diffusion_model."
CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"


class Architecture(enum.Enum):
    """A checkpoint family; `family` is what LoRA compatibility is judged by."""

    SD1 = "SD1"
    SD1_INPAINT = "SD1-inpainting"
    SD2 = "SD2"
    SD2_V = "SD2-v"
    SD2_INPAINT = "SD2-inpainting"
    SDXL = "SDXL"
    SDXL_INPAINT = "SDXL-inpainting"
    SDXL_REFINER = "SDXL-refiner"

    @property
    def family(self) -> str:
        return self.value.split("-")[0]

    @property
    def is_inpainting(self) -> bool:
        return self.value.endswith("-inpainting")

    @property
    def stock_yaml(self) -> str:
        """File name of the stock LDM yaml bundled in pipelines/configs/."""
        return {
            Architecture.SD1: "v1-inference.yaml",
            Architecture.SD1_INPAINT: "v1-inpainting-inference.yaml",
            Architecture.SD2: "v2-inference.yaml",
            Architecture.SD2_V: "v2-inference-v.yaml",
            Architecture.SD2_INPAINT: "v2-inpainting-inference.yaml",
            Architecture.SDXL: "sd_xl_base.yaml",
            Architecture.SDXL_INPAINT: "sd_xl_inpaint.yaml",
            Architecture.SDXL_REFINER: "sd_xl_refiner.yaml",
        }[self]


@dataclass(frozen=True)
class Detection:
    """What the keys and shapes say. `v_ambiguous`: SD2 512-base and 768-v share keys and
    shapes, so prediction type must come from a sidecar yaml or a test forward pass."""

    architecture: Architecture
    context_dim: int
    in_channels: int
    v_ambiguous: bool = False


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape, the only input detection needs."""
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def _context_dim(shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    for key, shape in shapes.items():
        if key.startswith(UNET_PREFIX) and key.endswith("attn2.to_k.weight") and len(shape) == 2:
            return shape[1]
    return None


def detect_architecture(shapes: Mapping[str, tuple[int, ...]], *, source: str) -> Detection:
    """Classify an original-layout (LDM/SGM) checkpoint.

    Args:
        shapes: key -> tensor shape of the whole checkpoint.
        source: the file name, for the error message.
    Returns:
        A Detection. Raises ValueError naming `source` when it is no SD checkpoint.
    Example:
        >>> detect_architecture(shapes_of(sd), source="v1-5.safetensors").architecture
        <Architecture.SD1: 'SD1'>
    """
    if CONV_IN not in shapes:
        lora_like = any(".lora_" in k or k.startswith("lora_") for k in shapes)
        hint = " (it looks like a LoRA: put it in loras/)" if lora_like else ""
        raise ValueError(
            f"{source}: not a Stable Diffusion checkpoint: no UNet weights "
            f"('{CONV_IN}' is missing){hint}"
        )
    in_channels = shapes[CONV_IN][1]
    context = _context_dim(shapes)
    has_sgm_clip_l = any(k.startswith("conditioner.embedders.0.transformer.") for k in shapes)
    has_sgm_open_clip_0 = any(k.startswith("conditioner.embedders.0.model.") for k in shapes)
    has_sgm_open_clip_1 = any(k.startswith("conditioner.embedders.1.model.") for k in shapes)
    has_ldm_clip = any(k.startswith("cond_stage_model.transformer.") for k in shapes)
    has_ldm_open_clip = any(k.startswith("cond_stage_model.model.") for k in shapes)
    has_label_emb = any(k.startswith(UNET_PREFIX + "label_emb.") for k in shapes)
    inpaint = in_channels == 9

    if has_sgm_open_clip_1 and has_sgm_clip_l:
        arch = Architecture.SDXL_INPAINT if inpaint else Architecture.SDXL
    elif has_sgm_open_clip_0 and not has_sgm_open_clip_1:
        arch = Architecture.SDXL_REFINER
    elif has_ldm_open_clip:
        arch = Architecture.SD2_INPAINT if inpaint else Architecture.SD2
    elif has_ldm_clip:
        arch = Architecture.SD1_INPAINT if inpaint else Architecture.SD1
    elif has_label_emb:
        # UNet-only SDXL export: label_emb carries the size/crop conditioning.
        arch = Architecture.SDXL_INPAINT if inpaint else Architecture.SDXL
    elif context == 1024:
        arch = Architecture.SD2_INPAINT if inpaint else Architecture.SD2
    elif context == 768:
        arch = Architecture.SD1_INPAINT if inpaint else Architecture.SD1
    else:
        raise ValueError(
            f"{source}: cannot tell the model family: no text encoder weights and an "
            f"unusual cross-attention width ({context}); add a sidecar .yaml beside it"
        )
    return Detection(
        architecture=arch,
        context_dim=context or 0,
        in_channels=in_channels,
        v_ambiguous=arch is Architecture.SD2,
    )


def probe_v_prediction(unet: torch.nn.Module) -> tuple[bool, float]:
    """A1111's decision between SD2 768-v and 512-base, which share keys and shapes: one
    UNet pass on a constant input (x = 0.5, t = 999, context = 0.5); A1111 calls it
    v-prediction when mean(output - x) < -1. Returns (is_v, that mean)."""
    parameter = next(unet.parameters())
    context_dim = unet.config.cross_attention_dim
    x_test = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=parameter.dtype)
    context = torch.full((1, 2, context_dim), 0.5, dtype=parameter.dtype)
    with torch.no_grad():
        output = unet(
            x_test.to(parameter.device),
            torch.tensor([999], device=parameter.device),
            encoder_hidden_states=context.to(parameter.device),
        ).sample
    mean = (output.float().cpu() - x_test.float()).mean().item()
    return is_v_from_probe(mean), mean


def is_v_from_probe(mean_difference: float) -> bool:
    """The threshold A1111 uses on the probe's mean(output - input)."""
    return mean_difference < -1
