"""pipelines.lora: every format, merged exactly, restored bit-exactly, cached.

Every file is made here on the tiny models. The oracle merges deltas into a copy of the
base weights with its own formulas (or with peft's / LyCORIS' own merge), never through
pipelines.lora, and the applied weights must match it tightly.
"""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from pipelines.errors import UnusableFileError
from pipelines.loading import LoadedModel, random_pipeline
from pipelines.lora.files import LoraFileCache, read_lora_file
from pipelines.lora.stack import AdapterStack
from tests.conftest import DEMO_YAML, SDXL_YAML

Weights = dict[tuple[str, str], torch.Tensor]


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def sd1(cache_root: Path) -> LoadedModel:
    """A private tiny SD1 (the session fixture is shared; these tests change weights)."""
    return random_pipeline(DEMO_YAML, 0, cache_root)


@pytest.fixture(scope="module")
def sdxl(cache_root: Path) -> LoadedModel:
    return random_pipeline(SDXL_YAML, 0, cache_root)


def snapshot(pipe: object) -> Weights:
    """Every Linear/Conv weight of the pipeline, copied."""
    out: Weights = {}
    for component in ("unet", "text_encoder", "text_encoder_2"):
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                out[(component, name)] = module.weight.detach().clone()
    return out


def module(pipe: object, component: str, name: str) -> torch.nn.Module:
    return getattr(pipe, component).get_submodule(name)


def assert_bit_exact(pipe: object, base: Weights) -> None:
    now = snapshot(pipe)
    changed = [k for k in base if not torch.equal(base[k], now[k])]
    assert not changed, f"{len(changed)} layers differ from base, e.g. {changed[:3]}"


def assert_matches(pipe: object, expected: Weights) -> None:
    """Every layer equals the oracle's weights within fp32 rounding."""
    now = snapshot(pipe)
    for key, want in expected.items():
        torch.testing.assert_close(now[key], want, rtol=1e-5, atol=1e-6, msg=str(key))


def rand(gen: torch.Generator, *shape: int, scale: float = 0.1) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


def kohya_key(prefix: str, name: str) -> str:
    return prefix + name.replace(".", "_")


# A hand-made kohya LoRA: (component, module, kind) with kind linear / conv3 / conv1 / mid.
SD1_MODULES = [
    ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "linear"),
    ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "linear"),
    ("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2", "linear"),
    ("unet", "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_out.0", "linear"),
    ("unet", "down_blocks.1.resnets.0.time_emb_proj", "linear"),
    ("unet", "down_blocks.0.resnets.0.conv1", "conv3"),
    ("unet", "down_blocks.1.attentions.0.proj_in", "conv1"),
    ("unet", "up_blocks.0.resnets.0.conv2", "mid"),
    ("text_encoder", "encoder.layers.0.self_attn.q_proj", "linear"),
    ("text_encoder", "encoder.layers.1.mlp.fc1", "linear"),
]


