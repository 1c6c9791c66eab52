"""IP-Adapter units (sd-webui-controlnet's `ip-adapter_clip_*` modules) through the real
service, with a tiny IP-Adapter and a tiny CLIP vision encoder built here (random, non-zero
projections), 64x64, 2 steps. The injected attention is checked against decoupled
cross-attention written out by hand: to_out(attn(q, k_text, v_text) + w * attn(q, k_img,
v_img)).
"""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from pipelines.controlnet.annotators import Annotators
from pipelines.controlnet.faceid import (
    FACE_FILES,
    FACE_FOLDER,
    FaceEmbedder,
    NoFaceError,
    largest_face_embedding,
)
from pipelines.controlnet.ipadapter import (
    FACE_EMBEDDING,
    HIDDEN_STATES,
    AdapterTokens,
    clip_pixels,
    cross_attention_names,
    decoupled_processors,
    installed,
    load_ipadapter,
)
from pipelines.controlnet.models import ControlNetCache
from pipelines.controlnet.preprocessors import find_preprocessor
from pipelines.controlnet.units import listed_models, prepare_adapter
from pipelines.engine import Engine
from pipelines.errors import InvalidRequestError, LorastackError
from pipelines.folders.controlnets import ControlNetEntry
from pipelines.loading import LoadedModel
from pipelines.schema import ControlNetUnit, LoraSpec
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_controlnet import control_image, pixels, request
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

EMBED = 16
TOKENS = 4


def tiny_ipadapter(unet: Any, seed: int, embed: int = EMBED) -> dict[str, torch.Tensor]:
    """A plain IP-Adapter for `unet` in the published key layout, random weights."""
    generator = torch.Generator().manual_seed(seed)
    width = int(unet.config.cross_attention_dim)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    state = {
        "image_proj.proj.weight": rand(TOKENS * width, embed),
        "image_proj.proj.bias": rand(TOKENS * width, scale=0.1),
        "image_proj.norm.weight": 1 + rand(width, scale=0.1),
        "image_proj.norm.bias": rand(width, scale=0.1),
    }
    modules = dict(unet.named_modules())
    for position, name in enumerate(cross_attention_names(unet)):
        hidden = modules[name.removesuffix(".processor")].to_k.weight.shape[0]
        state[f"ip_adapter.{2 * position + 1}.to_k_ip.weight"] = rand(hidden, width)
        state[f"ip_adapter.{2 * position + 1}.to_v_ip.weight"] = rand(hidden, width)
    return state


PLUS_WIDTH = 128  # the Resampler's width: two heads of 64, as the published loaders read it


def tiny_plus(unet: Any, seed: int, embed: int = 32) -> dict[str, torch.Tensor]:
    """An IP-Adapter Plus for `unet` in the published key layout (`ip-adapter-plus_sd15`:
    a 4-block Resampler over the encoder's hidden states, 16 queries, width 768; here
    TOKENS queries, width PLUS_WIDTH, hidden states of `embed`), random weights."""
    generator = torch.Generator().manual_seed(seed)
    width = int(unet.config.cross_attention_dim)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    def norm(name: str, size: int) -> dict[str, torch.Tensor]:
        return {f"{name}.weight": 1 + rand(size, scale=0.1), f"{name}.bias": rand(size, scale=0.1)}

    proj = {
        "image_proj.latents": rand(1, TOKENS, PLUS_WIDTH, scale=1.0),
        "image_proj.proj_in.weight": rand(PLUS_WIDTH, embed),
        "image_proj.proj_in.bias": rand(PLUS_WIDTH, scale=0.1),
        "image_proj.proj_out.weight": rand(width, PLUS_WIDTH, scale=0.1),
        "image_proj.proj_out.bias": rand(width, scale=0.1),
        **norm("image_proj.norm_out", width),
    }
    for i in range(4):
        block = f"image_proj.layers.{i}"
        proj.update(norm(f"{block}.0.norm1", PLUS_WIDTH) | norm(f"{block}.0.norm2", PLUS_WIDTH))
        proj[f"{block}.0.to_q.weight"] = rand(PLUS_WIDTH, PLUS_WIDTH, scale=0.1)
        proj[f"{block}.0.to_kv.weight"] = rand(2 * PLUS_WIDTH, PLUS_WIDTH, scale=0.1)
        proj[f"{block}.0.to_out.weight"] = rand(PLUS_WIDTH, PLUS_WIDTH, scale=0.1)
        proj.update(norm(f"{block}.1.0", PLUS_WIDTH))
        proj[f"{block}.1.1.weight"] = rand(4 * PLUS_WIDTH, PLUS_WIDTH, scale=0.1)
        proj[f"{block}.1.3.weight"] = rand(PLUS_WIDTH, 4 * PLUS_WIDTH, scale=0.1)
    layers = {k: v for k, v in tiny_ipadapter(unet, seed).items() if k.startswith("ip_adapter.")}
    return {**proj, **layers}


