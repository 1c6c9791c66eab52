"""Device, dtype, attention backend and memory mode: decided once, reported plainly."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline

from pipelines.compiled import compile_pipeline
from pipelines.settings import OFFLOAD_REFUSAL

log = logging.getLogger(__name__)

GPU_MAX_PIXELS = 4 * 1024 * 1024
"""Default `--max-pixels` on a GPU (CONTRACT)."""
CPU_MAX_PIXELS = 1024 * 1024
"""Default `--max-pixels` elsewhere."""


@dataclass(frozen=True)
class DevicePlan:
    """Where and how the pipeline runs, with the reason for each choice."""

    device: torch.device
    dtype: torch.dtype
    attention: str  # "xformers" or "sdpa"
    attention_reason: str
    memory_mode: str  # "full", "medvram" or "lowvram"
    upcast_vae: bool
    compile: str | None = None  # torch.compile backend of the UNet and VAE decoder; None: eager

    def __post_init__(self) -> None:
        if self.compile and self.memory_mode != "full":
            raise ValueError(OFFLOAD_REFUSAL)

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        compiled = f", torch.compile ({self.compile})" if self.compile else ""
        return (
            f"{self.device.type} {dtype}, attention {self.attention} ({self.attention_reason}), "
            f"memory {self.memory_mode}{compiled}"
        )


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU."""
    if requested != "auto":
        return torch.device(requested)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def xformers_status(device: torch.device) -> tuple[bool, str]:
    """Whether xformers can really run here, and why not when it cannot."""
    if device.type != "cuda":
        return False, "xformers needs CUDA; using PyTorch SDPA"
    if importlib.util.find_spec("xformers") is None:
        return False, "xformers is not installed; using PyTorch SDPA"
    try:
        import xformers.ops  # noqa: F401
    except Exception as error:  # xformers built for another torch raises many kinds
        return False, f"xformers does not match this torch build ({error}); using SDPA"
    return True, "xformers memory-efficient attention"


def plan_device(
    requested: str = "auto",
    *,
    want_xformers: bool = False,
    medvram: bool = False,
    lowvram: bool = False,
    no_half_vae: bool = False,
    dtype: torch.dtype | None = None,
    compile: bool = False,
) -> DevicePlan:
    """Decide device, dtype (fp16 on CUDA, fp32 elsewhere unless `dtype` is given),
    attention, memory mode and whether to compile (`--compile`: inductor). Offload modes
    run on the CPU too (accelerate with the CPU as execution device), so every device path
    can be exercised without a GPU.

    Raises:
        ValueError: `compile` together with an offload mode (`OFFLOAD_REFUSAL`).
    """
    if compile and (medvram or lowvram):
        raise ValueError(OFFLOAD_REFUSAL)
    device = pick_device(requested)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    attention, reason = "sdpa", "PyTorch scaled_dot_product_attention"
    if want_xformers:
        usable, why = xformers_status(device)
        attention, reason = ("xformers", why) if usable else ("sdpa", why)
    memory = "lowvram" if lowvram else "medvram" if medvram else "full"
    if device.type not in ("cuda", "cpu"):
        memory = "full"
    return DevicePlan(
        device, dtype, attention, reason, memory, no_half_vae, "inductor" if compile else None
    )


def place_pipeline(pipe: DiffusionPipeline, plan: DevicePlan) -> None:
    """Move `pipe` to the planned device/dtype and switch on its attention and memory mode."""
    if pipe.unet.dtype != plan.dtype:  # casting logs a diffusers warning even when a no-op
        pipe.to(dtype=plan.dtype)
    if plan.upcast_vae and plan.dtype != torch.float32:
        pipe.vae.to(dtype=torch.float32)
    if plan.memory_mode == "lowvram" and plan.device.type == "cpu":
        _sequential_offload_on_cpu(pipe)
    elif plan.memory_mode == "lowvram":
        pipe.enable_sequential_cpu_offload(device=plan.device)
    elif plan.memory_mode == "medvram":
        pipe.enable_model_cpu_offload(device=plan.device)
    else:
        pipe.to(plan.device)
    if plan.attention == "xformers":
        pipe.enable_xformers_memory_efficient_attention()
    if plan.compile:  # after placement: the compiled modules read the placed weights
        compile_pipeline(pipe, plan.device, plan.compile)


def stored_tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """The tensor that really holds `module`'s own parameter or buffer `name`: its data,
    or, under accelerate's sequential CPU offload (`--lowvram`: the tensor sits on `meta`),
    the CPU copy its hook loads before every call. Writing into it in place reaches the
    next forward pass in every memory mode (LoRA merges, VAE weights)."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor.data
    hook = getattr(module, "_hf_hook", None)
    for part in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        weights_map = getattr(part, "weights_map", None)
        if weights_map is not None:
            stored: torch.Tensor = weights_map[name]
            return stored
    raise RuntimeError(f"{type(module).__name__}.{name} is held nowhere we can write to")


def _sequential_offload_on_cpu(pipe: DiffusionPipeline) -> None:
    """`enable_sequential_cpu_offload` with the CPU as execution device (how CI runs
    `--lowvram`). diffusers names that device "cpu:0", and accelerate's hooks then put a
    plain tensor where transformers' CLIP embedding had a parameter and fail on the next
    call; offloading each component to "cpu" as diffusers would avoids it."""
    from accelerate import cpu_offload

    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module) and name not in pipe._exclude_from_cpu_offload:
            cpu_offload(
                component, torch.device("cpu"), offload_buffers=len(component._parameters) > 0
            )


def memory_report() -> dict[str, Any]:
    """RAM from the OS, CUDA from torch, in the shape of A1111's `memory` route (errors as
    values, never raised)."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = os.sysconf("SC_AVPHYS_PAGES") * page
        ram: dict[str, Any] = {"free": free, "used": total - free, "total": total}
    except (ValueError, OSError, AttributeError) as error:
        ram = {"error": str(error)}
    if torch.cuda.is_available():
        free_cuda, total_cuda = torch.cuda.mem_get_info()
        system = {"free": free_cuda, "used": total_cuda - free_cuda, "total": total_cuda}
        cuda: dict[str, Any] = {"system": system}
    else:
        cuda = {"error": "unavailable"}
    return {"ram": ram, "cuda": cuda}