def make_kohya(
    pipe: object,
    modules: list[tuple[str, str, str]],
    keys: dict[tuple[str, str], str],
    *,
    seed: int,
    rank: int = 4,
    alpha: bool = True,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A kohya-format state dict for `modules`, keyed by `keys[(component, module)]`."""
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for index, (component, name, kind) in enumerate(modules):
        weight = module(pipe, component, name).weight
        out, inp = weight.shape[0], weight.shape[1]
        key = keys[(component, name)]
        if kind == "linear":
            state[f"{key}.lora_down.weight"] = rand(gen, rank, inp)
            state[f"{key}.lora_up.weight"] = rand(gen, out, rank)
        elif kind in ("conv3", "conv1"):
            k = 3 if kind == "conv3" else 1
            state[f"{key}.lora_down.weight"] = rand(gen, rank, inp, k, k)
            state[f"{key}.lora_up.weight"] = rand(gen, out, rank, 1, 1)
        else:  # LoCon with a CP middle: 1x1 down, 3x3 mid, 1x1 up
            state[f"{key}.lora_down.weight"] = rand(gen, rank, inp, 1, 1)
            state[f"{key}.lora_mid.weight"] = rand(gen, rank, rank, 3, 3)
            state[f"{key}.lora_up.weight"] = rand(gen, out, rank, 1, 1)
        if alpha and index % 3 != 2:  # some modules without alpha: scale 1
            state[f"{key}.alpha"] = torch.tensor(float(1 + index % rank))
    return {k: v.to(dtype) for k, v in state.items()}


def oracle_lora(w0: torch.Tensor, state: dict[str, torch.Tensor], key: str, m: float):
    """The kohya definition: W0 + m * alpha / rank * up @ down (own formulas)."""
    down = state[f"{key}.lora_down.weight"].double()
    up = state[f"{key}.lora_up.weight"].double()
    rank = down.shape[0]
    scale = state[f"{key}.alpha"].item() / rank if f"{key}.alpha" in state else 1.0
    if f"{key}.lora_mid.weight" in state:
        mid = state[f"{key}.lora_mid.weight"].double()
        delta = torch.einsum("oi,ijkl,jn->onkl", up[:, :, 0, 0], mid, down[:, :, 0, 0])
    else:
        delta = (up.reshape(up.shape[0], -1) @ down.reshape(rank, -1)).reshape(w0.shape)
    return delta * scale * m


def oracle(base: Weights, contributions: list[tuple[tuple[str, str], torch.Tensor]]) -> Weights:
    """base + sum of deltas, in float64, back to each layer's dtype."""
    out = {k: v.double() for k, v in base.items()}
    for layer, delta in contributions:
        out[layer] = out[layer] + delta.reshape(out[layer].shape)
    return {k: v.to(base[k].dtype) for k, v in out.items()}


def sd1_keys(modules: list[tuple[str, str, str]]) -> dict[tuple[str, str], str]:
    keys = {}
    for component, name, _ in modules:
        if component == "unet":
            keys[(component, name)] = kohya_key("lora_unet_", name)
        else:  # kohya spells CLIP modules from text_model. (flattened away in transformers 5)
            keys[(component, name)] = kohya_key("lora_te_text_model_", name)
    return keys


def kohya_contributions(base, modules, keys, state, unet_w, te_w):
    return [
        (
            (c, n),
            oracle_lora(base[(c, n)], state, keys[(c, n)], te_w if c != "unet" else unet_w),
        )
        for c, n, _ in modules
    ]


def write(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


# --------------------------------------------------------------------------- kohya


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("alpha", [True, False])
def test_kohya_sd1_exact(sd1: LoadedModel, tmp_path: Path, dtype, alpha) -> None:
    pipe = sd1.pipe
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    state = make_kohya(pipe, SD1_MODULES, keys, seed=1, alpha=alpha, dtype=dtype)
    path = write(tmp_path / "a.safetensors", state, {"ss_base_model_version": "sd_v1"})
    applier = AdapterStack(pipe, sd1.architecture)
    warnings = applier.apply_paths([(path, "a", 0.7, -0.4)])
    assert warnings == []
    assert_matches(
        pipe, oracle(base, kohya_contributions(base, SD1_MODULES, keys, state, 0.7, -0.4))
    )
    applier.restore()
    assert_bit_exact(pipe, base)


def test_two_loras_stack_and_weight_zero(sd1: LoadedModel, tmp_path: Path) -> None:
    pipe = sd1.pipe
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    first = make_kohya(pipe, SD1_MODULES, keys, seed=2)
    second = make_kohya(pipe, SD1_MODULES[::2], keys, seed=3, rank=2)
    a = write(tmp_path / "a.safetensors", first)
    b = write(tmp_path / "b.safetensors", second)
    applier = AdapterStack(pipe, sd1.architecture)
    applier.apply_paths([(a, "a", 1.0, 1.0), (b, "b", 0.5, 2.0)])
    expected = kohya_contributions(base, SD1_MODULES, keys, first, 1.0, 1.0)
    expected += kohya_contributions(base, SD1_MODULES[::2], keys, second, 0.5, 2.0)
    assert_matches(pipe, oracle(base, expected))
    applier.apply_paths([(a, "a", 0.0, 0.0), (b, "b", 0.0, 0.0)])
    assert_bit_exact(pipe, base)
    applier.apply_paths([(a, "a", 0.0, 1.0)])  # text encoder only
    unet_now = snapshot(pipe)
    assert all(torch.equal(unet_now[k], base[k]) for k in base if k[0] == "unet")
    applier.restore()
    assert_bit_exact(pipe, base)


def test_hundred_random_stack_changes_restore_bit_exact(sd1: LoadedModel, tmp_path: Path) -> None:
    pipe = sd1.pipe
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    rng = random.Random(0)
    files = []
    for index in range(4):
        chosen = rng.sample(SD1_MODULES, 5)
        state = make_kohya(pipe, chosen, keys, seed=10 + index)
        files.append((write(tmp_path / f"l{index}.safetensors", state), chosen, state))
    applier = AdapterStack(pipe, sd1.architecture)
    for step in range(100):
        stack = []
        for index, (path, _, _) in enumerate(files):
            if rng.random() < 0.5:
                stack.append((path, f"l{index}", rng.choice([0.0, 0.3, -1.0, 1.5]), rng.random()))
        rng.shuffle(stack)
        applier.apply_paths(stack)
        if step % 25 == 0:  # the live weights are exactly this stack, whatever came before
            contributions = []
            for path, _, unet_w, te_w in stack:
                _, chosen, state = next(f for f in files if f[0] == path)
                contributions += kohya_contributions(base, chosen, keys, state, unet_w, te_w)
            assert_matches(pipe, oracle(base, contributions))
    applier.apply_paths([])
    assert_bit_exact(pipe, base)
    assert applier.applied_layers == 0


def test_backups_stay_under_their_budget(sd1: LoadedModel, tmp_path: Path) -> None:
    """Backups of layers back at base are dropped (oldest first) beyond the budget; the
    applied layers' backups are always kept, and every restore stays bit-exact."""
    pipe = sd1.pipe
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    halves = [SD1_MODULES[:5], SD1_MODULES[5:]]
    files = [
        write(tmp_path / f"h{i}.safetensors", make_kohya(pipe, half, keys, seed=40 + i))
        for i, half in enumerate(halves)
    ]

    def layer_bytes(half: list[tuple[str, str, str]]) -> int:
        weights = [module(pipe, c, n).weight for c, n, _ in half]
        return sum(w.numel() * w.element_size() for w in weights)

    budget = layer_bytes(halves[0]) + 1
    stack = AdapterStack(pipe, sd1.architecture, backup_budget=budget)
    stack.apply_paths([(files[0], "h0", 1.0, 1.0)])
    assert stack.backup_bytes == layer_bytes(halves[0])
    stack.apply_paths([(files[1], "h1", 1.0, 1.0)])  # h0's layers are idle now: over budget
    assert stack.backup_bytes == layer_bytes(halves[1])
    assert stack.backup_bytes <= max(budget, layer_bytes(halves[1]))
    stack.apply_paths([(files[0], "h0", 0.5, 0.5), (files[1], "h1", 1.0, 1.0)])
    assert stack.backup_bytes == layer_bytes(halves[0]) + layer_bytes(halves[1])  # all needed
    stack.apply_paths([])
    assert_bit_exact(pipe, base)
    assert stack.backup_bytes <= budget
    unlimited = AdapterStack(pipe, sd1.architecture)  # default budget keeps idle backups
    unlimited.apply_paths([(files[0], "h0", 1.0, 1.0)])
    unlimited.apply_paths([(files[1], "h1", 1.0, 1.0)])
    assert unlimited.backup_bytes == layer_bytes(halves[0]) + layer_bytes(halves[1])
    unlimited.restore()
    assert_bit_exact(pipe, base)


def sdxl_ldm_modules() -> tuple[list[tuple[str, str, str]], dict[tuple[str, str], str]]:
    """kohya SDXL files use LDM (SGM) UNet names; this table is written out by hand for the
    tiny SDXL (one resnet per down block, so input block n = 1 + 2 * block + layer)."""
    table = [
        (
            "unet",
            "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k",
            "linear",
            "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k",
        ),
        (
            "unet",
            "down_blocks.1.attentions.0.proj_in",
            "linear",
            "lora_unet_input_blocks_3_1_proj_in",
        ),
        (
            "unet",
            "down_blocks.0.resnets.0.conv1",
            "conv3",
            "lora_unet_input_blocks_1_0_in_layers_2",
        ),
        ("unet", "down_blocks.0.downsamplers.0.conv", "conv3", "lora_unet_input_blocks_2_0_op"),
        (
            "unet",
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
            "linear",
            "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
        ),
        (
            "unet",
            "mid_block.resnets.1.time_emb_proj",
            "linear",
            "lora_unet_middle_block_2_emb_layers_1",
        ),
        (
            "unet",
            "up_blocks.0.resnets.1.conv_shortcut",
            "conv1",
            "lora_unet_output_blocks_1_0_skip_connection",
        ),
        (
            "unet",
            "up_blocks.0.attentions.1.proj_out",
            "linear",
            "lora_unet_output_blocks_1_1_proj_out",
        ),
        ("unet", "up_blocks.0.upsamplers.0.conv", "conv3", "lora_unet_output_blocks_1_2_conv"),
        ("unet", "add_embedding.linear_1", "linear", "lora_unet_label_emb_0_0"),
        ("unet", "up_blocks.1.resnets.1.conv2", "mid", "lora_unet_output_blocks_3_0_out_layers_3"),
        (
            "text_encoder",
            "encoder.layers.0.self_attn.q_proj",
            "linear",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        ),
        (
            "text_encoder_2",
            "text_model.encoder.layers.1.mlp.fc1",
            "linear",
            "lora_te2_text_model_encoder_layers_1_mlp_fc1",
        ),
    ]
    return [t[:3] for t in table], {(t[0], t[1]): t[3] for t in table}


def test_kohya_sdxl_ldm_names_exact(sdxl: LoadedModel, tmp_path: Path) -> None:
    pipe = sdxl.pipe
    base = snapshot(pipe)
    modules, keys = sdxl_ldm_modules()
    state = make_kohya(pipe, modules, keys, seed=4, dtype=torch.float16)
    path = write(tmp_path / "xl.safetensors", state)
    applier = AdapterStack(pipe, sdxl.architecture)
    assert applier.apply_paths([(path, "xl", 0.8, 1.2)]) == []
    assert_matches(pipe, oracle(base, kohya_contributions(base, modules, keys, state, 0.8, 1.2)))
    applier.restore()
    assert_bit_exact(pipe, base)


def test_kohya_sdxl_diffusers_names(sdxl: LoadedModel, tmp_path: Path) -> None:
    pipe = sdxl.pipe
    base = snapshot(pipe)
    modules = [
        ("unet", "up_blocks.0.attentions.0.transformer_blocks.1.attn1.to_v", "linear"),
        ("text_encoder_2", "text_model.encoder.layers.0.self_attn.out_proj", "linear"),
    ]
    keys = {
        modules[0][:2]: kohya_key("lora_unet_", modules[0][1]),
        modules[1][:2]: kohya_key("lora_te2_", modules[1][1]),
    }
    state = make_kohya(pipe, modules, keys, seed=5)
    path = write(tmp_path / "xl2.safetensors", state)
    applier = AdapterStack(pipe, sdxl.architecture)
    applier.apply_paths([(path, "xl2", 1.0, 0.5)])
    assert_matches(pipe, oracle(base, kohya_contributions(base, modules, keys, state, 1.0, 0.5)))
    applier.restore()
    assert_bit_exact(pipe, base)


# --------------------------------------------------------------------------- compatibility


def test_wrong_family_refused_naming_both(sd1: LoadedModel, sdxl: LoadedModel, tmp_path):
    modules, keys = sdxl_ldm_modules()
    xl = write(tmp_path / "xl.safetensors", make_kohya(sdxl.pipe, modules, keys, seed=6))
    sd1_state = make_kohya(sd1.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=6)
    one = write(tmp_path / "one.safetensors", sd1_state)
    base = snapshot(sd1.pipe)
    with pytest.raises(UnusableFileError, match=r"SDXL.*SD1") as caught:
        AdapterStack(sd1.pipe, sd1.architecture).apply_paths([(one, "one", 1, 1), (xl, "xl", 1, 1)])
    assert caught.value.status == 400
    assert_bit_exact(sd1.pipe, base)  # validated before anything was merged
    with pytest.raises(UnusableFileError, match=r"SD1/SD2.*SDXL"):
        AdapterStack(sdxl.pipe, sdxl.architecture).apply_paths([(one, "one", 1, 1)])


def test_width_detection_on_real_shapes() -> None:
    from pipelines.lora.family import detect_lora_architecture
    from pipelines.lora.keys import group_keys

    def shapes(width: int, prefix: str = "lora_te_") -> dict[str, tuple[int, ...]]:
        return {
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down."
            "weight": (4, width),
            f"{prefix}text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": (4, width),
        }

    assert detect_lora_architecture(group_keys(shapes(768))[0]).families == ("SD1",)
    assert detect_lora_architecture(group_keys(shapes(1024))[0]).families == ("SD2",)
    xl = detect_lora_architecture(group_keys(shapes(2048, "lora_te1_"))[0], {"ss_v2": "True"})
    assert xl.families == ("SDXL",)
    assert xl.disagreement and "SD2" in xl.disagreement


def test_coverage_full_partial_and_zero(sd1: LoadedModel, tmp_path: Path) -> None:
    """Every applied LoRA gets a report by region; nothing matching is refused with it;
    a partial match is applied and names what was skipped."""
    pipe = sd1.pipe
    base = snapshot(pipe)
    gen = torch.Generator().manual_seed(7)
    alien = {
        "lora_unet_no_such_block_to_q.lora_down.weight": rand(gen, 4, 32),
        "lora_unet_no_such_block_to_q.lora_up.weight": rand(gen, 32, 4),
        "lora_unet_up_blocks_9_attentions_0_proj_in.lora_down.weight": rand(gen, 4, 32),
        "lora_unet_up_blocks_9_attentions_0_proj_in.lora_up.weight": rand(gen, 32, 4),
    }
    path = write(tmp_path / "alien.safetensors", alien)
    applier = AdapterStack(pipe, sd1.architecture)
    with pytest.raises(UnusableFileError) as refused:
        applier.apply_paths([(path, "alien", 1, 1)])
    message = refused.value.message
    assert "matches no layer" in message and "0 of 2 modules matched" in message
    assert "UNet up 0/1, UNet other 0/1" in message and "lora_unet_no_such_block_to_q" in message
    assert_bit_exact(pipe, base)
    # full: no warning, a complete report with every region of SD1_MODULES
    keys = sd1_keys(SD1_MODULES)
    full = write(tmp_path / "full.safetensors", make_kohya(pipe, SD1_MODULES, keys, seed=8))
    assert applier.apply_paths([(full, "full", 1, 1)]) == []
    (report,) = applier.coverage_paths([(full, "full", 1, 1)])
    assert report.complete and (report.matched, report.total) == (10, 10)
    assert report.regions == (
        ("text encoder", 2, 2),
        ("UNet down", 5, 5),
        ("UNet mid", 1, 1),
        ("UNet up", 2, 2),
    )
    assert report.summary() == (
        "LoRA 'full': 10 of 10 modules matched "
        "(text encoder 2/2, UNet down 5/5, UNet mid 1/1, UNet up 2/2)"
    )
    # partial: applied, and the warning names the skipped keys by region
    state = make_kohya(pipe, SD1_MODULES[:3], keys, seed=8)
    state.update(alien)
    state["lora_unet_down_blocks_0_attentions_0_oops.weird_tensor"] = torch.ones(2)
    mixed = write(tmp_path / "mixed.safetensors", state)
    warnings = applier.apply_paths([(mixed, "mixed", 1, 1)])
    assert len(warnings) == 1
    assert warnings[0].startswith("LoRA 'mixed': 3 of 5 modules matched (")
    assert "UNet down 2/2, UNet mid 1/1, UNet up 0/1, UNet other 0/1" in warnings[0]
    assert "skipped 2: 'lora_unet_no_such_block_to_q'" in warnings[0]
    assert "1 keys of a kind we do not merge ignored" in warnings[0]
    (report,) = applier.coverage_paths([(mixed, "mixed", 1, 0)])
    as_json = report.as_dict()
    assert as_json["matched"] == 3 and as_json["total"] == 5 and not as_json["complete"]
    assert as_json["regions"]["UNet up"] == {"matched": 0, "total": 1}
    assert set(as_json["skipped"]) == {
        "lora_unet_no_such_block_to_q",
        "lora_unet_up_blocks_9_attentions_0_proj_in",
    }
    assert as_json["ignored"] == ["lora_unet_down_blocks_0_attentions_0_oops.weird_tensor"]
    assert applier.coverage_paths([(mixed, "mixed", 0, 0)]) == []
    expected = kohya_contributions(base, SD1_MODULES[:3], keys, state, 1, 1)
    assert_matches(pipe, oracle(base, expected))
    applier.restore()
    assert_bit_exact(pipe, base)


def test_coverage_regions_of_sdxl_text_encoders(sdxl: LoadedModel, tmp_path: Path) -> None:
    modules, keys = sdxl_ldm_modules()
    path = write(tmp_path / "xl.safetensors", make_kohya(sdxl.pipe, modules, keys, seed=5))
    applier = AdapterStack(sdxl.pipe, sdxl.architecture)
    (report,) = applier.coverage_paths([(path, "xl", 1, 1)])
    regions = {region for region, _, _ in report.regions}
    assert {"text encoder", "text encoder 2"} <= regions and report.complete


def test_not_a_lora_and_nan_refused(tmp_path: Path) -> None:
    ckpt = write(tmp_path / "ckpt.safetensors", {"model.diffusion_model.x.weight": torch.ones(2)})
    with pytest.raises(UnusableFileError, match="full Stable Diffusion checkpoint"):
        read_lora_file(ckpt)
    bad = {
        "lora_unet_a.lora_down.weight": torch.tensor([[float("nan")]]),
        "lora_unet_a.lora_up.weight": torch.ones(1, 1),
    }
    with pytest.raises(UnusableFileError, match="NaN or Inf"):
        read_lora_file(write(tmp_path / "nan.safetensors", bad))


# --------------------------------------------------------------------------- cache


def test_cache_reads_once_and_rereads_replaced_file(sd1: LoadedModel, tmp_path: Path) -> None:
    pipe = sd1.pipe
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    path = write(tmp_path / "c.safetensors", make_kohya(pipe, SD1_MODULES, keys, seed=9))
    cache = LoraFileCache()
    applier = AdapterStack(pipe, sd1.architecture, cache)
    for weight in (1.0, 0.5, -0.25, 0.5, 1.0):
        applier.apply_paths([(path, "c", weight, weight)])
    assert cache.reads == 1
    replaced = make_kohya(pipe, SD1_MODULES, keys, seed=99)
    write(path, replaced)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    applier.apply_paths([(path, "c", 1.0, 1.0)])
    assert cache.reads == 2
    expected = kohya_contributions(base, SD1_MODULES, keys, replaced, 1.0, 1.0)
    assert_matches(pipe, oracle(base, expected))
    applier.restore()
    assert_bit_exact(pipe, base)


def test_cache_lru_budget(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    paths = []
    for index in range(3):
        state = {
            f"lora_unet_m{index}.lora_down.weight": rand(gen, 4, 256),
            f"lora_unet_m{index}.lora_up.weight": rand(gen, 256, 4),
        }
        paths.append(write(tmp_path / f"{index}.safetensors", state))
    one_file = 2 * 4 * 256 * 4
    cache = LoraFileCache(budget_bytes=2 * one_file)
    for path in paths:
        cache.get(path)
    assert paths[0] not in cache and paths[1] in cache and paths[2] in cache
    cache.get(paths[1])
    assert cache.reads == 3


# --------------------------------------------------------------------------- diffusers / PEFT


def _randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """peft starts lora_B at zero (no change at all); give every LoRA tensor values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name and "magnitude" not in name:
                param.copy_(rand(gen, *param.shape))
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + rand(gen, *param.shape))


def _peft_oracle(model: torch.nn.Module, component: str, multiplier: float) -> dict:
    """peft's own merge of each LoRA layer at `multiplier` (its `scale`): the oracle."""
    from peft.tuners.lora import LoraLayer

    expected = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            layer.set_scale("default", multiplier)
            base = layer.get_base_layer().weight.detach().clone()
            layer.merge(adapter_names=["default"])
            expected[(component, name)] = layer.get_base_layer().weight.detach().clone()
            layer.unmerge()
            layer.get_base_layer().weight.data.copy_(base)
            layer.set_scale("default", 1.0)
    return expected


@pytest.mark.parametrize("dora", [False, True])
def test_diffusers_format_save_lora_weights(sd1: LoadedModel, tmp_path: Path, dora: bool):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = sd1.pipe
    base = snapshot(pipe)
    unet = copy.deepcopy(pipe.unet)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_v", "proj_in", "conv1"], use_dora=dora
    )
    unet.add_adapter(config)
    _randomise_lora(unet, 11)
    text = copy.deepcopy(pipe.text_encoder)
    te_config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc2"], use_dora=dora)
    text.add_adapter(te_config)
    _randomise_lora(text, 12)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(unet),
        text_encoder_lora_layers=get_peft_model_state_dict(text),
        unet_lora_adapter_metadata=config.to_dict(),
        text_encoder_lora_adapter_metadata=te_config.to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"
    expected = dict(base)
    expected.update(_peft_oracle(unet, "unet", 0.6))
    expected.update(_peft_oracle(text, "text_encoder", 1.3))
    applier = AdapterStack(pipe, sd1.architecture)
    assert applier.apply_paths([(path, "d", 0.6, 1.3)]) == []
    assert_matches(pipe, expected)
    applier.restore()
    assert_bit_exact(pipe, base)


@pytest.mark.filterwarnings(
    # transformers 5 deprecates is_gradient_checkpointing, which peft's save_pretrained reads
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)
def test_peft_adapter_folder(sd1: LoadedModel, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    pipe = sd1.pipe
    base = snapshot(pipe)
    text = copy.deepcopy(pipe.text_encoder)
    config = LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "fc1"], rank_pattern={"fc1": 2}
    )
    peft_model = get_peft_model(text, config)
    _randomise_lora(peft_model, 13)
    folder = tmp_path / "te-adapter"
    peft_model.save_pretrained(folder)
    assert (folder / "adapter_config.json").is_file()
    expected = dict(base)
    oracle_weights = _peft_oracle(peft_model.base_model.model, "text_encoder", 0.9)
    expected.update(oracle_weights)
    applier = AdapterStack(pipe, sd1.architecture)
    assert applier.apply_paths([(folder, "te-adapter", 0.0, 0.9)]) == []
    assert_matches(pipe, expected)
    assert len(oracle_weights) == 6
    applier.restore()
    assert_bit_exact(pipe, base)


# --------------------------------------------------------------------------- LyCORIS


@pytest.mark.parametrize(
    ("algo", "extra", "multiplier"),
    [
        ("loha", {}, 1.0),
        ("loha", {}, 0.6),
        ("lokr", {"factor": 4}, 1.0),
        ("lokr", {"factor": 8, "full_matrix": True}, -0.7),
        # DoRA (LyCORIS reads `dora_wd`): magnitudes per output row (its default) and per
        # input column; square layers (attention q/k/v/out) tell the two apart by shape only
        ("locon", {"dora_wd": True}, 1.0),
        ("locon", {"dora_wd": True}, 0.6),
        ("locon", {"dora_wd": True, "wd_on_output": False}, 0.6),
        ("locon", {"dora_wd": True, "wd_on_output": False}, 1.3),
        ("loha", {"dora_wd": True}, 0.6),
        ("loha", {"dora_wd": True, "wd_on_output": False}, -0.5),
    ],
)
def test_lycoris_package_files(
    sd1: LoadedModel, tmp_path: Path, algo: str, extra: dict, multiplier: float
) -> None:
    """Files written by the lycoris-lora package (its `lycoris_` keys). The oracle is the
    trained network's own forward pass at the same multiplier (LyCORIS 4.1.3's merge
    helpers scale LoHa twice, its forward does not): each merged layer must give the same
    output."""
    from lycoris import create_lycoris

    pipe = sd1.pipe
    base = snapshot(pipe)
    unet = copy.deepcopy(pipe.unet)
    net = create_lycoris(unet, multiplier, linear_dim=4, linear_alpha=2.0, algo=algo, **extra)
    net.apply_to()
    gen = torch.Generator().manual_seed(14)
    with torch.no_grad():
        for name, param in net.named_parameters():
            if "dora_scale" in name:
                param.mul_(1 + rand(gen, *param.shape))
            else:
                param.copy_(rand(gen, *param.shape))
    path = tmp_path / f"{algo}.safetensors"
    net.save_weights(str(path), torch.float32, {})
    keys = list(read_lora_file(path).groups)
    assert keys and all(k.startswith("lycoris_") for k in keys)
    if "dora_wd" in extra:
        scales = [p for n, p in net.named_parameters() if "dora_scale" in n]
        on_output = extra.get("wd_on_output", True)
        assert scales and all((p.shape[1] == 1) == on_output for p in scales)
    applier = AdapterStack(pipe, sd1.architecture)
    assert applier.apply_paths([(path, algo, multiplier, multiplier)]) == []
    with torch.no_grad():
        for lora in net.loras:
            target = next(n for n, m in unet.named_modules() if m is lora.org_module[0])
            layer = pipe.unet.get_submodule(target)
            shape = (3, layer.weight.shape[1]) + ((8, 8) if layer.weight.dim() == 4 else ())
            probe = rand(gen, *shape, scale=1.0)
            torch.testing.assert_close(layer(probe), lora(probe), rtol=1e-5, atol=1e-5)
    applier.restore()
    assert_bit_exact(pipe, base)


def _loha(w0, p, m):
    """Own LoHa formula: (w1a @ w1b) * (w2a @ w2b) * alpha / rank, Tucker when t1/t2."""
    d = {k: v.double() for k, v in p.items()}
    rank = d["hada_w1_b"].shape[0]
    if "hada_t1" in d:
        first = torch.einsum("ijkl,io,jn->onkl", d["hada_t1"], d["hada_w1_a"], d["hada_w1_b"])
        second = torch.einsum("ijkl,io,jn->onkl", d["hada_t2"], d["hada_w2_a"], d["hada_w2_b"])
    else:
        first = d["hada_w1_a"] @ d["hada_w1_b"].flatten(1)
        second = d["hada_w2_a"] @ d["hada_w2_b"].flatten(1)
    return (first * second).reshape(w0.shape) * d["alpha"].item() / rank * m


def _lokr(w0, p, m):
    """Own LoKr formula: kron(w1, w2); alpha / rank only when a factor is low-rank."""
    d = {k: v.double() for k, v in p.items()}
    w1 = d["lokr_w1"] if "lokr_w1" in d else d["lokr_w1_a"] @ d["lokr_w1_b"]
    w2 = d["lokr_w2"] if "lokr_w2" in d else d["lokr_w2_a"] @ d["lokr_w2_b"]
    low_rank = "lokr_w1_b" in d or "lokr_w2_b" in d
    rank = (
        d["lokr_w1_b"].shape[0]
        if "lokr_w1_b" in d
        else (d["lokr_w2_b"].shape[0] if "lokr_w2_b" in d else 1)
    )
    scale = d["alpha"].item() / rank if low_rank and "alpha" in d else 1.0
    if w0.dim() == 4 and w2.dim() == 2:
        w2 = w2.reshape(w2.shape[0], -1, *w0.shape[2:])
    if w2.dim() == 4:
        out = torch.einsum("ab,cdkl->acbdkl", w1, w2)
        out = out.reshape(w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:])
    else:
        out = torch.einsum("ab,cd->acbd", w1, w2).reshape(w1.shape[0] * w2.shape[0], -1)
    return out.reshape(w0.shape) * scale * m


