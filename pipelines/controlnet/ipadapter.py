"""IP-Adapter units, as sd-webui-controlnet exposes them: an IP-Adapter file in
`models/ControlNet/` with an `ip-adapter_clip_*` module, its image encoder (a CLIP vision
model) in `models/clip_vision/` (CONTRACT), next to the ControlNet folder.

The unit's image goes through the encoder (CLIP's resize, centre crop and normalisation at
the encoder's size). A plain adapter (`image_proj.proj`, e.g. `ip-adapter_sd15`,
`ip-adapter_sdxl`) projects the encoder's image embedding (a linear layer to `tokens` x the
UNet's cross-attention width, then a layer norm); a Plus adapter (`image_proj.latents`, e.g.
`ip-adapter-plus_sd15`, `ip-adapter-plus-face_sd15`, `ip-adapter-plus_sdxl_vit-h`) feeds the
encoder's penultimate hidden states (every patch, not the pooled embedding, as
sd-webui-controlnet's `ip-adapter_clip_*` preprocessors do for Plus models) to a
`Resampler`: learned queries that read them through perceiver attention. A Full-face
adapter (`image_proj.proj.0/2/3`, `ip-adapter-full-face_sd15`, which sd-webui-controlnet
runs with the same `ip-adapter_clip_h`/`ip-adapter_clip_sd15` module and treats as a Plus
model) maps each of those hidden states through an MLP (`MLPProjection`): one token per
patch and the class token, 257 for ViT-H. Either way the result is the image tokens.

Every cross-attention layer of the UNet then attends to the text and, with its own key and
value projections (`ip_adapter.<2i+1>.to_k_ip/to_v_ip`), to the image tokens: out =
to_out(attn(q, k_text, v_text) + weight * attn(q, k_img, v_img)) ("decoupled
cross-attention"). The uncond rows of the UNet batch get the tokens of a zero embedding
(plain) or of the encoder's hidden states for an all-zero input (Plus, Full-face): what the
IP-Adapter was trained with, and what diffusers and sd-webui-controlnet pass there. The
attention itself is diffusers' `IPAdapterAttnProcessor2_0`; it is installed only for the
steps a run's units act in and the previous processors are put back after, so LoRAs
(merged into the same layers' weights) and runs without units are untouched.

A FaceID adapter (`image_proj.proj.0/2` and `norm`, `ip-adapter-faceid_sd15`) has no image
encoder: the `ip-adapter_face_id` module gives it insightface's face embedding of the image
(`pipelines.controlnet.faceid`, optional), which its MLP (`FaceProjection`) maps to 4
tokens; the uncond rows get a zero embedding's, as sd-webui-controlnet passes. Its LoRA
(`ip-adapter-faceid_sd15_lora`) is an ordinary LoRA in `loras/`, added to the prompt as
sd-webui-controlnet's users do (`<lora:ip-adapter-faceid_sd15_lora:0.6>`). FaceID Plus is
listed unusable with the reason (`pipelines.folders.controlnets`).

`control_mode` has no effect on an IP-Adapter unit, as in sd-webui-controlnet (it scales
ControlNet residuals, which an IP-Adapter has none of).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipelines.errors import UnusableFileError
from pipelines.folders.controlnets import ControlNetEntry, file_shapes, file_state, ipadapter_kind

CLIP_VISION_SUBFOLDER = "clip_vision"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ENCODER_HINTS = {"clip_h": ("vit-h", "clip_h"), "clip_g": ("bigg", "clip_g")}
"""Name parts that mark an encoder as the one a module asks for, when several fit."""


def encoder_roots(controlnet_roots: Sequence[Path]) -> tuple[Path, ...]:
    """`clip_vision/` beside every ControlNet folder (`models/ControlNet` ->
    `models/clip_vision`)."""
    found: list[Path] = []
    for root in controlnet_roots:
        folder = root.parent / CLIP_VISION_SUBFOLDER
        if folder not in found:
            found.append(folder)
    return tuple(found)


@dataclass(frozen=True)
class Encoder:
    """A CLIP vision model folder (transformers layout: config.json and weights)."""

    path: Path
    projection_dim: int
    image_size: int
    hidden_size: int = 0  # the width of its hidden states (what a Plus adapter reads)


def list_encoders(roots: Sequence[Path]) -> list[Encoder]:
    """The CLIP vision model folders under `roots` (a folder whose config.json is a
    CLIPVisionModelWithProjection's or a CLIPVisionConfig)."""
    encoders = []
    for root in roots:
        if not root.is_dir():
            continue
        for folder in sorted(root.iterdir(), key=lambda p: p.name.lower()):
            try:
                config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if not isinstance(config, dict):
                continue
            vision = config.get("vision_config", config)
            if not isinstance(vision, dict) or "projection_dim" not in vision:
                continue
            encoders.append(
                Encoder(
                    folder,
                    int(vision["projection_dim"]),
                    int(vision.get("image_size", 224)),
                    int(vision.get("hidden_size", 768)),
                )
            )
    return encoders


HIDDEN_INPUT = {"plus": "image_proj.proj_in.weight", "full": "image_proj.proj.0.weight"}
"""The first layer of each adapter kind that reads the encoder's hidden states."""


def embed_dim(entry: ControlNetEntry) -> tuple[str, int]:
    """What of the encoder the adapter reads and its width: a plain adapter's projection
    takes the image embedding (`projection_dim`), a Plus adapter's resampler and a
    Full-face adapter's MLP the hidden states (`hidden_size`)."""
    shapes = file_shapes(entry)
    first = HIDDEN_INPUT.get(ipadapter_kind(shapes))
    if first is not None:
        return "hidden_size", int(shapes[first][1])
    return "projection_dim", int(shapes["image_proj.proj.weight"][1])


def adapter_kind(entry: ControlNetEntry) -> str:
    """The IP-Adapter kind of a listed file (`ipadapter_kind`), from its tensor names."""
    return ipadapter_kind(file_shapes(entry))


def find_encoder(entry: ControlNetEntry, roots: Sequence[Path], hint: str | None) -> Encoder:
    """The image encoder for an IP-Adapter: one whose projection width (plain) or hidden
    width (Plus) is the adapter's input width; among several, one named as the module asks
    (`clip_h`, `clip_g`), else the first by name. Raises UnusableFileError naming the
    folders and the width needed."""
    what, width = embed_dim(entry)
    fitting = [e for e in list_encoders(roots) if getattr(e, what) == width]
    if not fitting:
        where = ", ".join(str(root) for root in roots) or "models/clip_vision"
        raise UnusableFileError(
            f"IP-Adapter '{entry.title}' needs its image encoder: a CLIP vision model folder "
            f"(config.json and model.safetensors) with {what} {width} in {where}; "
            "none there",
            field="controlnet",
        )
    for part in ENCODER_HINTS.get(hint or "", ()):
        for encoder in fitting:
            if part in encoder.path.name.lower():
                return encoder
    return fitting[0]


def load_encoder(encoder: Encoder) -> Any:
    """The CLIP vision model (float32, CPU), offline."""
    from transformers import CLIPVisionModelWithProjection

    try:
        model = CLIPVisionModelWithProjection.from_pretrained(encoder.path, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise UnusableFileError(
            f"image encoder '{encoder.path.name}': {error}", field="controlnet"
        ) from error
    return model.eval()


def clip_pixels(image: np.ndarray, size: int) -> torch.Tensor:
    """CLIP's preprocessing: shortest side to `size` (bicubic), centre crop, normalise.
    [H, W, 3] uint8 -> [1, 3, size, size]."""
    picture = Image.fromarray(image)
    scale = size / min(picture.size)
    resized = (max(round(picture.width * scale), size), max(round(picture.height * scale), size))
    picture = picture.resize(resized, Image.Resampling.BICUBIC)
    left, top = (picture.width - size) // 2, (picture.height - size) // 2
    picture = picture.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return ((pixels - mean) / std)[None]


HEAD_WIDTH = 64
"""The Resampler's attention head width in every published Plus adapter (its head count is
the query width / 64, as IP-Adapter's and diffusers' loaders take it)."""


class PerceiverAttention(torch.nn.Module):
    """IP-Adapter's `PerceiverAttention`: the queries (latents) attend to the image
    features and to themselves. Names are the published ones (`layers.i.0.*`)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        inner = heads * HEAD_WIDTH
        self.norm1 = torch.nn.LayerNorm(width)
        self.norm2 = torch.nn.LayerNorm(width)
        self.to_q = torch.nn.Linear(width, inner, bias=False)
        self.to_kv = torch.nn.Linear(width, inner * 2, bias=False)
        self.to_out = torch.nn.Linear(inner, width, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        batch, queries, _ = latents.shape
        key, value = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)

        def split(x: torch.Tensor) -> torch.Tensor:  # [B, n, h*d] -> [B, h, n, d]
            return x.reshape(batch, x.shape[1], self.heads, HEAD_WIDTH).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(
            split(self.to_q(latents)), split(key), split(value)
        )
        # [B, h, queries, d] -> [B, queries, h*d]
        return self.to_out(out.transpose(1, 2).reshape(batch, queries, -1))


class Resampler(torch.nn.Module):
    """A Plus adapter's `image_proj` (IP-Adapter's `Resampler`, published key names):
    `latents` queries read the projected hidden states through `depth` blocks of perceiver
    attention and a feed-forward, each added to the queries; then `proj_out` to the UNet's
    cross-attention width and `norm_out`. [B, patches, hidden] -> [B, queries, width]."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        _, queries, width = state["latents"].shape
        embed = state["proj_in.weight"].shape[1]
        output = state["proj_out.weight"].shape[0]
        depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("layers."))
        ratio = state["layers.0.1.1.weight"].shape[0] // width
        heads = state["layers.0.0.to_q.weight"].shape[0] // HEAD_WIDTH
        self.latents = torch.nn.Parameter(torch.zeros(1, queries, width))
        self.proj_in = torch.nn.Linear(embed, width)
        self.proj_out = torch.nn.Linear(width, output)
        self.norm_out = torch.nn.LayerNorm(output)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleList(
                [
                    PerceiverAttention(width, heads),
                    torch.nn.Sequential(
                        torch.nn.LayerNorm(width),
                        torch.nn.Linear(width, width * ratio, bias=False),
                        torch.nn.GELU(),
                        torch.nn.Linear(width * ratio, width, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )
        self.load_state_dict(state)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(features.shape[0], 1, 1)
        features = self.proj_in(features)
        for attention, feed_forward in self.layers:  # type: ignore[misc]
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class MLPProjection(torch.nn.Module):
    """A Full-face adapter's `image_proj` (IP-Adapter's `MLPProjModel`, published key names
    `proj.0/2/3`): each hidden state through Linear, GELU, Linear to the UNet's
    cross-attention width, LayerNorm; one token per hidden state.
    [B, patches + 1, hidden] -> [B, patches + 1, width]."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        inner, embed = state["proj.0.weight"].shape
        output = state["proj.2.weight"].shape[0]
        self.proj = torch.nn.Sequential(
            torch.nn.Linear(embed, inner),
            torch.nn.GELU(),
            torch.nn.Linear(inner, output),
            torch.nn.LayerNorm(output),
        )
        self.load_state_dict(state)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class FaceProjection(torch.nn.Module):
    """A FaceID adapter's `image_proj` (IP-Adapter's `MLPProjModel` of `ip_adapter_faceid`,
    published key names `proj.0/2`, `norm`): the face embedding through Linear, GELU, Linear
    to `tokens` x the UNet's cross-attention width, each token layer-normed.
    [B, 512] -> [B, tokens, width]."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        inner, embed = state["proj.0.weight"].shape
        output = state["proj.2.weight"].shape[0]
        self.width = state["norm.weight"].shape[0]
        self.proj = torch.nn.Sequential(
            torch.nn.Linear(embed, inner),
            torch.nn.GELU(),
            torch.nn.Linear(inner, output),
        )
        self.norm = torch.nn.LayerNorm(self.width)
        self.load_state_dict(state)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        # [B, tokens * width] -> [B, tokens, width]
        tokens = self.proj(embedding).reshape(embedding.shape[0], -1, self.width)
        return self.norm(tokens)


IMAGE_EMBEDS = "image_embeds"
HIDDEN_STATES = "hidden_states"
FACE_EMBEDDING = "face_embedding"


@dataclass
class IPAdapter:
    """A loaded IP-Adapter: its projection and each cross-attention layer's image
    key/value weights, in the UNet's processor order."""

    projection: Any  # diffusers ImageProjection, a Resampler or an MLPProjection
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # (to_k_ip, to_v_ip) per attn2
    tokens: int | None  # None: one per hidden state of the encoder (Full-face)
    reads: str = IMAGE_EMBEDS  # HIDDEN_STATES: the encoder's penultimate hidden states;
    # FACE_EMBEDDING: insightface's (FaceID, no image encoder)


def cross_attention_names(unet: Any) -> list[str]:
    """The UNet's cross-attention processors, in diffusers' IP-Adapter order."""
    return [name for name in unet.attn_processors if not name.endswith("attn1.processor")]


def load_ipadapter(entry: ControlNetEntry, unet: Any) -> IPAdapter:
    """Load and fit an IP-Adapter file to `unet`. Raises UnusableFileError naming the
    mismatch (another family's adapter)."""
    from diffusers.models.embeddings import ImageProjection

    label = f"IP-Adapter '{entry.title}'"
    state = file_state(entry.path)
    image_proj = {
        key.removeprefix("image_proj."): value.float()
        for key, value in state.items()
        if key.startswith("image_proj.")
    }
    kind = ipadapter_kind(state)
    output = {
        "plain": "proj.weight",
        "plus": "proj_out.weight",
        "full": "proj.2.weight",
        "faceid": "proj.2.weight",
    }
    if kind not in output:
        raise UnusableFileError(f"{label}: an IP-Adapter {kind}, not run here", field="controlnet")
    proj = image_proj[output[kind]]
    width = int(unet.config.cross_attention_dim)
    names = cross_attention_names(unet)
    layers = []
    index = 1
    while f"ip_adapter.{index}.to_k_ip.weight" in state:
        prefix = f"ip_adapter.{index}."
        layers.append((state[prefix + "to_k_ip.weight"], state[prefix + "to_v_ip.weight"]))
        index += 2
    if len(layers) != len(names):
        raise UnusableFileError(
            f"{label} has {len(layers)} cross-attention layers and the model's UNet has "
            f"{len(names)} (an IP-Adapter for another model family)",
            field="controlnet",
        )
    modules = dict(unet.named_modules())
    for name, (key, _value) in zip(names, layers, strict=True):
        expected = tuple(modules[name.removesuffix(".processor")].to_k.weight.shape)
        if tuple(key.shape) != expected:
            raise UnusableFileError(
                f"{label} does not fit the model's UNet: {name}: to_k_ip {tuple(key.shape)} "
                f"vs to_k {expected} (an IP-Adapter for another model family)",
                field="controlnet",
            )
    if proj.shape[0] % width or (kind in ("plus", "full") and proj.shape[0] != width):
        raise UnusableFileError(
            f"{label}: its projection width {proj.shape[0]} does not give tokens of the "
            f"model's cross-attention width {width}",
            field="controlnet",
        )
    tokens: int | None = None
    try:
        if kind == "plus":
            projection: Any = Resampler(image_proj)
            tokens = int(image_proj["latents"].shape[1])
        elif kind == "full":
            projection = MLPProjection(image_proj)
        elif kind == "faceid":
            projection = FaceProjection(image_proj)
            tokens = proj.shape[0] // width
        else:
            tokens = proj.shape[0] // width
            projection = ImageProjection(
                image_embed_dim=int(proj.shape[1]),
                cross_attention_dim=width,
                num_image_text_embeds=tokens,
            )
            projection.load_state_dict(  # the published `proj` is diffusers' `image_embeds`
                {key.replace("proj.", "image_embeds.", 1): v for key, v in image_proj.items()}
            )
    except (KeyError, RuntimeError, ValueError) as error:
        raise UnusableFileError(
            f"{label}: its image_proj tensors are not an IP-Adapter's: {error}",
            field="controlnet",
        ) from error
    layers = [(k.float(), v.float()) for k, v in layers]
    reads = {"plain": IMAGE_EMBEDS, "faceid": FACE_EMBEDDING}.get(kind, HIDDEN_STATES)
    return IPAdapter(projection.eval(), layers, tokens, reads)


@dataclass
class AdapterTokens:
    """What the installed processors read at each UNet call: per adapter, the image tokens
    for every batch row and the weight in force (0: not acting at this step)."""

    tokens: list[torch.Tensor] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)


class DecoupledAttention:
    """A cross-attention processor: the previous one while no adapter acts, else
    diffusers' `IPAdapterAttnProcessor2_0` fed the current image tokens."""

    def __init__(self, previous: Any, processor: Any, state: AdapterTokens) -> None:
        self.previous = previous
        self.processor = processor
        self.state = state

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if not any(self.state.scales):
            return self.previous(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        self.processor.scale = self.state.scales
        return self.processor(
            attn,
            hidden_states,
            (encoder_hidden_states, self.state.tokens),
            attention_mask,
            temb,
        )


def decoupled_processors(
    unet: Any, adapters: Sequence[IPAdapter], state: AdapterTokens
) -> dict[str, Any]:
    """Every processor of `unet`: the cross-attention ones wrapped for `adapters`."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    modules = dict(unet.named_modules())
    current = unet.attn_processors
    parameter = next(unet.parameters())
    processors = dict(current)
    for position, name in enumerate(cross_attention_names(unet)):
        attn = modules[name.removesuffix(".processor")]
        hidden, width = attn.to_k.weight.shape
        processor = IPAdapterAttnProcessor2_0(
            hidden_size=hidden,
            cross_attention_dim=width,
            # read only when the tokens come appended to the text; here they come apart
            num_tokens=[adapter.tokens or 1 for adapter in adapters],
            scale=[0.0] * len(adapters),
        )
        with torch.no_grad():
            for i, adapter in enumerate(adapters):
                key, value = adapter.layers[position]
                processor.to_k_ip[i].weight.copy_(key)
                processor.to_v_ip[i].weight.copy_(value)
        processor.to(device=parameter.device, dtype=parameter.dtype)
        processors[name] = DecoupledAttention(current[name], processor, state)
    return processors


@contextmanager
def installed(unet: Any, processors: dict[str, Any]) -> Iterator[None]:
    """`processors` on `unet` inside the block; the previous ones put back after."""
    previous = unet.attn_processors
    unet.set_attn_processor(dict(processors))  # diffusers pops from the dict it is given
    try:
        yield
    finally:
        unet.set_attn_processor(previous)
