"""Export diffusers Stable Diffusion components to the original single-file (LDM / SGM) layout.

The inverse of the ``convert_ldm_*`` / ``convert_open_clip_checkpoint`` functions in
``diffusers.loaders.single_file_utils``, used to build tiny random single-file checkpoints for
tests. The layout is derived from each model's config and parameter names (any number of blocks,
layers per block, attention or not per block), not from SD1/SDXL constants. Converters only
rename, reshape, transpose and concatenate, so meta-device state dicts pass through unchanged in
everything but names and shapes.

Example::

    sd = pipeline_to_ldm(pipe, text_encoder_layout="hf")   # SD1
    save_single_file(pipe, tmp_path / "tiny.safetensors", text_encoder_layout="hf")
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from safetensors.torch import save_file

StateDict = dict[str, torch.Tensor]
TextEncoderLayout = Literal["hf", "open_clip"]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SD2_OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."
SDXL_REFINER_OPEN_CLIP_PREFIX = "conditioner.embedders.0.model."

# Sub-module names inside one block: (diffusers name, LDM name).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}
# LDM VAE attention projections are 1x1 convs: [C, C, 1, 1] where diffusers has Linear [C, C].
_VAE_CONV_1X1 = ("q.weight", "k.weight", "v.weight", "proj_out.weight")
_OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_OPEN_CLIP_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}


@dataclass(frozen=True)
class _Route:
    """One diffusers module prefix, its LDM prefix and the renames of its direct children."""

    src: str
    dst: str
    children: Mapping[str, str] | None = None

    def rename(self, key: str) -> str:
        """LDM name of diffusers ``key`` (which starts with ``self.src``)."""
        rest = key[len(self.src) :]
        if self.children is None:
            return self.dst + rest
        for old, new in self.children.items():
            if rest.startswith(old + "."):
                return self.dst + new + rest[len(old) :]
        raise KeyError(f"no LDM name for {key!r} (children of {self.src!r}: {list(self.children)})")


def _indices(keys: Iterable[str], prefix: str) -> list[int]:
    """Sorted distinct N of keys starting with ``prefix + 'N.'``; checks they are 0..n-1."""
    found = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"non-contiguous indices under {prefix!r}: {sorted(found)}")
    return sorted(found)


def _has(keys: Iterable[str], prefix: str) -> bool:
    """Whether any key starts with ``prefix``."""
    return any(key.startswith(prefix) for key in keys)


def _apply_routes(state_dict: Mapping[str, torch.Tensor], routes: list[_Route]) -> StateDict:
    """Rename every key by its longest matching route; every key must match exactly one name."""
    routes = sorted(routes, key=lambda r: len(r.src), reverse=True)
    out: StateDict = {}
    for key, value in state_dict.items():
        route = next((r for r in routes if key.startswith(r.src)), None)
        if route is None:
            raise KeyError(f"no LDM name for diffusers key {key!r}")
        new_key = route.rename(key)
        if new_key in out:
            raise KeyError(f"two diffusers keys map to LDM key {new_key!r}")
        out[new_key] = value
    return out


def _prefixed(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """Copy of ``state_dict`` with ``prefix`` before every key."""
    return {prefix + key: value for key, value in state_dict.items()}


def _unet_routes(keys: list[str], config: Mapping[str, Any]) -> list[_Route]:
    """Routes from diffusers UNet2DConditionModel module prefixes to LDM UNetModel ones."""
    routes = [
        _Route("conv_in.", "input_blocks.0.0."),
        _Route("time_embedding.linear_1.", "time_embed.0."),
        _Route("time_embedding.linear_2.", "time_embed.2."),
        _Route("conv_norm_out.", "out.0."),
        _Route("conv_out.", "out.2."),
        # SGM puts class (timestep/projection) and SDXL text_time embeddings in label_emb.0.
        _Route("class_embedding.linear_1.", "label_emb.0.0."),
        _Route("class_embedding.linear_2.", "label_emb.0.2."),
        _Route("add_embedding.linear_1.", "label_emb.0.0."),
        _Route("add_embedding.linear_2.", "label_emb.0.2."),
    ]
    if config.get("num_class_embeds") is not None:  # nn.Embedding (x4 upscaler)
        routes.append(_Route("class_embedding.", "label_emb."))

    # 1. Down blocks: each resnet (+ its attention) is one input block, a downsampler another.
    ldm_index = 1
    for i in range(len(config["down_block_types"])):
        block = f"down_blocks.{i}."
        for j in _indices(keys, block + "resnets."):
            routes.append(
                _Route(f"{block}resnets.{j}.", f"input_blocks.{ldm_index}.0.", _UNET_RESNET)
            )
            if _has(keys, f"{block}attentions.{j}."):
                routes.append(_Route(f"{block}attentions.{j}.", f"input_blocks.{ldm_index}.1."))
            ldm_index += 1
        if _has(keys, block + "downsamplers.0."):
            routes.append(_Route(block + "downsamplers.0.conv.", f"input_blocks.{ldm_index}.0.op."))
            ldm_index += 1

    # 2. Middle block: resnet, attention, resnet, ... in one flat sequence.
    n_mid_resnets = len(_indices(keys, "mid_block.resnets."))
    ldm_index = 0
    for j in range(n_mid_resnets):
        routes.append(_Route(f"mid_block.resnets.{j}.", f"middle_block.{ldm_index}.", _UNET_RESNET))
        ldm_index += 1
        if _has(keys, f"mid_block.attentions.{j}."):
            routes.append(_Route(f"mid_block.attentions.{j}.", f"middle_block.{ldm_index}."))
            ldm_index += 1

    # 3. Up blocks: resnet (+ attention) per output block; the upsampler joins the block's last.
    ldm_index = 0
    for i in range(len(config.get("up_block_types", ()))):  # a ControlNet has none
        block = f"up_blocks.{i}."
        layers = _indices(keys, block + "resnets.")
        for j in layers:
            routes.append(
                _Route(f"{block}resnets.{j}.", f"output_blocks.{ldm_index}.0.", _UNET_RESNET)
            )
            slot = 1
            if _has(keys, f"{block}attentions.{j}."):
                routes.append(_Route(f"{block}attentions.{j}.", f"output_blocks.{ldm_index}.1."))
                slot = 2
            if j == layers[-1] and _has(keys, block + "upsamplers.0."):
                routes.append(_Route(block + "upsamplers.0.", f"output_blocks.{ldm_index}.{slot}."))
            ldm_index += 1
    return routes


def unet_to_ldm(
    unet_state_dict: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any]
) -> StateDict:
    """UNet2DConditionModel state dict -> LDM/SGM keys under ``model.diffusion_model.``."""
    keys = list(unet_state_dict)
    converted = _apply_routes(unet_state_dict, _unet_routes(keys, unet_config))
    return _prefixed(converted, UNET_PREFIX)


def controlnet_to_ldm(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any], prefix: str = ""
) -> StateDict:
    """ControlNetModel state dict -> the original ControlNet layout (`cldm`): the UNet
    encoder's names, `zero_convs.N.0`, `middle_block_out.0` and `input_hint_block.N`
    (convs at even indices, SiLUs between), under `prefix` (`control_model.` for the
    files made with the original training code)."""
    keys = list(state_dict)
    routes = _unet_routes(keys, config)
    for i in _indices(keys, "controlnet_down_blocks."):
        routes.append(_Route(f"controlnet_down_blocks.{i}.", f"zero_convs.{i}.0."))
    routes.append(_Route("controlnet_mid_block.", "middle_block_out.0."))
    routes.append(_Route("controlnet_cond_embedding.conv_in.", "input_hint_block.0."))
    blocks = _indices(keys, "controlnet_cond_embedding.blocks.")
    for k in blocks:
        routes.append(
            _Route(f"controlnet_cond_embedding.blocks.{k}.", f"input_hint_block.{2 * (k + 1)}.")
        )
    last = 2 * (len(blocks) + 1)
    routes.append(_Route("controlnet_cond_embedding.conv_out.", f"input_hint_block.{last}."))
    return _prefixed(_apply_routes(state_dict, routes), prefix)


def _vae_routes(keys: list[str], config: Mapping[str, Any]) -> list[_Route]:
    """Routes from diffusers AutoencoderKL module prefixes to LDM AutoencoderKL ones."""
    routes = [
        _Route("encoder.conv_in.", "encoder.conv_in."),
        _Route("encoder.conv_out.", "encoder.conv_out."),
        _Route("encoder.conv_norm_out.", "encoder.norm_out."),
        _Route("decoder.conv_in.", "decoder.conv_in."),
        _Route("decoder.conv_out.", "decoder.conv_out."),
        _Route("decoder.conv_norm_out.", "decoder.norm_out."),
        _Route("quant_conv.", "quant_conv."),
        _Route("post_quant_conv.", "post_quant_conv."),
    ]
    for part in ("encoder", "decoder"):
        for j in _indices(keys, f"{part}.mid_block.resnets."):
            routes.append(
                _Route(f"{part}.mid_block.resnets.{j}.", f"{part}.mid.block_{j + 1}.", _VAE_RESNET)
            )
        for j in _indices(keys, f"{part}.mid_block.attentions."):
            routes.append(
                _Route(
                    f"{part}.mid_block.attentions.{j}.", f"{part}.mid.attn_{j + 1}.", _VAE_ATTENTION
                )
            )

    for i in range(len(config["down_block_types"])):
        block = f"encoder.down_blocks.{i}."
        for j in _indices(keys, block + "resnets."):
            routes.append(
                _Route(f"{block}resnets.{j}.", f"encoder.down.{i}.block.{j}.", _VAE_RESNET)
            )
        routes.append(_Route(block + "downsamplers.0.", f"encoder.down.{i}.downsample."))

    # LDM numbers decoder levels from the lowest resolution up, i.e. reversed.
    n_up = len(config["up_block_types"])
    for i in range(n_up):
        block, level = f"decoder.up_blocks.{i}.", n_up - 1 - i
        for j in _indices(keys, block + "resnets."):
            routes.append(
                _Route(f"{block}resnets.{j}.", f"decoder.up.{level}.block.{j}.", _VAE_RESNET)
            )
        routes.append(_Route(block + "upsamplers.0.", f"decoder.up.{level}.upsample."))
    return routes


def vae_to_ldm(
    vae_state_dict: Mapping[str, torch.Tensor], vae_config: Mapping[str, Any]
) -> StateDict:
    """AutoencoderKL state dict -> LDM keys under ``first_stage_model.`` (attention: 1x1 convs)."""
    converted = _apply_routes(vae_state_dict, _vae_routes(list(vae_state_dict), vae_config))
    for key, value in converted.items():
        if ".mid.attn_" in key and key.endswith(_VAE_CONV_1X1) and value.ndim == 2:
            converted[key] = value.reshape(*value.shape, 1, 1)  # [C, C] -> [C, C, 1, 1]
    return _prefixed(converted, VAE_PREFIX)


def _hf_clip_names(te_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Keys as ``CLIPTextModel`` had them before transformers 5.6 flattened it (``text_model.``)."""
    return {
        key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key: value
        for key, value in te_state_dict.items()
    }