def test_hand_built_kohya_loha_lokr(sd1: LoadedModel, tmp_path: Path) -> None:
    pipe = sd1.pipe
    base = snapshot(pipe)
    gen = torch.Generator().manual_seed(15)
    groups = {
        # LoHa on a linear layer (out 64, in 64)
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"): {
            "hada_w1_a": rand(gen, 64, 4),
            "hada_w1_b": rand(gen, 4, 64),
            "hada_w2_a": rand(gen, 64, 4),
            "hada_w2_b": rand(gen, 4, 64),
            "alpha": torch.tensor(2.0),
        },
        # LoHa with Tucker cores on a 3x3 conv (out 32, in 32)
        ("unet", "down_blocks.0.resnets.0.conv2"): {
            "hada_t1": rand(gen, 4, 4, 3, 3),
            "hada_w1_a": rand(gen, 4, 32),
            "hada_w1_b": rand(gen, 4, 32),
            "hada_t2": rand(gen, 4, 4, 3, 3),
            "hada_w2_a": rand(gen, 4, 32),
            "hada_w2_b": rand(gen, 4, 32),
            "alpha": torch.tensor(1.0),
        },
        # LoKr, both full (scale 1 whatever alpha says)
        ("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_v"): {
            "lokr_w1": rand(gen, 8, 8),
            "lokr_w2": rand(gen, 8, 8),
            "alpha": torch.tensor(3.0),
        },
        # LoKr with a low-rank w1 and w2 (scale alpha / rank)
        ("unet", "up_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"): {
            "lokr_w1_a": rand(gen, 4, 2),
            "lokr_w1_b": rand(gen, 2, 8),
            "lokr_w2_a": rand(gen, 128, 2),
            "lokr_w2_b": rand(gen, 2, 8),
            "alpha": torch.tensor(1.0),
        },
        # LoKr on a 3x3 conv, w2 full with the kernel (out 64 = 4 x 16, in 64 = 4 x 16)
        ("unet", "up_blocks.0.resnets.0.conv2"): {
            "lokr_w1": rand(gen, 4, 4),
            "lokr_w2": rand(gen, 16, 16, 3, 3),
        },
        ("text_encoder", "encoder.layers.0.self_attn.v_proj"): {
            "hada_w1_a": rand(gen, 32, 2),
            "hada_w1_b": rand(gen, 2, 32),
            "hada_w2_a": rand(gen, 32, 2),
            "hada_w2_b": rand(gen, 2, 32),
            "alpha": torch.tensor(2.0),
        },
    }
    state = {}
    for (component, name), parts in groups.items():
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        for part, tensor in parts.items():
            state[f"{kohya_key(prefix, name)}.{part}"] = tensor
    path = write(tmp_path / "lyco.safetensors", state)
    contributions = []
    for layer, parts in groups.items():
        m = 0.8 if layer[0] == "unet" else 0.5
        formula = _loha if "hada_w1_a" in parts else _lokr
        contributions.append((layer, formula(base[layer], parts, m)))
    applier = AdapterStack(pipe, sd1.architecture)
    assert applier.apply_paths([(path, "lyco", 0.8, 0.5)]) == []
    assert_matches(pipe, oracle(base, contributions))
    applier.restore()
    assert_bit_exact(pipe, base)


