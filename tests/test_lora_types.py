"""A1111's remaining network types (IA3, full, norm, GLoRA, OFT, BOFT), each written by
the library that makes it (lycoris-lora) and checked against that library's own forward
pass at multipliers other than 1, then restored bit-exactly (weights, biases, norms)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.loading import LoadedModel, random_pipeline
from pipelines.lora.files import read_lora_file
from pipelines.lora.stack import AdapterStack
from tests.conftest import DEMO_YAML

Params = dict[tuple[str, str], torch.Tensor]


@pytest.fixture(scope="module")
def sd1(cache_root: Path) -> LoadedModel:
    return random_pipeline(DEMO_YAML, 0, cache_root)


def every_parameter(pipe: object) -> Params:
    """Every parameter of the UNet and text encoder (weights, biases, norms), copied."""
    out: Params = {}
    for component in ("unet", "text_encoder"):
        for name, param in getattr(pipe, component).named_parameters():
            out[(component, name)] = param.detach().clone()
    return out


def assert_restored(pipe: object, base: Params) -> None:
    now = every_parameter(pipe)
    changed = [k for k in base if not torch.equal(base[k], now[k])]
    assert not changed, f"{len(changed)} parameters differ from base, e.g. {changed[:3]}"


def probe_for(layer: torch.nn.Module, gen: torch.Generator) -> torch.Tensor:
    """A random input the layer accepts."""
    if isinstance(layer, torch.nn.Linear):
        shape: tuple[int, ...] = (3, layer.in_features)
    elif isinstance(layer, torch.nn.Conv2d):
        shape = (3, layer.in_channels, 8, 8)
    elif isinstance(layer, torch.nn.GroupNorm):
        shape = (3, layer.num_channels, 4, 4)
    else:
        shape = (3, *layer.normalized_shape)
    return torch.randn(*shape, generator=gen)


def lycoris_network(
    model: torch.nn.Module, algo: str, multiplier: float, seed: int, **extra: object
) -> object:
    """A trained-looking LyCORIS network on a copy of `model` (every tensor given values)."""
    from lycoris import create_lycoris
    from lycoris.modules.full import FullModule

    net = create_lycoris(model, multiplier, linear_dim=4, linear_alpha=2.0, algo=algo, **extra)
    net.apply_to()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras:
            for name, param in lora.named_parameters():
                noise = torch.randn(param.shape, generator=gen) * 0.1
                if name == "rescale":
                    param.copy_(1 + noise)
                elif isinstance(lora, FullModule):
                    param.add_(noise)  # the layer's own weight, now trained
                else:
                    param.copy_(noise)
    return net


def check_against_lycoris(
    pipe: object, component: str, copy_of: torch.nn.Module, net: object, seed: int
) -> int:
    """Each merged layer's output equals the LyCORIS module's forward on the same input."""
    gen = torch.Generator().manual_seed(seed)
    names = {id(m): n for n, m in copy_of.named_modules()}
    checked = 0
    with torch.no_grad():
        for lora in net.loras:
            target = names[id(lora.org_module[0])]
            layer = getattr(pipe, component).get_submodule(target)
            probe = probe_for(layer, gen)
            torch.testing.assert_close(layer(probe), lora(probe), rtol=1e-5, atol=1e-5)
            checked += 1
    return checked


@pytest.mark.parametrize(
    ("algo", "extra", "multiplier", "kind"),
    [
        ("ia3", {}, -1.4, "ia3"),
        ("full", {}, 0.7, "full"),
        ("lora", {"train_norm": True}, 0.5, "norm"),  # norm layers beside LoRA ones
        ("glora", {}, 0.6, "glora"),
        ("diag-oft", {}, 0.6, "oft"),
        ("diag-oft", {"constraint": 1e-4}, 1.5, "oft"),  # the norm clamp in action
        ("diag-oft", {"rescaled": True}, 0.8, "oft"),
        ("boft", {}, 0.6, "boft"),
        ("boft", {"rescaled": True, "constraint": 1e-3}, -0.5, "boft"),
    ],
)
def test_lycoris_types_match_their_forward(
    sd1: LoadedModel, tmp_path: Path, algo: str, extra: dict, multiplier: float, kind: str
) -> None:
    pipe = sd1.pipe
    base = every_parameter(pipe)
    unet = copy.deepcopy(pipe.unet)
    net = lycoris_network(unet, algo, multiplier, seed=40, **extra)
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    parsed = read_lora_file(path)
    assert f"+{kind}" in parsed.format
    assert kind in {group.kind for group in parsed.groups.values()}
    applier = AdapterStack(pipe, sd1.architecture)
    assert applier.apply_paths([(path, algo, multiplier, 0.0)]) == []
    (report,) = applier.coverage_paths([(path, algo, multiplier, 0.0)])
    assert report.complete and report.total == len(net.loras)
    assert check_against_lycoris(pipe, "unet", unet, net, seed=41) == len(net.loras)
    applier.restore()
    assert_restored(pipe, base)


def test_text_encoder_full_and_ia3(sd1: LoadedModel, tmp_path: Path) -> None:
    """`lycoris_` text-encoder keys land on the text encoder, at its own multiplier; a
    UNet file in the same stack keeps its own; biases (full `diff_b`) restore exactly."""
    pipe = sd1.pipe
    base = every_parameter(pipe)
    text = copy.deepcopy(pipe.text_encoder)
    full = lycoris_network(text, "full", 0.4, seed=42)
    full_path = tmp_path / "te-full.safetensors"
    full.save_weights(str(full_path), torch.float32, {})
    unet = copy.deepcopy(pipe.unet)
    ia3 = lycoris_network(unet, "ia3", 1.7, seed=43)
    ia3_path = tmp_path / "unet-ia3.safetensors"
    ia3.save_weights(str(ia3_path), torch.float32, {})
    applier = AdapterStack(pipe, sd1.architecture)
    stack = [(full_path, "te-full", 0.0, 0.4), (ia3_path, "unet-ia3", 1.7, 0.0)]
    assert applier.apply_paths(stack) == []
    reports = applier.coverage_paths(stack)
    assert [r.regions[0][0] for r in reports] == ["text encoder", "UNet down"]
    assert check_against_lycoris(pipe, "text_encoder", text, full, seed=44) == len(full.loras)
    assert check_against_lycoris(pipe, "unet", unet, ia3, seed=45) == len(ia3.loras)
    assert applier.apply_paths([(ia3_path, "unet-ia3", 1.7, 0.0)]) == []  # TE back to base
    text_now = every_parameter(pipe)
    assert all(torch.equal(v, text_now[k]) for k, v in base.items() if k[0] == "text_encoder")
    applier.restore()
    assert_restored(pipe, base)


def test_ia3_on_input(sd1: LoadedModel, tmp_path: Path) -> None:
    """IA3 trained on the inputs (`on_input` 1: columns scaled), LyCORIS's module."""
    from lycoris.modules.ia3 import IA3Module

    pipe = sd1.pipe
    base = every_parameter(pipe)
    unet = copy.deepcopy(pipe.unet)
    names = [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.1.resnets.0.conv1",
    ]
    gen = torch.Generator().manual_seed(46)
    modules, state = [], {}
    for name in names:
        key = "lycoris_" + name.replace(".", "_")
        module = IA3Module(key, unet.get_submodule(name), -0.8, train_on_input=True)
        with torch.no_grad():
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 0.1)
        module.apply_to()
        modules.append((name, module))
        state[f"{key}.weight"] = module.weight.detach().clone()
        state[f"{key}.on_input"] = module.on_input.clone()
    path = tmp_path / "ia3-input.safetensors"
    save_file(state, str(path))
    applier = AdapterStack(pipe, sd1.architecture)
    assert applier.apply_paths([(path, "ia3-input", -0.8, 0.0)]) == []
    with torch.no_grad():
        for name, module in modules:
            layer = pipe.unet.get_submodule(name)
            probe = probe_for(layer, gen)
            torch.testing.assert_close(layer(probe), module(probe), rtol=1e-5, atol=1e-5)
    applier.restore()
    assert_restored(pipe, base)