def tiny_full(unet: Any, seed: int, embed: int = 32) -> dict[str, torch.Tensor]:
    """An IP-Adapter Full-face for `unet` in the published key layout
    (`ip-adapter-full-face_sd15`: `MLPProjModel`, Linear(1280, 1280), GELU, Linear(1280, 768),
    LayerNorm(768); here hidden states of `embed`), random weights."""
    generator = torch.Generator().manual_seed(seed)
    width = int(unet.config.cross_attention_dim)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    proj = {
        "image_proj.proj.0.weight": rand(embed, embed),
        "image_proj.proj.0.bias": rand(embed, scale=0.1),
        "image_proj.proj.2.weight": rand(width, embed),
        "image_proj.proj.2.bias": rand(width, scale=0.1),
        "image_proj.proj.3.weight": 1 + rand(width, scale=0.1),
        "image_proj.proj.3.bias": rand(width, scale=0.1),
    }
    layers = {k: v for k, v in tiny_ipadapter(unet, seed).items() if k.startswith("ip_adapter.")}
    return {**proj, **layers}


FACE = 512  # insightface's ArcFace embedding width
FACE_INNER = 1024  # ip-adapter-faceid_sd15's hidden width (twice the embedding, as published)


def tiny_faceid(unet: Any, seed: int) -> dict[str, torch.Tensor]:
    """An IP-Adapter FaceID for `unet` in the published key layout (`ip-adapter-faceid_sd15`:
    Linear(512, 1024), GELU, Linear(1024, 4 x 768), LayerNorm(768) per token; here the UNet's
    width), random weights."""
    generator = torch.Generator().manual_seed(seed)
    width = int(unet.config.cross_attention_dim)

    def rand(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    proj = {
        "image_proj.proj.0.weight": rand(FACE_INNER, FACE, scale=0.1),
        "image_proj.proj.0.bias": rand(FACE_INNER, scale=0.1),
        "image_proj.proj.2.weight": rand(TOKENS * width, FACE_INNER, scale=0.1),
        "image_proj.proj.2.bias": rand(TOKENS * width, scale=0.1),
        "image_proj.norm.weight": 1 + rand(width, scale=0.1),
        "image_proj.norm.bias": rand(width, scale=0.1),
    }
    layers = {k: v for k, v in tiny_ipadapter(unet, seed).items() if k.startswith("ip_adapter.")}
    return {**proj, **layers}


class FaceApp:
    """Stands in for insightface's `FaceAnalysis` (its SCRFD detector and ArcFace network
    are ONNX files that cannot be built tiny): two faces, each with a normed embedding made
    from the pixels it is given, the larger one second (none in a flat image); it keeps the
    image it got."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def get(self, image: np.ndarray) -> list[SimpleNamespace]:
        self.seen.append(image)
        if image.min() == image.max():
            return []  # a flat image has no face
        channels = image.reshape(-1, 3).astype(np.float64).mean(axis=0)  # as given (BGR)
        rng = np.random.default_rng(0)
        embedding = rng.standard_normal((3, FACE)).T @ channels + rng.standard_normal(FACE)
        big = (embedding / np.linalg.norm(embedding)).astype(np.float32)
        small = SimpleNamespace(bbox=np.array([0.0, 0.0, 5.0, 5.0]), normed_embedding=-big)
        large = SimpleNamespace(bbox=np.array([10.0, 10.0, 30.0, 40.0]), normed_embedding=big)
        return [small, large]


class StandInFaces:
    """`FaceModels` whose embedder is `largest_face_embedding` over a FaceApp, the entry
    point insightface's own embedder goes through."""

    def __init__(self) -> None:
        self.app = FaceApp()

    def missing(self) -> str | None:
        return None

    def load(self, folder: Path, device: torch.device) -> FaceEmbedder:
        assert folder.parts[-3:] == FACE_FOLDER and all((folder / n).is_file() for n in FACE_FILES)
        return partial(largest_face_embedding, self.app)


def image_proj_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("image_proj."): v for k, v in state.items() if k.startswith("image_")}


