"""`--compile`: LoRA changes write merged weights in place, so the compiled graphs are
reused (zero recompiles, counted with dynamo's counters) and still see every change.

The engine test compiles with dynamo's "eager" backend (the same graph capture and
guards as inductor, without generating C++): CPU inductor needs minutes for a whole UNet
here. One test runs the real inductor path, with freezing off as `--compile` sets it, on
one transformer block of the tiny UNet.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.architecture import Architecture
from pipelines.compiled import compile_module, compiled_graphs, is_compiled
from pipelines.devices import plan_device
from pipelines.engine import Engine
from pipelines.loading import LoadedModel
from pipelines.lora.stack import AdapterStack
from pipelines.schema import GenerationRequest, LoraSpec
from pipelines.service import Service, build_service
from pipelines.settings import Settings, parse_settings
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

SMALL = {"width": 64, "height": 64, "steps": 2, "checkpoint": "tiny-sd1", "seed": 5}
BLOCK = "down_blocks.1.attentions.0"


@pytest.fixture(scope="module")
def services(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> tuple[Service, Service]:
    """(eager, compiled) services on the same checkpoint and LoRA folder."""
    data = tmp_path_factory.mktemp("compile-data")
    loras = data / "loras"
    keys = sd1_keys(SD1_MODULES)
    write(loras / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    write(loras / "glow.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=2))
    settings = Settings(data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(loras,), threads=2)
    plan = replace(plan_device("cpu", compile=True), compile="eager")
    eager = build_service(settings)
    compiled = build_service(settings, lambda s, f: Engine(s, f, plan=plan))
    return eager, compiled


def pixels(service: Service, **fields: object) -> np.ndarray:
    request = GenerationRequest(**{"prompt": "a tower", **SMALL, **fields})
    return np.asarray(service.generate(request).images[0]).astype(int)


STACKS: list[dict[str, object]] = [
    {"loras": (LoraSpec("ink", 0.8),)},
    {"loras": (LoraSpec("ink", 0.3), LoraSpec("glow", -0.6))},
    {"prompt": "a tower <lora:ink:0@0,1@1>"},  # re-merged between the two steps
    {},
]


def test_stack_changes_reuse_the_compiled_graphs(services: tuple[Service, Service]) -> None:
    eager, compiled = services
    base = pixels(compiled)  # compiles the UNet and the VAE decoder
    unet = compiled.runner.manager.current.pipe.unet  # type: ignore[attr-defined]
    assert is_compiled(unet)
    graphs = compiled_graphs()
    images = [pixels(compiled, **stack) for stack in STACKS]
    assert compiled_graphs() == graphs  # zero recompiles over four stack changes
    assert not np.array_equal(images[0], base) and not np.array_equal(images[1], images[0])
    assert not np.array_equal(images[2], base)
    assert np.array_equal(images[3], base)  # removing every LoRA is bit-exact again
    for stack, image in zip(STACKS, images, strict=True):
        assert np.abs(image - pixels(eager, **stack)).max() <= 2, stack


# importing inductor imports torch.utils.mkldnn, which uses torch.jit.script_method (torch's
# own deprecation notice, raised once per process)
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_inductor_graph_sees_in_place_merges(tiny_sd1: LoadedModel, tmp_path: Path) -> None:
    """The real inductor path: a merge after compiling changes the output of the compiled
    block exactly as it changes the eager one, without recompiling, even when the
    environment switches inductor freezing on (TORCHINDUCTOR_FREEZING=1 would make the
    graph keep the weights it was compiled with)."""
    from diffusers import UNet2DConditionModel
    from torch._inductor import config as inductor_config

    unet = UNet2DConditionModel.from_config(tiny_sd1.pipe.unet.config).eval()
    unet.load_state_dict(tiny_sd1.pipe.unet.state_dict())
    block = unet.get_submodule(BLOCK)
    modules = [m for m in SD1_MODULES if m[1].startswith(BLOCK)]
    path = write(
        tmp_path / "block.safetensors",
        make_kohya(tiny_sd1.pipe, modules, sd1_keys(modules), seed=3),
    )
    stack = AdapterStack(type("Pipe", (), {"unet": unet})(), Architecture.SD1)
    assert compile_module(block, torch.device("cpu"))
    freezing = inductor_config.patch(freezing=True)
    channels = block.config.in_channels
    x = torch.randn(2, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    with torch.no_grad(), freezing:
        before = block(x, encoder_hidden_states=text, return_dict=False)[0]
        graphs = compiled_graphs()
        stack.apply_paths([(path, "block", 1.0, 1.0)])
        after = block(x, encoder_hidden_states=text, return_dict=False)[0]
        reference = block.forward(x, encoder_hidden_states=text, return_dict=False)[
            0
        ]  # not compiled
    assert compiled_graphs() == graphs
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("offload", ["--lowvram", "--medvram"])
def test_compile_with_offload_is_refused_naming_the_flags(
    offload: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--compile", offload], {})
    assert "--compile cannot be combined with --lowvram or --medvram" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--compile cannot be combined"):
        plan_device("cpu", compile=True, lowvram=offload == "--lowvram", medvram=True)
    assert parse_settings([], {"LORASTACK_COMPILE": "1"}).compile
