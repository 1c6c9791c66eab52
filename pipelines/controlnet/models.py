"""Loading ControlNet models offline: diffusers folders, diffusers-layout single files and
the original (LDM) single files (sd-webui-controlnet's `control_v11p_sd15_canny.pth`,
`.safetensors`), all as diffusers `ControlNetModel`s.

A ControlNet is a copy of its UNet's encoder, so its config is the UNet's: it is derived
from the loaded model's own UNet config (for single-file checkpoints that one comes from the
bundled yaml of its family, `pipelines/configs/`), with what the file itself says on top:
the transformer depth of each block (SDXL's full, mid and small ControlNets differ there), the
hint channels, and the hint encoder's widths. So nothing is fetched and a file that does not
fit the model is refused naming the difference. The original layout is converted by
diffusers' own single-file conversion (`convert_controlnet_checkpoint`); pickles are read
with `weights_only` (`pipelines.safeload`).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from pipelines.errors import UnusableFileError
from pipelines.folders.controlnets import (
    IPADAPTER_LAYOUT,
    LDM_PREFIX,
    ControlNetEntry,
    facts_from_shapes,
    file_state,
    weights_file,
)

log = logging.getLogger(__name__)

CACHE_SIZE = 2
"""sd-webui-controlnet's default `control_net_model_cache_size`: models kept loaded."""

_UNET_FIELDS = (
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
)
"""What `ControlNetModel.from_unet` takes from the UNet's config."""


def controlnet_config(
    unet_config: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    *,
    layout: str = "diffusers",
    name: str = "",
) -> dict[str, Any]:
    """The `ControlNetModel` config for a UNet config, adjusted to a file's tensors.

    Args:
        unet_config: the model's `UNet2DConditionModel` config.
        shapes: the file's tensor shapes (None: a plain copy of the UNet, as `from_unet`).
        layout: "diffusers" or "ldm" (the file's key names).
        name: the file name; sd-webui-controlnet pools the conditions of a `shuffle` model.
    """
    config = {key: unet_config[key] for key in _UNET_FIELDS if key in unet_config}
    config["in_channels"] = min(int(config.get("in_channels", 4)), 4)  # inpainting UNets: 9
    levels = len(config["block_out_channels"])
    layers = config.get("transformer_layers_per_block", 1)
    depths = list(layers) if isinstance(layers, list | tuple) else [layers] * levels
    types = ["CrossAttnDownBlock2D"] * levels
    base_types = list(unet_config.get("down_block_types", types))
    hint_channels = 3
    embedding = [16, 32, 96, 256]
    mid_depth: int | None = None
    if shapes is not None:
        keys = {key.removeprefix(LDM_PREFIX): shape for key, shape in shapes.items()}
        counted = _depths(keys, layout, levels, int(config["layers_per_block"]))
        if counted is not None:
            depths, mid_depth = counted
            base_types = ["CrossAttnDownBlock2D" if depth else "DownBlock2D" for depth in depths]
        hint_channels, embedding = _hint(keys, layout, hint_channels, embedding)
    config["down_block_types"] = base_types
    config["transformer_layers_per_block"] = [max(depth, 1) for depth in depths]
    if mid_depth == 0:
        config["mid_block_type"] = "UNetMidBlock2D"
    config["conditioning_channels"] = hint_channels
    config["conditioning_embedding_out_channels"] = embedding
    config["global_pool_conditions"] = "shuffle" in name.lower()
    return config


_LDM_ATTENTION = re.compile(r"^input_blocks\.(\d+)\.1\.transformer_blocks\.(\d+)\.")
_LDM_MID = re.compile(r"^middle_block\.1\.transformer_blocks\.(\d+)\.")
_DIFFUSERS_ATTENTION = re.compile(
    r"^down_blocks\.(\d+)\.attentions\.0\.transformer_blocks\.(\d+)\."
)
_DIFFUSERS_MID = re.compile(r"^mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")