def test_kohya_spelled_oft(sd1: LoadedModel, tmp_path: Path) -> None:
    """kohya's OFT files (`lora_unet_...oft_blocks` + `alpha` as the constraint) are the
    same blocks under kohya's prefix; they merge as LyCORIS's diag-OFT does."""
    pipe = sd1.pipe
    base = every_parameter(pipe)
    unet = copy.deepcopy(pipe.unet)
    net = lycoris_network(unet, "diag-oft", 0.7, seed=47, constraint=1e-3)
    lyco = tmp_path / "lyco.safetensors"
    net.save_weights(str(lyco), torch.float32, {})
    kohya = {
        "lora_unet_" + k.removeprefix("lycoris_"): v
        for k, v in load_file(lyco).items()
        if "attn" in k  # kohya's OFT trains the attention projections
    }
    path = tmp_path / "kohya-oft.safetensors"
    save_file(kohya, str(path), {"ss_network_module": "networks.oft"})
    assert read_lora_file(path).format == "kohya+oft"
    applier = AdapterStack(pipe, sd1.architecture)
    assert applier.apply_paths([(path, "kohya-oft", 0.7, 0.0)]) == []
    gen = torch.Generator().manual_seed(48)
    checked = 0
    with torch.no_grad():
        for lora in net.loras:
            name = next(n for n, m in unet.named_modules() if m is lora.org_module[0])
            layer = pipe.unet.get_submodule(name)
            probe = probe_for(layer, gen)
            if "attn" in name:
                torch.testing.assert_close(layer(probe), lora(probe), rtol=1e-5, atol=1e-5)
                checked += 1
            else:
                assert torch.equal(layer.weight, base[("unet", f"{name}.weight")])
    assert checked > 4
    applier.restore()
    assert_restored(pipe, base)


