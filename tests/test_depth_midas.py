"""`depth_midas` (MiDaS v3 DPT-Hybrid through transformers) with a tiny DPT-Hybrid built here
from a small seeded `DPTConfig` and saved as a transformers folder in a temporary
`annotators/midas/`: its map against transformers' own `predicted_depth` normalised by
hand, listing, `/controlnet/detect`, a unit, and refusal of wrong or corrupt files. A second
tiny model is written in the original MiDaS key layout (sd-webui-controlnet's
`dpt_hybrid-midas-501f0c75.pt`, built key by key here) and must give the same depth.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from frontends.api.routes import build_controlnet_api
from frontends.page.controlnet_panel import unavailable_text
from pipelines.controlnet.annotators import Annotators
from pipelines.controlnet.preprocessors import fit_map
from pipelines.errors import InvalidRequestError, UnusableFileError
from pipelines.loading import LoadedModel
from pipelines.schema import ControlNetUnit, GenerationRequest
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests.test_controlnet import tiny_controlnet

SIZE = 64  # the tiny model's image_size, a multiple of 64: no padding, no resizing


def seeded_dpt_hybrid(
    bit: dict[str, Any], seed: int, scale: float, *, sharp_attention: bool = False, **dpt: Any
) -> Any:
    """A DPT-Hybrid depth model at SIZE: a BiT backbone of the `bit` widths, the `dpt`
    fields over the choices both test models share, weights drawn from `seed` times
    `scale` (attention queries and keys at `scale` 1 when `sharp_attention` is set)."""
    from transformers import DPTConfig, DPTForDepthEstimation

    backbone = {
        "global_padding": "same",
        "layer_type": "bottleneck",
        "embedding_dynamic_padding": True,
        "out_features": ["stage1", "stage2", "stage3"],
        **bit,
    }
    config = DPTConfig(
        is_hybrid=True,
        backbone_config=backbone,
        backbone_featmap_shape=[1, bit["hidden_sizes"][-1], SIZE // 16, SIZE // 16],
        image_size=SIZE,
        patch_size=16,
        fusion_hidden_size=16,
        reassemble_factors=[1, 1, 1, 0.5],
        readout_type="project",
        use_batch_norm_in_fusion_residual=False,
        **dpt,
    )
    torch.manual_seed(0)
    model = DPTForDepthEstimation(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            sharp = sharp_attention and (".query." in name or ".key." in name)
            drawn = torch.randn(parameter.shape, generator=generator)
            parameter.copy_(drawn * (1.0 if sharp else scale))
    return model


def tiny_dpt_hybrid() -> Any:
    """A DPT-Hybrid depth model (BiT stem and three stages, 4 ViT layers), weights drawn
    with a fixed seed and widened so the depth varies over the image."""
    bit = {"depths": [1, 1, 1], "hidden_sizes": [8, 16, 32], "embedding_size": 8, "num_groups": 4}
    return seeded_dpt_hybrid(
        bit,
        seed=1,
        scale=0.3,
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        backbone_out_indices=[0, 1, 2, 3],
        neck_hidden_sizes=[8, 16, 16, 16],
    )


@pytest.fixture(scope="module")
def dpt() -> Any:
    return tiny_dpt_hybrid()


@pytest.fixture(scope="module")
def controlnet_dir(
    tmp_path_factory: pytest.TempPathFactory, dpt: Any, tiny_sd1: LoadedModel
) -> Path:
    folder = tmp_path_factory.mktemp("depth-ControlNet")
    dpt.save_pretrained(folder / "annotators" / "midas")
    tiny_controlnet(tiny_sd1.pipe.unet, 1).save_pretrained(folder / "tiny-cn")
    return folder


@pytest.fixture(scope="module")
def annotators(controlnet_dir: Path) -> Annotators:
    return Annotators([controlnet_dir])  # loads the model once for the module


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, controlnet_dir: Path
) -> Service:
    data = tmp_path_factory.mktemp("depth-data")
    settings = Settings(
        data_dir=data, ckpt_dirs=(models_dir,), controlnet_dir=controlnet_dir, threads=2
    )
    made = build_service(settings)
    made.folders.hash_missing()
    return made


def scene(width: int = SIZE, height: int = SIZE) -> np.ndarray:
    """A gradient with a bright square: something with depth cues."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=2)
    image[height // 4 : height // 2, width // 4 : width // 2] = 255
    return image.astype(np.uint8)


def by_hand(dpt: Any, image: np.ndarray) -> np.ndarray:
    """sd-webui-controlnet's `apply_midas` on a 64x64 image at resolution 64: transformers'
    predicted depth of pixels / 127.5 - 1, min..max -> 0..255, three channels."""
    pixels = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        depth = dpt(pixel_values=pixels).predicted_depth[0].numpy()
    depth = (depth - depth.min()) / (depth.max() - depth.min())
    grey = (depth * 255.0).clip(0, 255).astype(np.uint8)
    return np.stack([grey] * 3, axis=2)


def test_map_is_transformers_depth_normalised(dpt: Any, annotators: Annotators) -> None:
    module = annotators.find("depth_midas")
    made = module(scene(), SIZE, -1, -1)
    expected = by_hand(dpt, scene())
    assert made.shape == (SIZE, SIZE, 3) and made.dtype == np.uint8
    assert len(np.unique(expected)) > 20  # the tiny model's depth does vary
    assert np.abs(made.astype(int) - expected.astype(int)).max() <= 1


def test_other_sizes_are_padded_and_cut_back(annotators: Annotators) -> None:
    module = annotators.find("depth_midas")
    made = module(scene(96, 64), SIZE, -1, -1)  # padded to 64x128 for the model
    assert made.shape == (64, 96, 3)
    assert made.min() == 0 or made.max() == 255  # normalised before the cut


def test_listing_says_what_is_needed(tmp_path: Path, controlnet_dir: Path) -> None:
    ready = Annotators([tmp_path, controlnet_dir])  # the first root has no annotators
    assert "depth_midas" in [p.name for p in ready.modules()]
    assert [name for name, _ in ready.unavailable()] == ["openpose"]
    assert "body_pose_model.pth" in dict(ready.unavailable())["openpose"]  # not in this folder
    empty = Annotators([tmp_path])
    assert "depth_midas" not in [p.name for p in empty.modules()]
    reason = dict(empty.unavailable())["depth_midas"]
    assert "config.json, model.safetensors" in reason and "annotators/midas/" in reason
    with pytest.raises(InvalidRequestError, match="config.json") as refused:
        empty.find("depth_midas", "controlnet[0].module")
    assert refused.value.field == "controlnet[0].module"
    assert "dpt_hybrid-midas-501f0c75.pt" in reason  # the other form it takes


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        (lambda f: (f / "model.safetensors").write_bytes(b"\x10\x00"), "model.safetensors"),
        (lambda f: (f / "config.json").write_text("{not json"), "config.json"),
        (
            lambda f: (f / "config.json").write_text(json.dumps({"model_type": "dpt"})),
            "is_hybrid",
        ),
    ],
)
def test_a_wrong_or_corrupt_file_is_refused_naming_it(
    tmp_path: Path, controlnet_dir: Path, spoil: Any, named: str
) -> None:
    folder = tmp_path / "annotators" / "midas"
    shutil.copytree(controlnet_dir / "annotators" / "midas", folder)
    spoil(folder)
    annotators = Annotators([tmp_path])
    reason = dict(annotators.unavailable())["depth_midas"]
    assert f"{tmp_path.name}/annotators/midas/" in reason and named in reason
    assert str(tmp_path.parent) not in reason  # no host path for clients
    with pytest.raises(InvalidRequestError, match=named):
        annotators.find("depth_midas")