def _depths(
    keys: Mapping[str, tuple[int, ...]], layout: str, levels: int, layers_per_block: int
) -> tuple[list[int], int] | None:
    """Transformer blocks per down level and in the middle block, counted from the keys."""
    depths = [0] * levels
    mid = 0
    found = False
    for key in keys:
        if layout == "ldm":
            hit = _LDM_ATTENTION.match(key)
            level = (int(hit.group(1)) - 1) // (layers_per_block + 1) if hit else None
            middle = _LDM_MID.match(key)
        else:
            hit = _DIFFUSERS_ATTENTION.match(key)
            level = int(hit.group(1)) if hit else None
            middle = _DIFFUSERS_MID.match(key)
        if hit and level is not None and 0 <= level < levels:
            depths[level] = max(depths[level], int(hit.group(2)) + 1)
            found = True
        if middle:
            mid = max(mid, int(middle.group(1)) + 1)
            found = True
    return (depths, mid) if found else None


def _hint(
    keys: Mapping[str, tuple[int, ...]], layout: str, channels: int, widths: list[int]
) -> tuple[int, list[int]]:
    """Hint channels and the hint encoder's widths."""
    if layout == "ldm":
        first = keys.get("input_hint_block.0.weight")
        convs = sorted(
            (int(key.split(".")[1]), shape)
            for key, shape in keys.items()
            if key.startswith("input_hint_block.") and key.endswith(".weight")
        )
        if first is None or len(convs) < 3:
            return channels, widths
        # conv_in, then pairs (same width, then down) and conv_out: widths of all but the last
        outs = [shape[0] for _, shape in convs[:-1]]
        return int(first[1]), sorted(set(outs), key=outs.index)
    first = keys.get("controlnet_cond_embedding.conv_in.weight")
    if first is None:
        return channels, widths
    outs = [int(first[0])]
    index = 1
    while f"controlnet_cond_embedding.blocks.{index}.weight" in keys:
        outs.append(int(keys[f"controlnet_cond_embedding.blocks.{index}.weight"][0]))
        index += 2
    return int(first[1]), outs


def fit_problem(controlnet: Any, unet: Any) -> str | None:
    """Why a ControlNet cannot drive a UNet (another family), or None."""
    ours, theirs = unet.config, controlnet.config
    width, their_width = ours.cross_attention_dim, theirs.cross_attention_dim
    if width != their_width:
        return (
            f"its cross-attention width is {their_width} and the model's is {width} "
            "(a ControlNet for another model family)"
        )
    if list(ours.block_out_channels) != list(theirs.block_out_channels):
        return (
            f"its block widths are {list(theirs.block_out_channels)} and the model's are "
            f"{list(ours.block_out_channels)} (a ControlNet for another model family)"
        )
    if (ours.addition_embed_type == "text_time") != (theirs.addition_embed_type == "text_time"):
        return "one of them takes SDXL's size conditioning and the other does not"
    return None


def load_controlnet(
    entry: ControlNetEntry,
    unet_config: Mapping[str, Any],
    learn: Callable[..., None] | None = None,
) -> Any:
    """A `ControlNetModel` (float32, on the CPU) from a listed file or folder.

    Args:
        entry: the listed model.
        unet_config: the config of the UNet it will drive (the base of a single file's
            config; see the module docstring).
        learn: records a pickle's layout and family, or why it is unusable, in the listing.
    Raises:
        UnusableFileError naming the model and why.
    """
    from diffusers import ControlNetModel

    label = f"ControlNet model '{entry.title}'"
    if entry.kind == "diffusers":
        try:
            return ControlNetModel.from_pretrained(entry.path, local_files_only=True)
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            raise UnusableFileError(f"{label}: {error}", field="controlnet") from error
    state = file_state(entry.path)
    facts = facts_from_shapes(entry.path.name, {k: tuple(v.shape) for k, v in state.items()})
    if learn is not None and (facts.family, facts.layout, facts.error) != (
        entry.family,
        entry.layout,
        entry.error,
    ):
        learn(family=facts.family, layout=facts.layout, error=facts.error)
    if facts.error or facts.layout is None:
        raise UnusableFileError(f"{label}: {facts.error}", field="controlnet")
    if facts.layout == IPADAPTER_LAYOUT:  # a pickle is classified when first loaded
        raise UnusableFileError(
            f"{label} is an IP-Adapter; its module is an ip-adapter_* one (an image "
            "encoder), not a ControlNet preprocessor",
            field="controlnet",
        )
    shapes = {key: tuple(value.shape) for key, value in state.items()}
    config = controlnet_config(unet_config, shapes, layout=facts.layout, name=entry.path.name)
    return controlnet_from_state_dict(state, config, facts.layout, label)


