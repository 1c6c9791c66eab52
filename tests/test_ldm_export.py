"""Round trips: tiny diffusers models -> tests.ldm_export -> diffusers' single-file converters."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
    create_diffusers_clip_model_from_ldm,
)
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from tests.ldm_export import (
    SD2_OPEN_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    SDXL_REFINER_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    clip_to_ldm,
    clip_to_ldm_sd1,
    ldm_shapes,
    open_clip_to_ldm,
    pipeline_to_ldm,
    save_single_file,
    unet_to_ldm,
    vae_to_ldm,
)

Tensors = Mapping[str, torch.Tensor]

# ---------------------------------------------------------------------------- configs

_SD1_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}
_SDXL_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}
TINY_UNET: dict[str, dict[str, Any]] = {
    "sd1": {**_SD1_BLOCKS, "layers_per_block": 1},
    "sd1-2-layers": {**_SD1_BLOCKS, "layers_per_block": 2},
    # 4 levels x 2 layers: 12 input blocks, so input_blocks.1 vs input_blocks.10 must not clash.
    "4-levels": {
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D") * 2,
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D") * 2,
        "block_out_channels": (8, 8, 8, 8),
        "norm_num_groups": 8,
        "layers_per_block": 2,
        "cross_attention_dim": 16,
        "attention_head_dim": 4,
    },
    "sdxl": {
        **_SDXL_BLOCKS,
        "layers_per_block": 2,
        "transformer_layers_per_block": [1, 2],
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "cross_attention_dim": 64,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 8 * 6 + 16,
    },
    "class-timestep": {**_SD1_BLOCKS, "class_embed_type": "timestep"},
    "class-projection": {
        **_SD1_BLOCKS,
        "class_embed_type": "projection",
        "projection_class_embeddings_input_dim": 12,
    },
    "num-class-embeds": {**_SD1_BLOCKS, "num_class_embeds": 10},
    "mid-resnet-only": {**_SD1_BLOCKS, "mid_block_type": "UNetMidBlock2D"},
    "no-mid": {**_SD1_BLOCKS, "mid_block_type": None},
}
TINY_VAE: dict[str, dict[str, Any]] = {
    "2-levels": {"block_out_channels": (32, 64)},
    "3-levels-2-layers": {
        "block_out_channels": (8, 16, 16),
        "norm_num_groups": 8,
        "layers_per_block": 2,
    },
}

# Real-size configs (SD1.5 / SDXL base / SD VAE), only ever built on the meta device.
SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
}

# ---------------------------------------------------------------------------- builders


def tiny_unet(**overrides: Any) -> UNet2DConditionModel:
    """A seeded tiny UNet; ``overrides`` replace the SD1-like defaults."""
    config = {
        "block_out_channels": (32, 64),
        "sample_size": 32,
        "cross_attention_dim": 32,
        "attention_head_dim": 8,
        **overrides,
    }
    torch.manual_seed(0)
    return UNet2DConditionModel(**config)


def tiny_vae(**overrides: Any) -> AutoencoderKL:
    """A seeded tiny AutoencoderKL."""
    config = {
        "block_out_channels": (32, 64),
        "latent_channels": 4,
        "sample_size": 32,
        **overrides,
    }
    n = len(config["block_out_channels"])
    config.setdefault("down_block_types", ("DownEncoderBlock2D",) * n)
    config.setdefault("up_block_types", ("UpDecoderBlock2D",) * n)
    torch.manual_seed(0)
    return AutoencoderKL(**config)


def clip_config(hidden: int = 32, layers: int = 3, **overrides: Any) -> CLIPTextConfig:
    """A tiny CLIP text config with the real vocabulary and context sizes."""
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        **overrides,
    }
    return CLIPTextConfig(**config)


def tiny_clip(cls: type = CLIPTextModel, **overrides: Any) -> torch.nn.Module:
    """A seeded tiny CLIP text model of class ``cls``."""
    torch.manual_seed(0)
    return cls(clip_config(**overrides))


def tiny_sd_pipeline(open_clip: bool) -> StableDiffusionPipeline:
    """SD1 (OpenAI CLIP) or SD2-like (OpenCLIP, gelu) tiny pipeline, without a tokenizer."""
    te = tiny_clip(hidden_act="gelu") if open_clip else tiny_clip()
    return StableDiffusionPipeline(
        vae=tiny_vae(),
        text_encoder=te,
        tokenizer=None,
        unet=tiny_unet(**TINY_UNET["sd1"]),
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(te1_hidden: int = 32, te2_hidden: int = 48) -> StableDiffusionXLPipeline:
    """Tiny SDXL base pipeline; text_encoder_2's projection (16) differs from its width."""
    unet = tiny_unet(
        **{**TINY_UNET["sdxl"], "cross_attention_dim": te1_hidden + te2_hidden},
    )
    te2 = tiny_clip(CLIPTextModelWithProjection, hidden=te2_hidden, projection_dim=16)
    return StableDiffusionXLPipeline(
        vae=tiny_vae(),
        text_encoder=tiny_clip(hidden=te1_hidden),
        text_encoder_2=te2,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
    )