def test_weights_that_do_not_fit_the_config_are_refused_naming_them(
    tmp_path: Path, controlnet_dir: Path
) -> None:
    folder = tmp_path / "annotators" / "midas"
    shutil.copytree(controlnet_dir / "annotators" / "midas", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "fusion_hidden_size": 8}))
    module = Annotators([tmp_path]).find("depth_midas")  # the header alone looks right
    with pytest.raises(UnusableFileError, match="midas/model.safetensors does not fit"):
        module(scene(), SIZE, -1, -1)


def test_service_lists_and_detects(service: Service, dpt: Any) -> None:
    names = [p.name for p in service.controlnet_modules()]
    assert "depth_midas" in names
    assert names.index("depth_midas") == names.index("tile_resample") + 2  # priority 100
    assert [name for name, _ in service.controlnet_unavailable_modules()] == ["openpose"]
    assert service.annotators is service.runner.annotators  # type: ignore[attr-defined]
    listed = pickle.loads(pickle.dumps(service.controlnet_modules()))  # answers pickle
    assert "depth_midas" in [p.name for p in listed]
    notes = unavailable_text(service)  # the page's "Not usable here"
    assert "`openpose`" in notes and "depth_midas" not in notes


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[TestClient]:
    with TestClient(build_controlnet_api(service, service.settings)) as made:
        yield made


