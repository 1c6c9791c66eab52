"""Real-size SD1.5 / SD2 / SDXL key layouts, built on the meta device (no memory used):
detected as the right family and loaded strictly by the stock configs."""

from __future__ import annotations

import pytest
import torch

from pipelines.architecture import Architecture, detect_architecture
from pipelines.loading import (
    CONFIGS_DIR,
    _build_text_encoder,
    _empty_module,
    modules_from_checkpoint,
    read_model_spec,
)
from tests.ldm_export import clip_to_ldm, ldm_shapes, open_clip_to_ldm, unet_to_ldm, vae_to_ldm

CASES = [
    ("v1-inference.yaml", Architecture.SD1, 768, 686),
    ("v1-inpainting-inference.yaml", Architecture.SD1_INPAINT, 768, 686),
    ("v2-inference.yaml", Architecture.SD2, 1024, 686),
    ("v2-inpainting-inference.yaml", Architecture.SD2_INPAINT, 1024, 686),
    ("sd_xl_base.yaml", Architecture.SDXL, 2048, 1680),
    ("sd_xl_inpaint.yaml", Architecture.SDXL_INPAINT, 2048, 1680),
    ("sd_xl_refiner.yaml", Architecture.SDXL_REFINER, 1280, None),
]


def _meta_checkpoint(yaml_name: str) -> tuple[dict[str, torch.Tensor], object]:
    """An original-layout state dict of real shapes, all on the meta device."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec = read_model_spec(CONFIGS_DIR / yaml_name)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.unet_config)
        vae = AutoencoderKL(**spec.vae_config)
        encoders = {e.component: (e, _build_text_encoder(e)) for e in spec.text_encoders}
    state = {
        **unet_to_ldm(unet.state_dict(), unet.config),
        **vae_to_ldm(vae.state_dict(), vae.config),
    }
    for encoder, model in encoders.values():
        weights = model.state_dict()
        if encoder.layout == "hf":
            state.update(clip_to_ldm(weights, encoder.ldm_prefix))
        else:
            state.update(open_clip_to_ldm(weights, encoder.ldm_prefix))
    return state, spec


@pytest.mark.parametrize(("yaml_name", "arch", "context", "unet_keys"), CASES)
def test_real_size_layout(
    yaml_name: str, arch: Architecture, context: int, unet_keys: int | None
) -> None:
    state, spec = _meta_checkpoint(yaml_name)
    shapes = ldm_shapes(state)
    if unet_keys is not None:
        assert sum(k.startswith("model.diffusion_model.") for k in shapes) == unet_keys
    detection = detect_architecture(shapes, source=yaml_name)
    assert detection.architecture is arch
    assert detection.context_dim == context
    assert detection.v_ambiguous is (arch is Architecture.SD2)
    modules = modules_from_checkpoint(spec, state, yaml_name)  # strict: raises on mismatch
    assert modules["unet"].config.cross_attention_dim == context
    if arch is Architecture.SDXL_REFINER:
        assert set(modules) == {"unet", "vae", "text_encoder_2"}
    elif arch.family == "SDXL":
        assert modules["unet"].config.addition_time_embed_dim == 256
        assert modules["text_encoder_2"].config.hidden_size == 1280
        assert spec.vae_config["scaling_factor"] == pytest.approx(0.13025)


def test_sd2_v_yaml_sets_v_prediction() -> None:
    spec = read_model_spec(CONFIGS_DIR / "v2-inference-v.yaml")
    assert spec.architecture is Architecture.SD2_V
    assert spec.scheduler_config["prediction_type"] == "v_prediction"
    assert (
        read_model_spec(CONFIGS_DIR / "v2-inference.yaml").scheduler_config["prediction_type"]
        == "epsilon"
    )


def test_empty_module_keeps_buffers_real() -> None:
    spec = read_model_spec(CONFIGS_DIR / "v1-inference.yaml")
    encoder = _empty_module(lambda: _build_text_encoder(spec.text_encoders[0]))
    assert all(not b.is_meta for b in encoder.buffers())
    assert all(p.is_meta for p in encoder.parameters())


def test_refiner_loads_as_the_img2img_pipeline() -> None:
    """A refiner is loaded (to serve as a refiner or for img2img); txt2img on it is
    refused by the service (tests/test_refiner.py)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    from pipelines.loading import pipeline_class_for

    assert pipeline_class_for(Architecture.SDXL_REFINER) is StableDiffusionXLImg2ImgPipeline