def tiny_sdxl_refiner_pipeline() -> StableDiffusionXLImg2ImgPipeline:
    """Tiny SDXL refiner: OpenCLIP text_encoder_2 only, aesthetic-score time ids (5 of them)."""
    unet = tiny_unet(
        **{
            **TINY_UNET["sdxl"],
            "cross_attention_dim": 48,
            "projection_class_embeddings_input_dim": 8 * 5 + 16,
        },
    )
    te2 = tiny_clip(CLIPTextModelWithProjection, hidden=48, projection_dim=16)
    return StableDiffusionXLImg2ImgPipeline(
        vae=tiny_vae(),
        text_encoder=None,
        text_encoder_2=te2,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(steps_offset=1),
        requires_aesthetics_score=True,
    )


# ---------------------------------------------------------------------------- helpers


def assert_same_tensors(actual: Tensors, expected: Tensors) -> None:
    """Same key set and bit-identical tensors."""
    assert set(actual) == set(expected), set(actual) ^ set(expected)
    unequal = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not unequal, unequal[:5]


def assert_same_shapes(actual: Tensors, expected: Tensors) -> None:
    """Same key set and shapes (meta tensors)."""
    assert ldm_shapes(actual) == ldm_shapes(expected)


def with_text_model_prefix(state_dict: Tensors) -> dict[str, torch.Tensor]:
    """A flattened ``CLIPTextModel`` state dict (transformers >= 5.6) under ``text_model.``."""
    keep = ("text_model.", "text_projection.")
    return {k if k.startswith(keep) else f"text_model.{k}": v for k, v in state_dict.items()}


def load_clip_like_diffusers(
    cls: type, checkpoint: Tensors, config: CLIPTextConfig, tmp_path: Path
):
    """Load a text encoder from ``checkpoint`` the way ``from_single_file`` does."""
    config.save_pretrained(tmp_path)
    return create_diffusers_clip_model_from_ldm(
        cls, dict(checkpoint), config=str(tmp_path), local_files_only=True
    )


# ---------------------------------------------------------------------------- tiny round trips


@pytest.mark.parametrize("name", list(TINY_UNET))
def test_unet_round_trips_through_diffusers(name: str) -> None:
    unet = tiny_unet(**TINY_UNET[name])
    state_dict = unet.state_dict()
    ldm = unet_to_ldm(state_dict, unet.config)
    assert all(k.startswith(UNET_PREFIX) for k in ldm)
    assert_same_tensors(convert_ldm_unet_checkpoint(ldm, unet.config), state_dict)


def test_unet_upsampler_slot_follows_attention() -> None:
    ldm = unet_to_ldm(tiny_unet(**TINY_UNET["sdxl"]).state_dict(), TINY_UNET["sdxl"])
    # Up block 0 has attention: resnet .0, attention .1, upsampler .2 on its last output block.
    assert f"{UNET_PREFIX}output_blocks.2.2.conv.weight" in ldm
    assert f"{UNET_PREFIX}output_blocks.2.1.transformer_blocks.1.attn2.to_k.weight" in ldm
    assert f"{UNET_PREFIX}label_emb.0.0.weight" in ldm
    sd1 = unet_to_ldm(tiny_unet(**TINY_UNET["sd1"]).state_dict(), TINY_UNET["sd1"])
    assert f"{UNET_PREFIX}output_blocks.1.1.conv.weight" in sd1  # no attention: slot 1


@pytest.mark.parametrize("name", list(TINY_VAE))
def test_vae_round_trips_through_diffusers(name: str) -> None:
    vae = tiny_vae(**TINY_VAE[name])
    state_dict = vae.state_dict()
    ldm = vae_to_ldm(state_dict, vae.config)
    width = vae.config.block_out_channels[-1]
    for part in ("encoder", "decoder"):
        for proj in ("q", "k", "v", "proj_out"):
            key = f"first_stage_model.{part}.mid.attn_1.{proj}.weight"
            assert ldm[key].shape == (width, width, 1, 1)
    assert_same_tensors(convert_ldm_vae_checkpoint(ldm, vae.config), state_dict)


def test_sd1_clip_round_trips_through_diffusers(tmp_path: Path) -> None:
    te = tiny_clip(layers=5)
    state_dict = te.state_dict()
    ldm = clip_to_ldm_sd1(state_dict)
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in ldm
    assert_same_tensors(convert_ldm_clip_checkpoint(ldm), with_text_model_prefix(state_dict))
    loaded = load_clip_like_diffusers(CLIPTextModel, ldm, te.config, tmp_path)
    assert_same_tensors(loaded.state_dict(), state_dict)


