"""`--compile`: torch.compile of the UNet and the VAE decoder, reused across LoRA changes.

The adapter stack (`pipelines/lora/stack.py`) writes merged weights into the same parameter
tensors (`copy_` into `param.data`), and a compiled graph reads parameters as inputs: their
values are not part of the graph, only their shape, dtype, device and strides (dynamo's
guards), which a merge never changes. So a stack or weight change, a per-step schedule or a
VAE swap reuses the compiled graph (zero recompiles; `tests/test_compile.py` counts them).

Two things would break that, so neither is done:
- inductor "freezing" folds parameters into the graph as constants, so a later merge would
  be silently ignored: it is switched off explicitly, whatever the environment says;
- fused QKV projections (diffusers' `fuse_qkv_projections`) make a new `to_qkv` weight that
  LoRA merges into `to_q`/`to_k`/`to_v` would not reach: the projections stay separate.

A new image size or batch recompiles once: the first size compiles a static graph, the
second a graph with dynamic sizes (dynamo's automatic dynamic shapes) that serves the rest.
`CompileWatch` logs every job that compiled something and how long that job took.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger(__name__)

INDUCTOR = "inductor"


def compile_options(backend: str, device: torch.device, cuda_graphs: bool) -> dict[str, Any]:
    """Inductor settings per device: never freezing (LoRA merges must reach the graph);
    CUDA graphs only when asked for (each new shape records another graph)."""
    if backend != INDUCTOR:
        return {}
    options: dict[str, Any] = {"freezing": False}
    if device.type == "cuda":
        options["triton.cudagraphs"] = cuda_graphs
    return options


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether `module.compile()` already ran on it (placement runs on every switch)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def compile_module(
    module: torch.nn.Module,
    device: torch.device,
    backend: str = INDUCTOR,
    *,
    cuda_graphs: bool = False,
) -> bool:
    """Compile one module in place (`module.compile()`: it stays the same object, so the
    adapter stack, the VAE swapper and the denoising loop keep using it); False when it
    already was. On CUDA it goes channels_last first."""
    if is_compiled(module):
        return False
    if device.type == "cuda":
        module.to(memory_format=torch.channels_last)
    options = compile_options(backend, device, cuda_graphs)
    module.compile(backend=backend, options=options or None)
    return True


def compile_pipeline(
    pipe: Any,
    device: torch.device,
    backend: str = INDUCTOR,
    *,
    cuda_graphs: bool = False,
) -> list[str]:
    """Compile `pipe`'s UNet and VAE decoder in place (see `compile_module`).

    Args:
        pipe: a diffusers Stable Diffusion (XL) pipeline, already on `device`.
        device: where it runs.
        backend: a torch.compile backend ("inductor"; tests also use "aot_eager").
        cuda_graphs: on CUDA, replay CUDA graphs (inductor's cudagraph trees).
    Returns:
        What was compiled now, for the log.
    Example:
        >>> compile_pipeline(pipe, torch.device("cpu"))  # doctest: +SKIP
        ['UNet', 'VAE decoder']
    """
    parts = (("UNet", pipe.unet), ("VAE decoder", pipe.vae.decoder))
    done = [
        label
        for label, module in parts
        if compile_module(module, device, backend, cuda_graphs=cuda_graphs)
    ]
    if done:
        log.info(
            "torch.compile (%s%s): %s; the first image of each new size compiles (minutes "
            "on a CPU), LoRA changes reuse the compiled graphs",
            backend,
            ", CUDA graphs" if cuda_graphs and device.type == "cuda" else "",
            " and ".join(done),
        )
    return done


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (every variant counts)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


@contextmanager
def compile_watch(enabled: bool) -> Iterator[None]:
    """Log how many graphs a job compiled and how long the job took with them (compile
    time and variants are what `--compile` costs; a stack change must add none)."""
    if not enabled:
        yield
        return
    before, started = compiled_graphs(), time.perf_counter()
    try:
        yield
    finally:
        added = compiled_graphs() - before
        if added:
            log.info(
                "torch.compile: this job compiled %d graph(s) and took %.1f s with them "
                "(%d compiled in all)",
                added,
                time.perf_counter() - started,
                compiled_graphs(),
            )