def _column_dora(w0: torch.Tensor, delta: torch.Tensor, dora: torch.Tensor, m: float):
    """merged = W0 + delta, each input column renormalised to dora_scale (A1111 at m = 1);
    at other m LyCORIS's forward: merged * (m * (dora / norm - 1) + 1), minus W0."""
    merged = w0.double() + delta
    flat = merged.transpose(0, 1).reshape(merged.shape[1], -1)
    norm = flat.norm(dim=1).reshape(1, merged.shape[1], *[1] * (merged.dim() - 2))
    scale = dora.double().reshape(norm.shape) / norm
    return merged * (m * (scale - 1) + 1) - w0.double()


def test_kohya_dora_scale(sd1: LoadedModel, tmp_path: Path) -> None:
    pipe = sd1.pipe
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    modules = [SD1_MODULES[0], SD1_MODULES[5], SD1_MODULES[8]]  # linear, conv 3x3, TE
    state = make_kohya(pipe, modules, keys, seed=16)
    gen = torch.Generator().manual_seed(17)
    contributions = []
    for component, name, _ in modules:
        w0 = base[(component, name)]
        key = keys[(component, name)]
        column = w0.transpose(0, 1).reshape(w0.shape[1], -1).norm(dim=1)
        dora = (column * (1 + rand(gen, w0.shape[1]))).reshape(1, -1, *[1] * (w0.dim() - 2))
        state[f"{key}.dora_scale"] = dora
        m = 0.7 if component == "unet" else 1.0
        delta = oracle_lora(w0, state, key, 1.0)
        contributions.append(((component, name), _column_dora(w0, delta, dora, m)))
    path = write(tmp_path / "dora.safetensors", state)
    applier = AdapterStack(pipe, sd1.architecture)
    assert applier.apply_paths([(path, "dora", 0.7, 1.0)]) == []
    assert_matches(pipe, oracle(base, contributions))
    applier.restore()
    assert_bit_exact(pipe, base)