@pytest.mark.parametrize(
    ("cls", "prefix"),
    [
        (CLIPTextModel, SD2_OPEN_CLIP_PREFIX),
        (CLIPTextModelWithProjection, SDXL_OPEN_CLIP_PREFIX),
        (CLIPTextModelWithProjection, SDXL_REFINER_OPEN_CLIP_PREFIX),
    ],
)
def test_open_clip_round_trips_through_diffusers(cls: type, prefix: str, tmp_path: Path) -> None:
    te = tiny_clip(cls, layers=2, hidden_act="gelu", projection_dim=16)
    state_dict = te.state_dict()
    ldm = open_clip_to_ldm(state_dict, prefix)
    back = convert_open_clip_checkpoint(te, ldm, prefix=prefix)
    assert_same_tensors(back, with_text_model_prefix(state_dict))
    loaded = load_clip_like_diffusers(cls, ldm, te.config, tmp_path)
    assert_same_tensors(loaded.state_dict(), state_dict)


def test_open_clip_fuses_qkv_and_transposes_projection() -> None:
    te = tiny_clip(CLIPTextModelWithProjection, layers=1, projection_dim=16)
    sd = te.state_dict()
    ldm = open_clip_to_ldm(sd, "m.")
    attn = "text_model.encoder.layers.0.self_attn"
    qkv = torch.cat([sd[f"{attn}.{p}_proj.weight"] for p in "qkv"])  # [3 * 32, 32]
    assert torch.equal(ldm["m.transformer.resblocks.0.attn.in_proj_weight"], qkv)
    assert ldm["m.text_projection"].shape == (32, 16)  # [width, projection]
    assert torch.equal(ldm["m.text_projection"], sd["text_projection.weight"].T)


def test_unknown_keys_are_rejected() -> None:
    unet = tiny_unet(**TINY_UNET["sd1"])
    with pytest.raises(KeyError, match="encoder_hid_proj"):
        unet_to_ldm({**unet.state_dict(), "encoder_hid_proj.weight": torch.zeros(1)}, unet.config)
    with pytest.raises(KeyError, match="q/k/v incomplete"):
        sd = tiny_clip(layers=1).state_dict()
        del sd["encoder.layers.0.self_attn.v_proj.bias"]
        open_clip_to_ldm(sd, "m.")


# ---------------------------------------------------------------------------- real sizes (meta)