def tiny_encoder(folder: Path) -> None:
    """A CLIP vision model with projection (transformers layout), seeded."""
    torch.manual_seed(0)
    config = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        projection_dim=EMBED,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    CLIPVisionModelWithProjection(config).eval().save_pretrained(folder)


@pytest.fixture(scope="module")
def ip_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel, tiny_sdxl: LoadedModel
) -> Path:
    """`ControlNet/` with adapters and `clip_vision/` beside it with the encoder."""
    root = tmp_path_factory.mktemp("ipadapter-models")
    (root / "ControlNet").mkdir()
    save_file(tiny_ipadapter(tiny_sd1.pipe.unet, 1), root / "ControlNet" / "tiny-ip.safetensors")
    save_file(
        tiny_ipadapter(tiny_sdxl.pipe.unet, 2), root / "ControlNet" / "tiny-ip-xl.safetensors"
    )
    wide = tiny_ipadapter(tiny_sd1.pipe.unet, 3, embed=24)  # no encoder of that width
    save_file(wide, root / "ControlNet" / "tiny-ip-wide.safetensors")
    save_file(tiny_plus(tiny_sd1.pipe.unet, 4), root / "ControlNet" / "tiny-ip-plus.safetensors")
    xl_plus = tiny_plus(tiny_sdxl.pipe.unet, 5)  # ip-adapter-plus_sdxl_vit-h's layout
    save_file(xl_plus, root / "ControlNet" / "tiny-ip-plus-xl.safetensors")
    broken = {  # a Plus adapter's resampler without its output layers
        "image_proj.latents": torch.zeros(1, 4, 8),
        "image_proj.proj_in.weight": torch.zeros(8, EMBED),
        "ip_adapter.1.to_k_ip.weight": torch.zeros(4, 8),
    }
    save_file(broken, root / "ControlNet" / "tiny-ip-plus-broken.safetensors")
    faceid = tiny_faceid(tiny_sd1.pipe.unet, 7)
    save_file(faceid, root / "ControlNet" / "tiny-ip-faceid.safetensors")
    no_bias = {k: v for k, v in faceid.items() if k != "image_proj.proj.2.bias"}
    save_file(no_bias, root / "ControlNet" / "tiny-ip-faceid-broken.safetensors")
    published = {  # h94's `.bin` form: two dicts; FaceID's also holds its LoRA's layers
        part: {k.removeprefix(f"{part}."): v for k, v in faceid.items() if k.startswith(part)}
        for part in ("image_proj", "ip_adapter")
    }
    published["ip_adapter"]["0.to_q_lora.down.weight"] = torch.zeros(4, 8)
    torch.save(published, root / "ControlNet" / "tiny-ip-faceid-published.bin")
    plus_faceid = {**faceid, "image_proj.perceiver_resampler.proj_in.weight": torch.zeros(8, 8)}
    save_file(plus_faceid, root / "ControlNet" / "tiny-ip-faceid-plus.safetensors")
    pack = root.joinpath("ControlNet", "annotators", *FACE_FOLDER)
    pack.mkdir(parents=True)
    for name in FACE_FILES:  # read only by the stand-in, which checks they are there
        (pack / name).write_bytes(b"onnx")
    full = tiny_full(tiny_sd1.pipe.unet, 6)
    save_file(full, root / "ControlNet" / "tiny-ip-full-face.safetensors")
    no_norm = {k: v for k, v in full.items() if not k.startswith("image_proj.proj.3.b")}
    save_file(no_norm, root / "ControlNet" / "tiny-ip-full-face-broken.safetensors")
    tiny_encoder(root / "clip_vision" / "tiny-clip-h")
    return root


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    ip_dir: Path,
    tiny_sd1: LoadedModel,
) -> Service:
    data = tmp_path_factory.mktemp("ipadapter-data")
    keys = sd1_keys(SD1_MODULES)
    write(data / "loras" / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    return build_service(
        Settings(
            data_dir=data,
            ckpt_dirs=(models_dir,),
            controlnet_dir=ip_dir / "ControlNet",
            threads=2,
        ),
        lambda settings, folders: Engine(settings, folders, faces=StandInFaces()),
    )


def ip_unit(**fields: Any) -> ControlNetUnit:
    values = {"image": control_image(), "module": "ip-adapter_clip_sd15", "model": "tiny-ip"}
    return ControlNetUnit(**{**values, **fields})


def test_listing_usable_and_why_not(service: Service) -> None:
    listed = {entry.relpath: entry for entry in service.controlnet_models()}
    assert listed["tiny-ip.safetensors"].error is None
    assert listed["tiny-ip.safetensors"].layout == "ipadapter"
    wide = listed["tiny-ip-wide.safetensors"].error or ""
    assert "image encoder" in wide and "projection_dim 24" in wide and "clip_vision" in wide
    assert listed["tiny-ip-plus.safetensors"].error is None
    assert "Plus" in (listed["tiny-ip-plus-broken.safetensors"].error or "")
    assert listed["tiny-ip-faceid.safetensors"].error is None  # the stand-in face models
    broken_face = listed["tiny-ip-faceid-broken.safetensors"].error or ""
    assert "FaceID" in broken_face and "image_proj.proj.2.bias missing" in broken_face
    assert "FaceID Plus" in (listed["tiny-ip-faceid-plus.safetensors"].error or "")
    assert listed["tiny-ip-full-face.safetensors"].error is None
    broken = listed["tiny-ip-full-face-broken.safetensors"].error or ""
    assert "Full-face" in broken and "image_proj.proj.3.bias missing" in broken
    with pytest.raises(LorastackError, match="projection_dim 24") as refused:
        service.generate(request(ip_unit(model="tiny-ip-wide")))
    assert refused.value.field == "controlnet[0].model"


def test_unit_changes_the_image_and_weight_zero_does_not(service: Service) -> None:
    alone = service.generate(request())
    made = service.generate(request(ip_unit()))
    assert np.abs(pixels(made) - pixels(alone)).mean() > 1  # the unit did something
    assert made.detected_maps == []
    other = service.generate(request(ip_unit(image=control_image(seed=7))))
    assert not np.array_equal(pixels(other), pixels(made))  # the image matters
    zero = service.generate(request(ip_unit(weight=0.0)))
    assert np.array_equal(pixels(zero), pixels(alone))
    late = service.generate(request(ip_unit(guidance_start=0.9)))  # never acts in 2 steps
    assert np.array_equal(pixels(late), pixels(alone))
    info = made.infotexts[0]
    assert 'ControlNet 0: "Module: ip-adapter_clip_sd15, Model: tiny-ip [' in info
    # the UNet's own attention is back after the run
    again = service.generate(request())
    assert np.array_equal(pixels(again), pixels(alone))


def test_lora_stack_and_unit_together(service: Service) -> None:
    """A LoRA (merged into the attention weights the adapter's attention also uses) and
    an IP-Adapter unit both act; the LoRA alone is the same before and after."""
    lora = (LoraSpec("ink", 1.0),)
    with_lora = service.generate(request(loras=lora))
    unit_only = service.generate(request(ip_unit()))
    both = service.generate(request(ip_unit(), loras=lora))
    assert np.abs(pixels(both) - pixels(with_lora)).mean() > 1
    assert np.abs(pixels(both) - pixels(unit_only)).mean() > 1
    assert np.array_equal(pixels(service.generate(request(loras=lora))), pixels(with_lora))


def test_module_and_model_must_pair(service: Service) -> None:
    with pytest.raises(LorastackError, match="is an IP-Adapter") as refused:
        service.generate(request(ip_unit(module="canny")))
    assert refused.value.field == "controlnet[0].module"


def test_adapter_for_another_family_is_refused(service: Service) -> None:
    with pytest.raises(LorastackError, match="another model family") as refused:
        service.generate(request(ip_unit(model="tiny-ip-xl")))
    assert refused.value.field == "controlnet[0].model"


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, written out: [B, n, C] -> [B, n, C]."""
    batch, n, channels = q.shape
    d = channels // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(batch, x.shape[1], heads, d).permute(0, 2, 1, 3)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / d**0.5, dim=-1)
    return (weights @ split(v)).permute(0, 2, 1, 3).reshape(batch, n, channels)


def test_injected_attention_is_decoupled_cross_attention(
    tiny_sd1: LoadedModel, ip_dir: Path
) -> None:
    unet = tiny_sd1.pipe.unet
    path = ip_dir / "ControlNet" / "tiny-ip.safetensors"
    stat = path.stat()
    entry = ControlNetEntry("tiny-ip.safetensors", path, stat.st_size, stat.st_mtime_ns)
    state = AdapterTokens()
    processors = decoupled_processors(unet, [load_ipadapter(entry, unet)], state)
    file = tiny_ipadapter(unet, 1)
    modules = dict(unet.named_modules())
    generator = torch.Generator().manual_seed(4)
    for position in (0, len(cross_attention_names(unet)) - 1):
        name = cross_attention_names(unet)[position]
        attn = modules[name.removesuffix(".processor")]
        channels, width = attn.to_k.weight.shape
        hidden = torch.randn(2, 16, channels, generator=generator)
        text = torch.randn(2, 7, width, generator=generator)
        tokens = torch.randn(2, TOKENS, width, generator=generator)
        state.tokens, state.scales = [tokens], [0.6]
        with torch.no_grad(), installed(unet, processors):
            made = attn(hidden, encoder_hidden_states=text)
        with torch.no_grad():
            q = hidden @ attn.to_q.weight.T
            k_text, v_text = text @ attn.to_k.weight.T, text @ attn.to_v.weight.T
            key = file[f"ip_adapter.{2 * position + 1}.to_k_ip.weight"]
            value = file[f"ip_adapter.{2 * position + 1}.to_v_ip.weight"]
            k_img, v_img = tokens @ key.T, tokens @ value.T
            mixed = heads_attention(q, k_text, v_text, attn.heads)
            mixed = mixed + 0.6 * heads_attention(q, k_img, v_img, attn.heads)
            expected = mixed @ attn.to_out[0].weight.T + attn.to_out[0].bias
            plain = attn(hidden, encoder_hidden_states=text)  # processors put back
        torch.testing.assert_close(made, expected, rtol=1e-4, atol=1e-5)
        text_only = heads_attention(q, k_text, v_text, attn.heads)
        text_only = text_only @ attn.to_out[0].weight.T + attn.to_out[0].bias
        torch.testing.assert_close(plain, text_only, rtol=1e-4, atol=1e-5)
        assert (made - plain).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("name", "seed", "family"), [("tiny-ip-plus", 4, "sd1"), ("tiny-ip-plus-xl", 5, "sdxl")]
)
def test_plus_projection_equals_diffusers_resampler(
    tiny_sd1: LoadedModel,
    tiny_sdxl: LoadedModel,
    ip_dir: Path,
    name: str,
    seed: int,
    family: str,
) -> None:
    """Our Resampler on the published keys equals diffusers' IPAdapterPlusImageProjection
    built by diffusers' own converter from the same file (SD1 and SDXL widths)."""
    unet = (tiny_sd1 if family == "sd1" else tiny_sdxl).pipe.unet
    path = ip_dir / "ControlNet" / f"{name}.safetensors"
    stat = path.stat()
    entry = ControlNetEntry(path.name, path, stat.st_size, stat.st_mtime_ns)
    adapter = load_ipadapter(entry, unet)
    assert adapter.reads == HIDDEN_STATES and adapter.tokens == TOKENS
    image_proj = image_proj_of(tiny_plus(unet, seed))
    oracle = unet._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False)
    assert type(oracle).__name__ == "IPAdapterPlusImageProjection"
    hidden = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        made, expected = adapter.projection(hidden), oracle.eval()(hidden)
    assert made.shape == (2, TOKENS, int(unet.config.cross_attention_dim))
    torch.testing.assert_close(made, expected, rtol=1e-4, atol=1e-5)
    assert made.std() > 0.1  # not a constant the comparison would pass by itself