def clip_to_ldm(
    te_state_dict: Mapping[str, torch.Tensor], prefix: str = SD1_CLIP_PREFIX
) -> StateDict:
    """HF CLIP text encoder -> HF names under ``prefix`` (SD1 and SDXL's CLIP-L keep them)."""
    return _prefixed(_hf_clip_names(te_state_dict), prefix)


def clip_to_ldm_sd1(te_state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """SD1 text encoder -> keys under ``cond_stage_model.transformer.``."""
    return clip_to_ldm(te_state_dict, SD1_CLIP_PREFIX)


def open_clip_to_ldm(te_state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """HF CLIP text encoder -> OpenCLIP layout under ``prefix`` (q/k/v fused, projection ``.T``).

    SD2 uses ``cond_stage_model.model.``, SDXL's text_encoder_2 ``conditioner.embedders.1.model.``.
    Exports exactly the layers the model has; real SD2 files also carry a 24th block (and
    ``text_projection``) that diffusers ignores by name (``resblocks.23``).
    """
    state_dict = _hf_clip_names(te_state_dict)
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    layer_prefix = "text_model.encoder.layers."
    for key, value in state_dict.items():
        if key.endswith("position_ids"):
            continue  # a buffer, not part of the OpenCLIP state dict
        if key in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()  # Linear [proj, width] -> [width, proj]
        elif key.startswith(layer_prefix):
            index, rest = key[len(layer_prefix) :].split(".", 1)
            block = f"transformer.resblocks.{index}."
            name, kind = rest.rsplit(".", 1)
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((int(index), kind), {})[name[len("self_attn.") :][0]] = value
            elif name in _OPEN_CLIP_LAYER:
                out[f"{block}{_OPEN_CLIP_LAYER[name]}.{kind}"] = value
            else:
                raise KeyError(f"no OpenCLIP name for {key!r}")
        else:
            raise KeyError(f"no OpenCLIP name for {key!r}")
    for (index, kind), parts in sorted(qkv.items()):
        if sorted(parts) != ["k", "q", "v"]:
            raise KeyError(f"layer {index} {kind}: q/k/v incomplete ({sorted(parts)})")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]])  # [3 * width, ...]
        out[f"transformer.resblocks.{index}.attn.in_proj_{kind}"] = fused
    return _prefixed(out, prefix)