# (config, key count, well-known LDM keys and their shapes)
REAL_UNETS = {
    "sd15": (
        SD15_UNET,
        686,
        {
            "input_blocks.0.0.weight": (320, 4, 3, 3),
            "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
            "input_blocks.3.0.op.weight": (320, 320, 3, 3),
            "input_blocks.11.0.in_layers.2.weight": (1280, 1280, 3, 3),
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
            "middle_block.2.emb_layers.1.weight": (1280, 1280),
            "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
            "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
            "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
            "output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
            "time_embed.0.weight": (1280, 320),
            "out.2.weight": (4, 320, 3, 3),
        },
    ),
    "sdxl": (
        SDXL_UNET,
        1680,
        {
            "label_emb.0.0.weight": (1280, 2816),
            "input_blocks.4.1.proj_in.weight": (640, 640),
            "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight": (640, 2048),
            "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
            "middle_block.1.transformer_blocks.9.attn1.to_q.weight": (1280, 1280),
            "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
            "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
            "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        },
    ),
}


@pytest.mark.parametrize("name", list(REAL_UNETS))
def test_real_size_unet_layout_on_meta(name: str) -> None:
    config, count, known = REAL_UNETS[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    state_dict = unet.state_dict()
    ldm = unet_to_ldm(state_dict, unet.config)
    assert len(ldm) == count
    shapes = ldm_shapes(ldm)
    assert {k: shapes[UNET_PREFIX + k] for k in known} == known
    assert_same_shapes(convert_ldm_unet_checkpoint(ldm, unet.config), state_dict)


def test_real_size_vae_and_text_encoders_on_meta() -> None:
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE)
        clip_l = CLIPTextModel(clip_config(768, 12, intermediate_size=3072, num_attention_heads=12))
        clip_h = CLIPTextModel(  # SD2: OpenCLIP ViT-H with the last of 24 blocks dropped
            clip_config(1024, 23, intermediate_size=4096, num_attention_heads=16, hidden_act="gelu")
        )
        clip_g = CLIPTextModelWithProjection(
            clip_config(
                1280, 32, intermediate_size=5120, num_attention_heads=20, projection_dim=1280
            )
        )
    vae_ldm = vae_to_ldm(vae.state_dict(), vae.config)
    assert len(vae_ldm) == 248
    assert vae_ldm["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert_same_shapes(convert_ldm_vae_checkpoint(vae_ldm, vae.config), vae.state_dict())

    l_ldm = clip_to_ldm(clip_l.state_dict(), "conditioner.embedders.0.transformer.")
    assert len(l_ldm) == 196
    assert_same_shapes(
        convert_ldm_clip_checkpoint(l_ldm), with_text_model_prefix(clip_l.state_dict())
    )

    for model, prefix, count in (
        (clip_h, SD2_OPEN_CLIP_PREFIX, 23 * 12 + 4),
        (clip_g, SDXL_OPEN_CLIP_PREFIX, 32 * 12 + 5),
    ):
        ldm = open_clip_to_ldm(model.state_dict(), prefix)
        assert len(ldm) == count
        back = convert_open_clip_checkpoint(model, ldm, prefix=prefix)
        assert_same_shapes(back, with_text_model_prefix(model.state_dict()))
    assert ldm[f"{SDXL_OPEN_CLIP_PREFIX}transformer.resblocks.31.attn.in_proj_weight"].shape == (
        3840,
        1280,
    )


# ---------------------------------------------------------------------------- whole pipelines


def test_pipeline_to_ldm_validates_layout() -> None:
    with pytest.raises(ValueError, match="'hf' or 'open_clip'"):
        pipeline_to_ldm(tiny_sd_pipeline(open_clip=False))
    with pytest.raises(ValueError, match="fixed for SDXL"):
        pipeline_to_ldm(tiny_sdxl_pipeline(), text_encoder_layout="hf")


def test_pipeline_to_ldm_key_sets() -> None:
    sd1 = pipeline_to_ldm(tiny_sd_pipeline(open_clip=False), text_encoder_layout="hf")
    sd2 = pipeline_to_ldm(tiny_sd_pipeline(open_clip=True), text_encoder_layout="open_clip")
    xl = pipeline_to_ldm(tiny_sdxl_pipeline())

    def heads(state_dict: Tensors, depth: int) -> set[str]:
        return {".".join(k.split(".")[:depth]) for k in state_dict}

    assert heads(sd1, 2) == {
        "model.diffusion_model",
        "first_stage_model.encoder",
        "first_stage_model.decoder",
        "first_stage_model.quant_conv",
        "first_stage_model.post_quant_conv",
        "cond_stage_model.transformer",
    }
    assert heads(sd2, 3) - heads(sd1, 3) == {"cond_stage_model.model.transformer"} | {
        f"cond_stage_model.model.{name}"
        for name in ("token_embedding", "positional_embedding", "ln_final")
    }
    assert {h for h in heads(xl, 3) if h.startswith("conditioner.")} == {
        "conditioner.embedders.0",
        "conditioner.embedders.1",
    }


@pytest.mark.parametrize(
    ("kind", "layout"),
    [("sd1", "hf"), ("sd2", "open_clip"), ("sdxl", None), ("sdxl-refiner", None)],
)
def test_save_single_file_loads_back_with_from_single_file(
    kind: str, layout: str | None, tmp_path: Path
) -> None:
    if kind == "sdxl":
        pipe, cls = tiny_sdxl_pipeline(), StableDiffusionXLPipeline
    elif kind == "sdxl-refiner":
        pipe, cls = tiny_sdxl_refiner_pipeline(), StableDiffusionXLImg2ImgPipeline
    else:
        pipe, cls = tiny_sd_pipeline(open_clip=kind == "sd2"), StableDiffusionPipeline
    pipe.save_pretrained(tmp_path / "config")
    path = tmp_path / "tiny.safetensors"
    written = save_single_file(pipe, path, text_encoder_layout=layout)
    assert set(load_file(path)) == set(written)

    # The config folder has no tokenizer; say so, or diffusers 0.42.1 fails building its own
    # "missing modules" error (a set minus a list -> TypeError) for StableDiffusionPipeline.
    loaded = cls.from_single_file(
        str(path), config=str(tmp_path / "config"), local_files_only=True, tokenizer=None
    )
    names = [n for n in ("unet", "vae", "text_encoder", "text_encoder_2") if getattr(pipe, n, None)]
    for name in names:
        assert_same_tensors(getattr(loaded, name).state_dict(), getattr(pipe, name).state_dict())


def test_save_single_file_casts_and_rejects_meta(tmp_path: Path) -> None:
    pipe = tiny_sd_pipeline(open_clip=False)
    save_single_file(
        pipe, tmp_path / "half.safetensors", text_encoder_layout="hf", dtype=torch.float16
    )
    assert {t.dtype for t in load_file(tmp_path / "half.safetensors").values()} == {torch.float16}
    pipe.vae.to("meta")
    with pytest.raises(ValueError, match="meta"):
        save_single_file(pipe, tmp_path / "meta.safetensors", text_encoder_layout="hf")