def test_plus_unit_changes_the_image_and_weight_zero_does_not(service: Service) -> None:
    alone = service.generate(request())
    plus = {"model": "tiny-ip-plus"}
    made = service.generate(request(ip_unit(**plus)))
    assert np.abs(pixels(made) - pixels(alone)).mean() > 1
    other = service.generate(request(ip_unit(image=control_image(seed=7), **plus)))
    assert not np.array_equal(pixels(other), pixels(made))  # the image matters
    zero = service.generate(request(ip_unit(weight=0.0, **plus)))
    assert np.array_equal(pixels(zero), pixels(alone))
    assert "Model: tiny-ip-plus [" in made.infotexts[0]


@pytest.mark.parametrize(
    ("name", "make", "seed"), [("tiny-ip-plus", tiny_plus, 4), ("tiny-ip-full-face", tiny_full, 6)]
)
def test_tokens_come_from_the_penultimate_hidden_states(
    service: Service, tiny_sd1: LoadedModel, ip_dir: Path, name: str, make: Any, seed: int
) -> None:
    """A Plus or Full-face unit's tokens: diffusers' projection of the encoder's
    hidden_states[-2] for the image (cond) and for an all-zero input (uncond), as
    sd-webui-controlnet feeds them (it runs both kinds as "plus" models)."""
    unet = tiny_sd1.pipe.unet
    entry = service.folders.resolve("controlnet", name)
    source = np.asarray(control_image())
    prepared = prepare_adapter(
        0,
        ip_unit(model=name),
        entry,
        find_preprocessor("ip-adapter_clip_sd15"),
        source,
        service.folders,
        ControlNetCache(),
        unet,
        torch.device("cpu"),
    )
    encoder = CLIPVisionModelWithProjection.from_pretrained(
        ip_dir / "clip_vision" / "tiny-clip-h", local_files_only=True
    ).eval()
    image_proj = image_proj_of(make(unet, seed))
    oracle = unet._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False)
    pixel_values = clip_pixels(source, 32)
    with torch.no_grad():
        hidden = encoder(pixel_values=pixel_values, output_hidden_states=True).hidden_states
        blank = encoder(
            pixel_values=torch.zeros_like(pixel_values), output_hidden_states=True
        ).hidden_states
        cond, uncond = oracle.eval()(hidden[-2]), oracle(blank[-2])
        last = oracle(hidden[-1])
    torch.testing.assert_close(prepared.cond.float(), cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(prepared.uncond.float(), uncond, rtol=1e-4, atol=1e-5)
    assert (prepared.cond.float() - last).abs().max() > 1e-3  # the layer matters


def test_full_face_projection_equals_diffusers_mlp(tiny_sd1: LoadedModel, ip_dir: Path) -> None:
    """Our Full-face projection on the published keys equals diffusers'
    IPAdapterFullImageProjection built by diffusers' own converter from the same weights."""
    unet = tiny_sd1.pipe.unet
    path = ip_dir / "ControlNet" / "tiny-ip-full-face.safetensors"
    stat = path.stat()
    entry = ControlNetEntry(path.name, path, stat.st_size, stat.st_mtime_ns)
    adapter = load_ipadapter(entry, unet)
    assert adapter.reads == HIDDEN_STATES and adapter.tokens is None
    image_proj = image_proj_of(tiny_full(unet, 6))
    oracle = unet._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False)
    assert type(oracle).__name__ == "IPAdapterFullImageProjection"
    hidden = torch.randn(2, 17, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        made, expected = adapter.projection(hidden), oracle.eval()(hidden)
    assert made.shape == (2, 17, int(unet.config.cross_attention_dim))  # a token per state
    torch.testing.assert_close(made, expected, rtol=1e-4, atol=1e-5)
    assert made.std() > 0.1


def test_full_face_unit_changes_the_image_and_weight_zero_does_not(service: Service) -> None:
    alone = service.generate(request())
    full = {"model": "tiny-ip-full-face"}
    made = service.generate(request(ip_unit(**full)))
    assert np.abs(pixels(made) - pixels(alone)).mean() > 1
    other = service.generate(request(ip_unit(image=control_image(seed=7), **full)))
    assert not np.array_equal(pixels(other), pixels(made))  # the image matters
    zero = service.generate(request(ip_unit(weight=0.0, **full)))
    assert np.array_equal(pixels(zero), pixels(alone))
    assert "Module: ip-adapter_clip_sd15, Model: tiny-ip-full-face [" in made.infotexts[0]


def test_largest_face_embedding_reads_bgr_and_picks_the_largest_face() -> None:
    """sd-webui-controlnet's `InsightFaceModel.run_model`: the image goes to insightface as
    BGR, the largest face (by box area) is taken, and no face is an error."""
    app = FaceApp()
    image = np.asarray(control_image())
    embedding = largest_face_embedding(app, image)
    assert np.array_equal(app.seen[0], image[:, :, ::-1])
    assert np.array_equal(embedding, app.get(image[:, :, ::-1])[1].normed_embedding)
    empty = SimpleNamespace(get=lambda image: [])
    with pytest.raises(NoFaceError, match="no face"):
        largest_face_embedding(empty, image)


def test_faceid_unusable_without_insightface_names_what_it_needs(
    service: Service, tmp_path: Path
) -> None:
    """With insightface's own loader, a FaceID adapter is usable only when the package
    imports and buffalo_l's files are there; otherwise listed unusable naming both."""
    bare = Annotators([tmp_path])  # no annotators/insightface there
    listed = {e.relpath: e for e in listed_models(service.folders, bare)}
    reason = listed["tiny-ip-faceid.safetensors"].error or ""
    assert "det_10g.onnx, w600k_r50.onnx" in reason
    assert "annotators/insightface/models/buffalo_l" in reason
    absent = any(importlib.util.find_spec(n) is None for n in ("insightface", "onnxruntime"))
    assert ("pip install insightface onnxruntime" in reason) == absent
    assert listed["tiny-ip.safetensors"].error is None  # other adapters do not need it


def test_faceid_projection_equals_diffusers(tiny_sd1: LoadedModel, ip_dir: Path) -> None:
    """Our FaceID projection on the published keys equals diffusers'
    IPAdapterFaceIDImageProjection built by diffusers' own converter from the same weights."""
    unet = tiny_sd1.pipe.unet
    path = ip_dir / "ControlNet" / "tiny-ip-faceid.safetensors"
    stat = path.stat()
    adapter = load_ipadapter(ControlNetEntry(path.name, path, stat.st_size, stat.st_mtime_ns), unet)
    assert adapter.reads == FACE_EMBEDDING and adapter.tokens == TOKENS
    image_proj = image_proj_of(tiny_faceid(unet, 7))
    oracle = unet._convert_ip_adapter_image_proj_to_diffusers(image_proj, low_cpu_mem_usage=False)
    assert type(oracle).__name__ == "IPAdapterFaceIDImageProjection"
    embedding = torch.randn(2, FACE, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        made, expected = adapter.projection(embedding), oracle.eval()(embedding)
    assert made.shape == (2, TOKENS, int(unet.config.cross_attention_dim))
    torch.testing.assert_close(made, expected, rtol=1e-4, atol=1e-5)
    assert made.std() > 0.1


def test_faceid_tokens_are_the_projected_face_embedding(
    service: Service, tiny_sd1: LoadedModel
) -> None:
    """A FaceID unit's tokens: diffusers' projection of the face embedding the face models
    give for the unit's image (cond) and of a zero embedding (uncond)."""
    unet = tiny_sd1.pipe.unet
    faces = StandInFaces()
    source = np.asarray(control_image())
    prepared = prepare_adapter(
        0,
        ip_unit(module="ip-adapter_face_id", model="tiny-ip-faceid"),
        service.folders.resolve("controlnet", "tiny-ip-faceid"),
        find_preprocessor("ip-adapter_face_id"),
        source,
        service.folders,
        ControlNetCache(),
        unet,
        torch.device("cpu"),
        Annotators(service.folders.roots["controlnet"], faces=faces),
    )
    oracle = unet._convert_ip_adapter_image_proj_to_diffusers(
        image_proj_of(tiny_faceid(unet, 7)), low_cpu_mem_usage=False
    ).eval()
    face = torch.from_numpy(faces.app.get(source[:, :, ::-1])[1].normed_embedding)[None]
    with torch.no_grad():
        cond, uncond = oracle(face), oracle(torch.zeros_like(face))
    torch.testing.assert_close(prepared.cond.float(), cond, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(prepared.uncond.float(), uncond, rtol=1e-4, atol=1e-5)


def test_faceid_unit_changes_the_image_and_weight_zero_does_not(service: Service) -> None:
    alone = service.generate(request())
    face = {"module": "ip-adapter_face_id", "model": "tiny-ip-faceid"}
    made = service.generate(request(ip_unit(**face)))
    assert np.abs(pixels(made) - pixels(alone)).mean() > 1
    other = service.generate(request(ip_unit(image=control_image(seed=7), **face)))
    assert not np.array_equal(pixels(other), pixels(made))  # the face matters
    zero = service.generate(request(ip_unit(weight=0.0, **face)))
    assert np.array_equal(pixels(zero), pixels(alone))
    assert "Module: ip-adapter_face_id, Model: tiny-ip-faceid [" in made.infotexts[0]


def test_faceid_image_without_a_face_is_refused_naming_it(service: Service) -> None:
    flat = Image.new("RGB", (64, 64), (90, 90, 90))
    face = {"module": "ip-adapter_face_id", "model": "tiny-ip-faceid"}
    with pytest.raises(InvalidRequestError, match="no face") as refused:
        service.generate(request(ip_unit(image=flat, **face)))
    assert refused.value.field == "controlnet[0].image"


def test_faceid_and_clip_modules_must_pair(service: Service) -> None:
    with pytest.raises(LorastackError, match="its module is ip-adapter_face_id") as refused:
        service.generate(request(ip_unit(model="tiny-ip-faceid")))
    assert refused.value.field == "controlnet[0].module"
    with pytest.raises(LorastackError, match="an ip-adapter_clip_. module") as refused:
        service.generate(request(ip_unit(module="ip-adapter_face_id")))
    assert refused.value.field == "controlnet[0].module"


def test_faceid_published_as_a_pickle_runs_as_its_safetensors_form(service: Service) -> None:
    """h94 publishes FaceID adapters as `.bin` pickles of two dicts: read with weights_only
    when a unit first names one with an IP-Adapter module, then listed as what it is."""
    listed = {e.relpath: e for e in service.controlnet_models()}
    assert listed["tiny-ip-faceid-published.bin"].layout is None  # not read at scan
    face = {"module": "ip-adapter_face_id"}
    from_pickle = service.generate(request(ip_unit(model="tiny-ip-faceid-published", **face)))
    from_safetensors = service.generate(request(ip_unit(model="tiny-ip-faceid", **face)))
    assert np.array_equal(pixels(from_pickle), pixels(from_safetensors))
    learnt = {e.relpath: e for e in service.controlnet_models()}["tiny-ip-faceid-published.bin"]
    assert learnt.layout == "ipadapter" and learnt.error is None
