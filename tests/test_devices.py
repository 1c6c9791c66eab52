"""Device plan: fp32 SDPA on CPU, xformers claimed only where it can really run."""

from __future__ import annotations

import torch

from pipelines.devices import plan_device, xformers_status


def test_cpu_plan_is_fp32_sdpa() -> None:
    plan = plan_device("cpu", want_xformers=True, medvram=True)
    assert plan.device.type == "cpu" and plan.dtype == torch.float32
    assert plan.attention == "sdpa" and "CUDA" in plan.attention_reason
    assert plan.memory_mode == "full"  # offload modes only mean something on a GPU
    assert "sdpa" in plan.describe()


def test_xformers_never_claimed_without_cuda() -> None:
    usable, reason = xformers_status(torch.device("cpu"))
    assert not usable and "SDPA" in reason