def _model_parts(model: torch.nn.Module) -> tuple[StateDict, Mapping[str, Any]]:
    """(state dict, config) of a diffusers model."""
    return model.state_dict(), model.config


def pipeline_to_ldm(pipe: Any, text_encoder_layout: TextEncoderLayout | None = None) -> StateDict:
    """Whole pipeline -> one original-layout state dict.

    Args:
        pipe: a StableDiffusionPipeline (SD1/SD2) or StableDiffusionXLPipeline (base, or
            refiner: no ``text_encoder``, ``text_encoder_2`` under ``conditioner.embedders.0``).
        text_encoder_layout: for SD1/SD2 only, required: ``"hf"`` (SD1, OpenAI CLIP names under
            ``cond_stage_model.transformer.``) or ``"open_clip"`` (SD2, under
            ``cond_stage_model.model.``). Must be None for SDXL, whose layout is fixed.

    Raises:
        ValueError: a bad ``text_encoder_layout``. (SDXL text encoders of equal width export
            fine; diffusers' ``from_single_file`` then mis-loads them, lorastack's loader not.)

    Returns:
        ``{ldm_key: tensor}``; tensors may be views of the models' parameters.
    """
    is_sdxl = getattr(pipe, "text_encoder_2", None) is not None
    if is_sdxl and text_encoder_layout is not None:
        raise ValueError("text_encoder_layout is fixed for SDXL; pass None")
    if not is_sdxl and text_encoder_layout not in ("hf", "open_clip"):
        raise ValueError(
            f"text_encoder_layout must be 'hf' or 'open_clip', not {text_encoder_layout!r}"
        )
    out = {**unet_to_ldm(*_model_parts(pipe.unet)), **vae_to_ldm(*_model_parts(pipe.vae))}
    if is_sdxl:
        te2 = pipe.text_encoder_2.state_dict()
        if pipe.text_encoder is None:
            out.update(open_clip_to_ldm(te2, SDXL_REFINER_OPEN_CLIP_PREFIX))
        else:
            out.update(clip_to_ldm(pipe.text_encoder.state_dict(), SDXL_CLIP_PREFIX))
            out.update(open_clip_to_ldm(te2, SDXL_OPEN_CLIP_PREFIX))
    elif text_encoder_layout == "hf":
        out.update(clip_to_ldm(pipe.text_encoder.state_dict(), SD1_CLIP_PREFIX))
    else:
        out.update(open_clip_to_ldm(pipe.text_encoder.state_dict(), SD2_OPEN_CLIP_PREFIX))
    return out


def ldm_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """``{key: shape}`` without touching data (works for meta tensors)."""
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def save_single_file(
    pipe: Any,
    path: str | os.PathLike[str],
    *,
    text_encoder_layout: TextEncoderLayout | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> StateDict:
    """Write ``pipeline_to_ldm(pipe, text_encoder_layout)`` to a ``.safetensors`` file.

    Args:
        pipe: see :func:`pipeline_to_ldm`; its tensors must be real (not meta).
        path: destination file.
        text_encoder_layout: see :func:`pipeline_to_ldm`.
        dtype: cast floating tensors to this dtype (e.g. ``torch.float16``).
        metadata: safetensors header metadata.

    Returns:
        The state dict written (CPU, contiguous).
    """
    state_dict = {}
    for key, value in pipeline_to_ldm(pipe, text_encoder_layout).items():
        if value.is_meta:
            raise ValueError(f"{key} is on the meta device; only real tensors can be saved")
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        state_dict[key] = value.detach().to("cpu").contiguous()
    save_file(state_dict, os.fspath(path), metadata=metadata)
    return state_dict