# --------------------------------------------------------------------------- images


def _image(pipe: object) -> np.ndarray:
    generator = torch.Generator().manual_seed(42)
    return pipe(
        "a red fox",
        num_inference_steps=2,
        height=64,
        width=64,
        guidance_scale=5.0,
        generator=generator,
        output_type="np",
    ).images[0]


def test_seeded_images_against_hand_merged_model(sd1: LoadedModel, tmp_path: Path) -> None:
    pipe = sd1.pipe
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    state = make_kohya(pipe, SD1_MODULES, keys, seed=18)
    path = write(tmp_path / "img.safetensors", state)
    base_image = _image(pipe)
    applier = AdapterStack(pipe, sd1.architecture)
    applier.apply_paths([(path, "img", 0.0, 0.0)])
    assert np.array_equal(_image(pipe), base_image)  # weight 0 == base, bit for bit
    applier.apply_paths([(path, "img", 1.0, 1.0)])
    lora_image = _image(pipe)
    applier.restore()
    assert np.array_equal(_image(pipe), base_image)
    # The oracle model: the same pipeline with the deltas merged by hand.
    merged = oracle(base, kohya_contributions(base, SD1_MODULES, keys, state, 1.0, 1.0))
    with torch.no_grad():
        for (component, name), weight in merged.items():
            module(pipe, component, name).weight.copy_(weight)
    oracle_image = _image(pipe)
    with torch.no_grad():
        for (component, name), weight in base.items():
            module(pipe, component, name).weight.copy_(weight)
    assert not np.array_equal(lora_image, base_image)
    np.testing.assert_allclose(lora_image, oracle_image, atol=1e-5)