def test_detect_route_returns_the_map(client: TestClient, annotators: Annotators) -> None:
    buffer = io.BytesIO()
    Image.fromarray(scene()).save(buffer, format="PNG")
    body = {
        "controlnet_module": "depth_midas",
        "controlnet_input_images": [base64.b64encode(buffer.getvalue()).decode()],
        "controlnet_processor_res": 128,  # the slider's minimum
    }
    answer = client.post("/detect", json=body)
    assert answer.status_code == 200, answer.text
    image = Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0])))
    made = np.asarray(image.convert("RGB"))
    expected = annotators.find("depth_midas")(scene(), 128, -1, -1)
    assert made.shape == (128, 128, 3) and np.array_equal(made, expected)
    listed = client.get("/module_list").json()["module_list"]
    assert "depth_midas" in listed


def test_a_unit_uses_the_engines_model(service: Service, annotators: Annotators) -> None:
    depth = ControlNetUnit(
        image=Image.fromarray(scene()),
        module="depth_midas",
        model="tiny-cn",
        processor_res=128,
        resize_mode="Just Resize",
    )
    request = GenerationRequest(
        prompt="a room", steps=2, seed=3, width=64, height=64, checkpoint="tiny-sd1"
    )
    result = service.generate(replace(request, controlnet=(depth,)))
    detected = annotators.find("depth_midas")(scene(), 128, -1, -1)
    expected = fit_map(detected, "Just Resize", 64, 64)
    assert np.array_equal(np.asarray(result.detected_maps[0].convert("RGB")), expected)
    assert "Module: depth_midas" in result.infotexts[0]
    engine = service.runner.annotators  # type: ignore[attr-defined]
    assert len(engine._models) == 1  # loaded once, for detection and units alike


# ------------------------------------------------------------------ the original MiDaS file


def tiny_midas_like() -> Any:
    """A DPT-Hybrid with the published file's fixed choices (12 heads, 12 layers feeding
    the neck from 2, 5, 8, 11; BiT with 32 groups) and small widths; queries and keys
    drawn large, so attention is far from uniform and a query/key mix-up changes the map."""
    return seeded_dpt_hybrid(
        {"depths": [1, 2, 1], "hidden_sizes": [128, 256, 512], "embedding_size": 32},
        seed=2,
        scale=0.3,
        sharp_attention=True,
        hidden_size=24,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=48,
        backbone_out_indices=[2, 5, 8, 11],
        neck_hidden_sizes=[128, 256, 24, 24],
    )