def controlnet_from_state_dict(
    state: dict[str, torch.Tensor], config: dict[str, Any], layout: str, label: str
) -> Any:
    """Build the model and load the weights (original layout converted first); every
    tensor must fit."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if layout == "ldm":
        stripped = {key.removeprefix(LDM_PREFIX): value for key, value in state.items()}
        try:
            state = convert_controlnet_checkpoint(stripped, config)
        except (KeyError, IndexError, ValueError, RuntimeError) as error:
            raise UnusableFileError(
                f"{label}: its tensors are not a ControlNet's ({error!r})", field="controlnet"
            ) from error
        state = {key: value for key, value in state.items() if value is not None}
        # SDXL's size embedding: diffusers' converter maps it for UNets, not ControlNets
        embedding = "add_embedding" if config.get("addition_embed_type") else "class_embedding"
        for ldm, ours in (("label_emb.0.0.", "linear_1."), ("label_emb.0.2.", "linear_2.")):
            for kind in ("weight", "bias"):
                if ldm + kind in stripped:
                    state[f"{embedding}.{ours}{kind}"] = stripped[ldm + kind]
    with torch.device("meta"):
        model = ControlNetModel(**config)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    extra = [key for key in state if key not in expected]
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:3]))
    if missing:
        problems.append(f"{len(missing)} tensors missing (first: {', '.join(missing[:3])})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors (first: {', '.join(extra[:3])})")
    if problems:
        raise UnusableFileError(
            f"{label} does not fit the model's UNet: {'; '.join(problems)}", field="controlnet"
        )
    model.load_state_dict(
        {key: value.to(torch.float32) for key, value in state.items()}, assign=True
    )
    return model.eval()


class ControlNetCache:
    """Loaded ControlNets by file (path and mtime) and device/dtype, the last `size` used
    kept (sd-webui-controlnet's model cache)."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self.size = size
        self._models: OrderedDict[tuple[object, ...], Any] = OrderedDict()

    def get(
        self,
        entry: ControlNetEntry,
        unet: Any,
        device: torch.device,
        dtype: torch.dtype,
        learn: Callable[..., None] | None = None,
    ) -> Any:
        """The model for `entry`, fitted to `unet`, on `device` in `dtype`."""
        key = (str(entry.path), entry.mtime_ns, dict(unet.config).__repr__(), str(device), dtype)

        def build() -> Any:
            model = load_controlnet(entry, dict(unet.config), learn)
            problem = fit_problem(model, unet)
            if problem:
                raise UnusableFileError(
                    f"ControlNet model '{entry.title}' does not fit this model: {problem}",
                    field="controlnet",
                )
            if model.dtype != dtype:
                model = model.to(dtype=dtype)
            return model.to(device=device)

        return self.remember(key, build)

    def remember(self, key: tuple[object, ...], build: Callable[[], Any]) -> Any:
        """The model kept under `key`, else `build()` kept there (IP-Adapters and their
        image encoders share the cache with ControlNets)."""
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        model = build()
        self._models[key] = model
        while len(self._models) > self.size:
            self._models.popitem(last=False)
        return model

    def clear(self) -> None:
        self._models.clear()


def model_path(entry: ControlNetEntry) -> Path:
    """The file whose bytes are the model (a folder's weights file)."""
    if entry.kind == "diffusers":
        return weights_file(entry.path) or entry.path
    return entry.path