def test_old_lycoris_oft_diag(sd1: LoadedModel, tmp_path: Path) -> None:
    """Old LyCORIS OFT files stored each block's rotation R itself (`oft_diag`): the same
    rotation as LyCORIS's current `oft_blocks`, so its forward pass is the oracle."""
    pipe = sd1.pipe
    base = every_parameter(pipe)
    unet = copy.deepcopy(pipe.unet)
    net = lycoris_network(unet, "diag-oft", 0.6, seed=49)
    names = {id(m): n for n, m in unet.named_modules()}
    with torch.no_grad():
        state = {
            "lycoris_" + names[id(lora.org_module[0])].replace(".", "_") + ".oft_diag": lora.get_r()
            for lora in net.loras
        }
    path = tmp_path / "oft-diag.safetensors"
    save_file(state, str(path))
    applier = AdapterStack(pipe, sd1.architecture)
    assert applier.apply_paths([(path, "oft-diag", 0.6, 0.0)]) == []
    assert check_against_lycoris(pipe, "unet", unet, net, seed=50) == len(net.loras)
    applier.restore()
    assert_restored(pipe, base)


def test_bad_shapes_are_skipped_and_reported(sd1: LoadedModel, tmp_path: Path) -> None:
    """A type whose tensors do not fit the layer it names is skipped, never merged."""
    pipe = sd1.pipe
    base = every_parameter(pipe)
    good = "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    state = {
        f"{good}.diff": torch.ones(32, 32) * 0.01,
        "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.diff": torch.ones(5, 5),
        "lycoris_down_blocks_0_attentions_0_norm.w_norm": torch.ones(7),
        "lycoris_down_blocks_0_attentions_0_proj_in.oft_blocks": torch.zeros(3, 5, 5),
    }
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    applier = AdapterStack(pipe, sd1.architecture)
    (warning,) = applier.apply_paths([(path, "bad", 1.0, 1.0)])
    assert "1 of 4 modules matched" in warning and "skipped 3" in warning
    layer = pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    want = base[("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight")]
    torch.testing.assert_close(layer.weight, want + 0.01)
    applier.restore()
    assert_restored(pipe, base)