def original_key(key: str) -> str:
    """transformers' DPT-Hybrid name -> the original MiDaS name (the inverse of
    transformers' conversion script), written out case by case."""
    vit, bit = "pretrained.model.", "pretrained.model.patch_embed.backbone."
    fixed = {
        "dpt.embeddings.cls_token": vit + "cls_token",
        "dpt.embeddings.position_embeddings": vit + "pos_embed",
    }
    if key in fixed:
        return fixed[key]
    parts = key.split(".")
    tail = parts[-1]
    if key.startswith("dpt.embeddings.projection."):
        return f"{vit}patch_embed.proj.{tail}"
    if key.startswith("dpt.embeddings.backbone.bit.embedder."):
        return bit + ("stem.conv." if parts[5] == "convolution" else "stem.norm.") + tail
    if key.startswith("dpt.embeddings.backbone.bit.encoder.stages."):
        stage, block, rest = parts[6], parts[8], ".".join(parts[9:])
        return f"{bit}stages.{stage}.blocks.{block}.{rest}"
    if key.startswith("dpt.encoder.layer."):
        block, rest = parts[3], ".".join(parts[4:-1])
        names = {
            "attention.output.dense": "attn.proj",
            "intermediate.dense": "mlp.fc1",
            "output.dense": "mlp.fc2",
            "layernorm_before": "norm1",
            "layernorm_after": "norm2",
        }
        return f"{vit}blocks.{block}.{names[rest]}.{tail}"
    if key.startswith("dpt.layernorm."):
        return f"{vit}norm.{tail}"
    if key.startswith("neck.reassemble_stage.readout_projects."):
        return f"pretrained.act_postprocess{int(parts[3]) + 1}.0.project.0.{tail}"
    if key.startswith("neck.reassemble_stage.layers."):
        index = {"projection": 3, "resize": 4}[parts[4]]
        return f"pretrained.act_postprocess{int(parts[3]) + 1}.{index}.{tail}"
    if key.startswith("neck.convs."):
        return f"scratch.layer{int(parts[2]) + 1}_rn.{tail}"
    if key.startswith("neck.fusion_stage.layers."):
        refinenet = f"scratch.refinenet{4 - int(parts[3])}"
        if parts[4] == "projection":
            return f"{refinenet}.out_conv.{tail}"
        unit, conv = parts[4][-1], parts[5][-1]
        return f"{refinenet}.resConfUnit{unit}.conv{conv}.{tail}"
    if key.startswith("head.head."):
        return f"scratch.output_conv.{parts[2]}.{tail}"
    raise AssertionError(f"no original name for {key}")


def original_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's tensors as MiDaS saves them: original names, fused qkv per block, and
    timm's classifier head (which the conversion drops)."""
    state: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in model.state_dict().items():
        if ".attention.attention." in key:
            parts = key.split(".")
            target = f"pretrained.model.blocks.{parts[3]}.attn.qkv.{parts[-1]}"
            fused.setdefault(target, {})[parts[-2]] = value
            continue
        state[original_key(key)] = value.clone()
    for target, parts in fused.items():
        state[target] = torch.cat([parts["query"], parts["key"], parts["value"]])
    state["pretrained.model.head.weight"] = torch.zeros(2, 24)
    state["pretrained.model.head.bias"] = torch.zeros(2)
    return state


def test_the_original_midas_file_gives_the_same_depth(tmp_path: Path) -> None:
    model = tiny_midas_like()
    folder = tmp_path / "annotators" / "midas"
    folder.mkdir(parents=True)
    torch.save(original_state(model), folder / "dpt_hybrid-midas-501f0c75.pt")
    annotators = Annotators([tmp_path])
    assert "depth_midas" in [p.name for p in annotators.modules()]
    made = annotators.find("depth_midas")(scene(), SIZE, -1, -1)
    expected = by_hand(model, scene())
    assert len(np.unique(expected)) > 20
    assert np.abs(made.astype(int) - expected.astype(int)).max() <= 1


def test_a_wrong_original_file_is_refused_naming_it(tmp_path: Path) -> None:
    folder = tmp_path / "annotators" / "midas"
    folder.mkdir(parents=True)
    original = folder / "dpt_hybrid-midas-501f0c75.pt"
    original.write_bytes(b"not a checkpoint")
    annotators = Annotators([tmp_path])
    reason = dict(annotators.unavailable())["depth_midas"]
    assert "annotators/midas/dpt_hybrid-midas-501f0c75.pt: not a torch checkpoint" in reason
    torch.save({"weight": torch.zeros(1)}, original)  # a checkpoint, not MiDaS
    module = annotators.find("depth_midas")
    with pytest.raises(UnusableFileError, match="dpt_hybrid-midas-501f0c75.pt is not MiDaS"):
        module(scene(), SIZE, -1, -1)
