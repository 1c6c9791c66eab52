"""Key spellings found in downloaded files, each made by its producing tool.

diffusers' old attention-processor format comes from diffusers 0.14 itself (committed with
its generator, tests/fixtures/lora_spellings/make_old_diffusers.py); PEFT SDXL files from
peft + diffusers' `save_lora_weights`. The oracle is the producing library's own layer
output or merge, never pipelines.lora's formulas.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.folders.hashing import HashCache
from pipelines.folders.registry import ModelFolders
from pipelines.loading import LoadedModel, random_pipeline
from pipelines.lora.files import read_lora_file
from pipelines.lora.stack import AdapterStack
from tests.conftest import DEMO_YAML, SDXL_YAML
from tests.test_lora import (
    SD1_MODULES,
    _peft_oracle,
    _randomise_lora,
    assert_bit_exact,
    assert_matches,
    make_kohya,
    module,
    sd1_keys,
    snapshot,
    write,
)

FIXTURES = Path(__file__).parent / "fixtures" / "lora_spellings"


@pytest.fixture(scope="module")
def sd1(cache_root: Path) -> LoadedModel:
    return random_pipeline(DEMO_YAML, 0, cache_root)


@pytest.fixture(scope="module")
def sdxl(cache_root: Path) -> LoadedModel:
    return random_pipeline(SDXL_YAML, 0, cache_root)


def _old_processor_layer(probe_key: str) -> str:
    """`...attn1.processor.to_out_lora.x` -> the UNet layer the LoRA acts on."""
    prefix, layer = probe_key.rsplit(".", 2)[:2]
    attention = prefix.removesuffix(".processor")
    target = layer.removesuffix("_lora")
    return f"{attention}.{target}" + (".0" if target == "to_out" else "")


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_old_diffusers_attention_processor_files(
    sd1: LoadedModel, tmp_path: Path, suffix: str
) -> None:
    """diffusers 0.14's `save_attn_procs` (no `unet.` prefix, no alpha), as safetensors and
    as the pickled `pytorch_lora_weights.bin`: every layer's merged output moves by exactly
    the multiplier times diffusers' own LoRA layer output."""
    pipe = sd1.pipe
    base = snapshot(pipe)
    path = tmp_path / f"old{suffix}"
    shutil.copy(FIXTURES / f"old-diffusers{suffix}", path)
    parsed = read_lora_file(path)
    assert parsed.format == "diffusers" and not parsed.unknown_keys
    applier = AdapterStack(pipe, sd1.architecture)
    assert applier.apply_paths([(path, "old", 0.7, 0.0)]) == []
    (report,) = applier.coverage_paths([(path, "old", 0.7, 0.0)])
    assert report.complete and report.total == 14 * 4
    probes = load_file(FIXTURES / "old-diffusers-probes.safetensors")
    checked = 0
    with torch.no_grad():
        for key in [k for k in probes if k.endswith(".x")]:
            layer = module(pipe, "unet", _old_processor_layer(key))
            x, y = probes[key], probes[key[:-2] + ".y"]
            w0 = base[("unet", _old_processor_layer(key))]
            moved = layer(x) - torch.nn.functional.linear(x, w0, layer.bias)
            torch.testing.assert_close(moved, 0.7 * y, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked == 56
    applier.restore()
    assert_bit_exact(pipe, base)


def test_registry_lists_pytorch_lora_weights_bin(tmp_path: Path) -> None:
    """diffusers' default file name is scanned (and read with weights_only); a `.bin` that
    is no LoRA is listed with the reason."""
    loras = tmp_path / "loras"
    (loras / "old").mkdir(parents=True)
    shutil.copy(FIXTURES / "old-diffusers.bin", loras / "old" / "pytorch_lora_weights.bin")
    torch.save({"string_to_param": {"*": torch.ones(1, 4)}}, loras / "embedding.bin")
    folders = ModelFolders({"lora": [loras]}, HashCache(None))
    folders.scan()
    entry = folders.resolve("lora", "pytorch_lora_weights")
    assert entry.usable and entry.format == "diffusers" and entry.parts == ("unet",)
    assert "SD1" in entry.families
    bad = folders.resolve("lora", "embedding")
    assert bad.error and "embedding.bin" in bad.error


@pytest.mark.filterwarnings(
    # transformers 5 deprecates is_gradient_checkpointing, which peft reads
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)
def test_peft_sdxl_text_encoder_2(sdxl: LoadedModel, tmp_path: Path) -> None:
    """diffusers' SDXL `save_lora_weights` (keys `unet.`, `text_encoder.`,
    `text_encoder_2.`), the oracle peft's own merge at multipliers other than 1."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = sdxl.pipe
    base = snapshot(pipe)
    layers = {}
    configs = {}
    for component, targets, seed in (
        ("unet", ["to_k", "proj_out"], 31),
        ("text_encoder", ["q_proj"], 32),
        ("text_encoder_2", ["v_proj", "fc1"], 33),
    ):
        model = copy.deepcopy(getattr(pipe, component))
        configs[component] = LoraConfig(r=2, lora_alpha=4, target_modules=targets)
        model.add_adapter(configs[component])
        _randomise_lora(model, seed)
        layers[component] = model
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(layers["unet"]),
        text_encoder_lora_layers=get_peft_model_state_dict(layers["text_encoder"]),
        text_encoder_2_lora_layers=get_peft_model_state_dict(layers["text_encoder_2"]),
        unet_lora_adapter_metadata=configs["unet"].to_dict(),
        text_encoder_lora_adapter_metadata=configs["text_encoder"].to_dict(),
        text_encoder_2_lora_adapter_metadata=configs["text_encoder_2"].to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    keys = list(load_file(path))
    assert any(k.startswith("text_encoder_2.") for k in keys)
    expected = dict(base)
    expected.update(_peft_oracle(layers["unet"], "unet", 0.6))
    expected.update(_peft_oracle(layers["text_encoder"], "text_encoder", 1.4))
    expected.update(_peft_oracle(layers["text_encoder_2"], "text_encoder_2", 1.4))
    applier = AdapterStack(pipe, sdxl.architecture)
    assert applier.apply_paths([(path, "xl-peft", 0.6, 1.4)]) == []
    (report,) = applier.coverage_paths([(path, "xl-peft", 0.6, 1.4)])
    assert {"text encoder", "text encoder 2"} <= {r for r, _, _ in report.regions}
    assert report.complete
    assert_matches(pipe, expected)
    applier.restore()
    assert_bit_exact(pipe, base)


def test_one_file_mixing_conventions(sd1: LoadedModel, tmp_path: Path) -> None:
    """kohya UNet keys, a `lycoris_` key and diffusers text-encoder keys in one file all
    land where each convention says (the oracle: kohya's up @ down * alpha / rank)."""
    pipe = sd1.pipe
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    keys[SD1_MODULES[1][:2]] = "lycoris_" + SD1_MODULES[1][1].replace(".", "_")
    keys[SD1_MODULES[8][:2]] = "text_encoder." + SD1_MODULES[8][1]
    state = make_kohya(pipe, SD1_MODULES, keys, seed=34)
    text_key = keys[SD1_MODULES[8][:2]]
    state[f"{text_key}.lora_A.weight"] = state.pop(f"{text_key}.lora_down.weight")
    state[f"{text_key}.lora_B.weight"] = state.pop(f"{text_key}.lora_up.weight")
    path = write(tmp_path / "mixed.safetensors", state)
    applier = AdapterStack(pipe, sd1.architecture)
    assert applier.apply_paths([(path, "mixed", 0.9, 0.4)]) == []
    expected = dict(base)
    for component, name, _ in SD1_MODULES:
        key = keys[(component, name)]
        down = state.get(f"{key}.lora_down.weight", state.get(f"{key}.lora_A.weight"))
        up = state.get(f"{key}.lora_up.weight", state.get(f"{key}.lora_B.weight"))
        mid = state.get(f"{key}.lora_mid.weight")
        w0 = base[(component, name)].double()
        rank = down.shape[0]
        scale = state[f"{key}.alpha"].item() / rank if f"{key}.alpha" in state else 1.0
        if mid is not None:
            delta = torch.einsum(
                "oi,ijkl,jn->onkl", up[:, :, 0, 0].double(), mid.double(), down[:, :, 0, 0].double()
            )
        else:
            delta = up.double().flatten(1) @ down.double().flatten(1)
        m = 0.9 if component == "unet" else 0.4
        expected[(component, name)] = (w0 + m * scale * delta.reshape(w0.shape)).float()
    assert_matches(pipe, expected)
    applier.restore()
    assert_bit_exact(pipe, base)