def test_adapter_config_scale_rules(tmp_path: Path) -> None:
    """A PEFT folder's rslora scale alpha / sqrt(r) is stored per module."""
    folder = tmp_path / "rs"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"r": 4, "lora_alpha": 8, "use_rslora": True, "peft_type": "LORA"})
    )
    write(
        folder / "adapter_model.safetensors",
        {
            "base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(4, 32),
            "base_model.model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(32, 4),
        },
    )
    parsed = read_lora_file(folder)
    (group,) = parsed.groups.values()
    assert group.parts["scale"].item() == pytest.approx(8 / 2)
    assert parsed.format == "peft-folder"


def test_library_entries_apply(sd1: LoadedModel, tmp_path: Path) -> None:
    """The integration path: scan, resolve a request's name, apply the entry."""
    from pipelines.folders.hashing import HashCache
    from pipelines.folders.registry import ModelFolders

    pipe = sd1.pipe
    base = snapshot(pipe)
    keys = sd1_keys(SD1_MODULES)
    state = make_kohya(pipe, SD1_MODULES, keys, seed=19)
    write(tmp_path / "loras" / "sub" / "fox.safetensors", state, {"ss_output_name": "Fox"})
    (tmp_path / "loras" / "zero.safetensors").write_bytes(b"")
    folders = ModelFolders({"lora": [tmp_path / "loras"]}, HashCache(None))
    folders.scan()
    applier = AdapterStack(pipe, sd1.architecture)
    applier.apply([(folders.resolve("lora", "Fox"), 0.5, 0.25)])
    expected = kohya_contributions(base, SD1_MODULES, keys, state, 0.5, 0.25)
    assert_matches(pipe, oracle(base, expected))
    with pytest.raises(UnusableFileError, match="empty file"):
        applier.apply([(folders.resolve("lora", "zero"), 1.0, 1.0)])
    applier.restore()
    assert_bit_exact(pipe, base)


def test_bench_quick_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """bench/bench_lora.py --quick runs end to end (no time is asserted)."""
    from bench.bench_lora import main

    main(["--quick", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "| 5 |" in out and "change one weight" in out
    assert all(f"| {kind} |" in out for kind in ("ia3", "full", "norm", "glora", "oft", "boft"))
