"""Device plan: fp32 SDPA on CPU, xformers claimed only where it can really run, memory
modes honoured everywhere accelerate can offload (the CPU included, for tests)."""

from __future__ import annotations

import builtins
import types

import pytest
import torch

from pipelines import devices
from pipelines.devices import plan_device, xformers_status

CUDA = torch.device("cuda")


def test_cpu_plan_is_fp32_sdpa() -> None:
    plan = plan_device("cpu", want_xformers=True)
    assert plan.device.type == "cpu" and plan.dtype == torch.float32
    assert plan.attention == "sdpa" and "CUDA" in plan.attention_reason
    assert plan.memory_mode == "full"
    assert "sdpa" in plan.describe()


@pytest.mark.parametrize(
    ("flags", "mode"),
    [({}, "full"), ({"medvram": True}, "medvram"), ({"lowvram": True}, "lowvram")],
)
def test_memory_modes_and_dtype_on_the_cpu(flags: dict[str, bool], mode: str) -> None:
    plan = plan_device("cpu", dtype=torch.bfloat16, **flags)
    assert (plan.memory_mode, plan.dtype) == (mode, torch.bfloat16)


def test_xformers_never_claimed_without_cuda() -> None:
    usable, reason = xformers_status(torch.device("cpu"))
    assert not usable and "SDPA" in reason


def test_xformers_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    usable, reason = xformers_status(CUDA)
    assert not usable and "not installed" in reason


def _fake_xformers(monkeypatch: pytest.MonkeyPatch, failure: Exception | None) -> None:
    """xformers "installed": its import of `xformers.ops` fails with `failure`, or works."""
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: object())
    real_import = builtins.__import__

    def fake_import(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("xformers"):
            if failure is not None:
                raise failure
            return types.SimpleNamespace(ops=types.SimpleNamespace())
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)


def test_xformers_built_for_another_torch_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _fake_xformers(monkeypatch, OSError("undefined symbol: _ZN2at4_ops"))
    usable, reason = xformers_status(CUDA)
    assert not usable and "does not match this torch build" in reason and "SDPA" in reason


def test_matching_xformers_is_used_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_xformers(monkeypatch, None)
    assert xformers_status(CUDA) == (True, "xformers memory-efficient attention")
    monkeypatch.setattr(devices, "pick_device", lambda requested: CUDA)
    assert plan_device("cuda", want_xformers=True).attention == "xformers"
    assert plan_device("cuda", want_xformers=False).attention == "sdpa"
