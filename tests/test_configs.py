"""The bundled model configs in pipelines/configs: stock LDM yamls and CLIP text-encoder folders."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_open_clip_checkpoint,
    create_unet_diffusers_config_from_ldm,
    create_vae_diffusers_config_from_ldm,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPTokenizerFast,
)

CONFIGS = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
CLIP_FOLDERS = ("clip_l", "clip_h", "clip_g")
BOS, EOS = 49406, 49407
PAD_ID = {"clip_l": EOS, "clip_h": 0, "clip_g": 0}  # OpenCLIP towers pad with "!" (id 0)

# sha256 of the committed stock yamls; pipelines/configs/README.md says where each came from.
YAML_SHA256 = {
    "v1-inference.yaml": "20b7f0acae54d1f88384a6ca15b5d62c0ee4fbbca07ff72f3761fe936083210d",
    "v1-inpainting-inference.yaml": (
        "baf37f7d667df422eb370712ed98eb2c590499752ae454568d72b293549253d7"
    ),
    "v2-inference.yaml": "ec4094bd36ef558cd9d52c9985471ac91d2c0c5bd071717411a4ccd5adf4f311",
    "v2-inference-v.yaml": "72b092aadfe146f5d3f395a720c0aa3b2354b2095e3f10dc18f0e9716d286dcb",
    "v2-inpainting-inference.yaml": (
        "821a51ee6a8f3a62e7f2002557fcb4f4ae97a2ab3cb3fb85942897d536fa8b2c"
    ),
    "sd_xl_base.yaml": "4bd61f9d429423a80690137a93cc01f39a039ae4b5115b322c3b524b86763d7d",
    "sd_xl_refiner.yaml": "5002986d2b9507bc3e15e5d6dbf0746324e27d60bcf4e89d139b431667b23448",
    "sd_xl_inpaint.yaml": "abc8737f1e1863ba6cc7e891606188620a9625cd00b46a466fcdf849af408973",
}

# Expected ids come from OpenCLIP's reference SimpleTokenizer (open_clip/tokenizer.py).
KNOWN_IDS = [
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("a photo of a dog", [320, 1125, 539, 320, 1929]),
    ("naïve café", [1097, 35689, 563, 15304]),
    ("Crème Brûlée ✨", [1075, 12138, 614, 711, 127, 119, 75, 13489, 3531]),
    ("東京", [48338, 21078, 361]),
    ("don't", [847, 713]),
    ("masterpiece, (red hair:1.2)", [12066, 267, 263, 736, 2225, 281, 272, 269, 273, 264]),
]


def _load_derive_script() -> ModuleType:
    """Import pipelines/configs/derive_clip_vocab.py by path (it is a script, not a module)."""
    path = CONFIGS / "derive_clip_vocab.py"
    spec = importlib.util.spec_from_file_location("derive_clip_vocab", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module", params=CLIP_FOLDERS)
def folder(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def tokenizer(folder: str) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(CONFIGS / folder)


# --- tokenizers -----------------------------------------------------------------------------


def test_tokenizer_basics(folder: str, tokenizer: CLIPTokenizer) -> None:
    assert tokenizer.model_max_length == 77
    assert len(tokenizer) == 49408
    assert tokenizer.bos_token_id == BOS
    assert tokenizer.eos_token_id == EOS
    assert tokenizer.pad_token_id == PAD_ID[folder]
    ids = tokenizer("a photo of a cat").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 2368, 49407]


@pytest.mark.parametrize(("text", "expected"), KNOWN_IDS)
def test_tokenizer_matches_reference_ids(
    tokenizer: CLIPTokenizer, text: str, expected: list[int]
) -> None:
    assert tokenizer(text).input_ids == [BOS, *expected, EOS]


def test_fast_tokenizer_agrees(folder: str, tokenizer: CLIPTokenizer) -> None:
    fast = CLIPTokenizerFast.from_pretrained(CONFIGS / folder)
    assert fast.model_max_length == 77
    for text, _ in KNOWN_IDS:
        assert fast(text).input_ids == tokenizer(text).input_ids


def test_padding_and_truncation_to_77(folder: str, tokenizer: CLIPTokenizer) -> None:
    padded = tokenizer(
        "a cat", padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    assert len(padded) == 77
    assert padded[:4] == [BOS, 320, 2368, EOS]
    assert padded[4:] == [PAD_ID[folder]] * 73

    long = tokenizer(
        "cat " * 200, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    assert len(long) == 77
    assert long[0] == BOS and long[-1] == EOS
    assert set(long[1:-1]) == {2368}


def test_exclamation_mark(folder: str, tokenizer: CLIPTokenizer) -> None:
    """`!` is the OpenCLIP pad token, so the HF tokenizers split it out as id 0.

    This matches diffusers' own SD2 / SDXL `tokenizer_2` folders; OpenCLIP itself (and A1111)
    encode a trailing `!` as `!</w>` (256), which clip_l still does.
    """
    expected = 256 if folder == "clip_l" else 0
    assert tokenizer("hello!").input_ids == [BOS, 3306, expected, EOS]


def test_tokenizer_files_are_shared_and_consistent() -> None:
    vocab_bytes = {(CONFIGS / name / "vocab.json").read_bytes() for name in CLIP_FOLDERS}
    merges_bytes = {(CONFIGS / name / "merges.txt").read_bytes() for name in CLIP_FOLDERS}
    assert len(vocab_bytes) == 1 and len(merges_bytes) == 1

    vocab = json.loads(vocab_bytes.pop())
    assert len(vocab) == 49408
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS
    assert sorted(vocab.values()) == list(range(49408))

    lines = merges_bytes.pop().decode("utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) == 1 + 48894


def test_special_tokens_map(folder: str) -> None:
    special = json.loads((CONFIGS / folder / "special_tokens_map.json").read_text())
    pad = "<|endoftext|>" if folder == "clip_l" else "!"
    assert special == {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": pad,
        "unk_token": "<|endoftext|>",
    }


def test_derive_script_reproduces_committed_files(tmp_path: Path) -> None:
    derive = _load_derive_script()
    committed = CONFIGS / "clip_l"
    # Rebuild a stand-in for bpe_simple_vocab_16e6.txt.gz from the committed merges: the real
    # file has a header line, the 48894 merges used, then more merges that CLIP ignores.
    merges = committed.joinpath("merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    unused = ["x y"] * 5
    bpe_text = "\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2", *merges, *unused]) + "\n"
    bpe_gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    bpe_gz.write_bytes(gzip.compress(bpe_text.encode("utf-8")))

    derive.main([str(bpe_gz), "--out", str(tmp_path / "out")])

    for name in CLIP_FOLDERS:
        for filename in ("vocab.json", "merges.txt"):
            produced = (tmp_path / "out" / name / filename).read_bytes()
            assert produced == (CONFIGS / name / filename).read_bytes(), (name, filename)


def test_derive_script_rejects_other_files(tmp_path: Path) -> None:
    derive = _load_derive_script()
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress(b"header\na b\n"))
    with pytest.raises(ValueError, match="not the CLIP BPE file"):
        derive.read_merges(bad)


# --- text-encoder configs -------------------------------------------------------------------

TEXT_ENCODERS = {
    # folder: (class, hidden, layers, heads, intermediate, act, projection, params in millions)
    "clip_l": (CLIPTextModel, 768, 12, 12, 3072, "quick_gelu", 768, 123.1),
    "clip_h": (CLIPTextModel, 1024, 23, 16, 4096, "gelu", 512, 340.4),
    "clip_g": (CLIPTextModelWithProjection, 1280, 32, 20, 5120, "gelu", 1280, 694.7),
}


def _build_on_meta(folder: str) -> torch.nn.Module:
    config = CLIPTextConfig.from_pretrained(CONFIGS / folder)
    cls = TEXT_ENCODERS[folder][0]
    assert config.architectures == [cls.__name__]
    with torch.device("meta"):
        return cls(config)


@pytest.mark.parametrize("name", CLIP_FOLDERS)
def test_text_encoder_config(name: str) -> None:
    _, hidden, layers, heads, intermediate, act, projection, millions = TEXT_ENCODERS[name]
    config = CLIPTextConfig.from_pretrained(CONFIGS / name)
    assert (config.hidden_size, config.num_hidden_layers) == (hidden, layers)
    assert (config.num_attention_heads, config.intermediate_size) == (heads, intermediate)
    assert (config.hidden_act, config.projection_dim) == (act, projection)
    assert (config.vocab_size, config.max_position_embeddings) == (49408, 77)
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (BOS, EOS, 1)

    model = _build_on_meta(name)
    assert type(model) is TEXT_ENCODERS[name][0]
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=0.01)


def _openclip_text_tower(prefix: str, width: int, layers: int) -> dict[str, torch.Tensor]:
    """Meta tensors shaped like an OpenCLIP text tower inside an LDM / SGM checkpoint."""
    w = width

    def t(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device="meta")

    sd = {
        "positional_embedding": t(77, w),
        "token_embedding.weight": t(49408, w),
        "ln_final.weight": t(w),
        "ln_final.bias": t(w),
        "text_projection": t(w, w),
    }
    for i in range(layers):
        block = f"transformer.resblocks.{i}."
        for norm in ("ln_1", "ln_2"):
            sd[block + norm + ".weight"] = t(w)
            sd[block + norm + ".bias"] = t(w)
        sd[block + "attn.in_proj_weight"] = t(3 * w, w)
        sd[block + "attn.in_proj_bias"] = t(3 * w)
        sd[block + "attn.out_proj.weight"] = t(w, w)
        sd[block + "attn.out_proj.bias"] = t(w)
        sd[block + "mlp.c_fc.weight"] = t(4 * w, w)
        sd[block + "mlp.c_fc.bias"] = t(4 * w)
        sd[block + "mlp.c_proj.weight"] = t(w, 4 * w)
        sd[block + "mlp.c_proj.bias"] = t(w)
    return {prefix + key: value for key, value in sd.items()}


def _assert_converted_matches(model: torch.nn.Module, converted: dict[str, torch.Tensor]) -> None:
    # diffusers drops the `text_model.` prefix for transformers' flattened CLIPTextModel.
    if not hasattr(model, "text_model"):
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected


def test_clip_l_matches_diffusers_conversion_of_sd1_keys() -> None:
    model = _build_on_meta("clip_l")
    prefix = "cond_stage_model.transformer."
    # An SD1 checkpoint stores the HF CLIPTextModel state dict under this prefix.
    checkpoint = {
        prefix + ("" if hasattr(model, "text_model") else "text_model.") + k: v
        for k, v in model.state_dict().items()
    }
    _assert_converted_matches(model, convert_ldm_clip_checkpoint(checkpoint))


@pytest.mark.parametrize(
    ("name", "prefix", "ldm_layers"),
    [
        ("clip_h", "cond_stage_model.model.", 24),  # SD2: diffusers drops the 24th block
        ("clip_g", "conditioner.embedders.1.model.", 32),  # SDXL base
        ("clip_g", "conditioner.embedders.0.model.", 32),  # SDXL refiner
    ],
)
def test_openclip_folders_match_diffusers_conversion(
    name: str, prefix: str, ldm_layers: int
) -> None:
    model = _build_on_meta(name)
    width = TEXT_ENCODERS[name][1]
    checkpoint = _openclip_text_tower(prefix, width, ldm_layers)
    converted = convert_open_clip_checkpoint(model, checkpoint, prefix=prefix)
    _assert_converted_matches(model, converted)


# --- stock LDM yamls ------------------------------------------------------------------------

YAMLS = {
    # name: (unet in_channels, context_dim, parameterization, UNet params in millions)
    "v1-inference.yaml": (4, 768, None, 859.5),
    "v1-inpainting-inference.yaml": (9, 768, None, 859.5),
    "v2-inference.yaml": (4, 1024, None, 865.9),
    "v2-inference-v.yaml": (4, 1024, "v", 865.9),
    "v2-inpainting-inference.yaml": (9, 1024, None, 865.9),
    "sd_xl_base.yaml": (4, 2048, None, 2567.5),
    "sd_xl_refiner.yaml": (4, [1280, 1280, 1280, 1280], None, 2259.5),
    "sd_xl_inpaint.yaml": (9, 2048, None, 2567.5),
}


def _load_yaml(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_is_the_stock_file(name: str) -> None:
    assert hashlib.sha256((CONFIGS / name).read_bytes()).hexdigest() == YAML_SHA256[name]


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_key_fields(name: str) -> None:
    in_channels, context_dim, parameterization, _ = YAMLS[name]
    params = _load_yaml(name)["model"]["params"]
    unet = (params.get("unet_config") or params["network_config"])["params"]
    assert unet["in_channels"] == in_channels
    assert unet["context_dim"] == context_dim
    assert params.get("parameterization") == parameterization
    if name.startswith("sd_xl"):
        assert params["scale_factor"] == 0.13025
        assert unet["adm_in_channels"] == (2560 if "refiner" in name else 2816)
        embedders = params["conditioner_config"]["params"]["emb_models"]
        bigg = [e for e in embedders if e["target"].endswith("FrozenOpenCLIPEmbedder2")]
        assert bigg[0]["params"]["arch"] == "ViT-bigG-14"
        assert bigg[0]["params"]["version"] == "laion2b_s39b_b160k"
    else:
        assert params["scale_factor"] == 0.18215
        assert params["conditioning_key"] == ("hybrid" if in_channels == 9 else "crossattn")
        encoder = params["cond_stage_config"]["target"].rsplit(".", 1)[-1]
        is_v1 = name.startswith("v1")
        assert encoder == ("FrozenCLIPEmbedder" if is_v1 else "FrozenOpenCLIPEmbedder")


@pytest.mark.parametrize("name", YAMLS)
def test_yaml_builds_diffusers_models(name: str) -> None:
    in_channels, _, _, unet_millions = YAMLS[name]
    original_config = _load_yaml(name)
    unet_config = create_unet_diffusers_config_from_ldm(original_config, {})
    vae_config = create_vae_diffusers_config_from_ldm(original_config, {})
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
        vae = AutoencoderKL(**vae_config)
    assert unet.config.in_channels == in_channels
    assert sum(p.numel() for p in unet.parameters()) / 1e6 == pytest.approx(unet_millions, rel=1e-3)
    assert sum(p.numel() for p in vae.parameters()) / 1e6 == pytest.approx(83.65, rel=1e-3)
