"""Single-file and diffusers-folder loading through the one real loader, offline."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.architecture import Architecture, detect_architecture, is_v_from_probe
from pipelines.errors import UnusableFileError
from pipelines.loading import (
    CONFIGS_DIR,
    LoadedModel,
    load_diffusers_folder,
    load_single_file,
    read_model_spec,
)
from pipelines.safeload import load_state_dict

PROJECT = Path(__file__).resolve().parent.parent


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _image(pipe, seed: int = 3):
    out = pipe(
        "a red house",
        num_inference_steps=2,
        width=64,
        height=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return out.images


@pytest.mark.parametrize("name", ["tiny-sd1.safetensors", "xl/tiny-sdxl.safetensors"])
def test_single_file_round_trip(
    models_dir: Path, cache_root: Path, tiny_sd1: LoadedModel, tiny_sdxl: LoadedModel, name: str
) -> None:
    path = models_dir / name
    reference = tiny_sdxl if "sdxl" in name else tiny_sd1
    loaded = load_single_file(path, load_state_dict(path), cache_root)
    assert loaded.architecture is reference.architecture
    assert any("sidecar" in note for note in loaded.notes)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(reference.pipe, component, None) is not None:
            _same_weights(getattr(loaded.pipe, component), getattr(reference.pipe, component))
    assert (_image(loaded.pipe) == _image(reference.pipe)).all()


def test_diffusers_folder(models_dir: Path, tiny_sd1: LoadedModel) -> None:
    loaded = load_diffusers_folder(models_dir / "tiny-sd1-diffusers")
    assert loaded.architecture is Architecture.SD1
    _same_weights(loaded.pipe.unet, tiny_sd1.pipe.unet)
    _same_weights(loaded.pipe.text_encoder, tiny_sd1.pipe.text_encoder)


def test_shape_mismatch_names_tensor(models_dir: Path, tmp_path: Path, cache_root: Path) -> None:
    state = load_file(models_dir / "tiny-sd1.safetensors")
    key = "model.diffusion_model.out.2.weight"
    state[key] = torch.zeros(4, 16, 3, 3)
    bad = tmp_path / "bad.safetensors"
    save_file(state, bad)
    (tmp_path / "bad.yaml").write_text((models_dir / "tiny-sd1.yaml").read_text())
    (tmp_path / "demo-tiny-clip").symlink_to(models_dir / "demo-tiny-clip")
    with pytest.raises(UnusableFileError) as caught:
        load_single_file(bad, state, cache_root)
    message = caught.value.message
    assert "bad.safetensors" in message
    assert "conv_out.weight" in message
    assert "(4, 16, 3, 3)" in message and "(4, 32, 3, 3)" in message


def test_missing_tensor_is_refused(models_dir: Path, tmp_path: Path, cache_root: Path) -> None:
    state = load_file(models_dir / "tiny-sd1.safetensors")
    del state["first_stage_model.decoder.conv_out.bias"]
    path = tmp_path / "holey.safetensors"
    (tmp_path / "holey.yaml").write_text((models_dir / "tiny-sd1.yaml").read_text())
    (tmp_path / "demo-tiny-clip").symlink_to(models_dir / "demo-tiny-clip")
    with pytest.raises(UnusableFileError, match="VAE.*missing.*conv_out.bias"):
        load_single_file(path, state, cache_root)


def test_lora_in_models_folder_is_named() -> None:
    shapes = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320)}
    with pytest.raises(ValueError, match="looks like a LoRA"):
        detect_architecture(shapes, source="x.safetensors")


@pytest.mark.parametrize(
    ("mean", "is_v"), [(-1.5, True), (-1.0001, True), (-0.99, False), (0.0, False), (3.0, False)]
)
def test_sd2_v_probe_threshold(mean: float, is_v: bool) -> None:
    assert is_v_from_probe(mean) is is_v


def test_sd2_probe_decides_on_constructed_unet(cache_root: Path, tmp_path: Path) -> None:
    """The probe reads the UNet's answer: a UNet whose output is -2 everywhere is v."""
    from pipelines.architecture import probe_v_prediction
    from pipelines.loading import random_modules

    spec = read_model_spec(CONFIGS_DIR / "demo-tiny.yaml")
    unet = random_modules(spec, 0)["unet"]
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(-2.0)
    assert probe_v_prediction(unet)[0] is True
    with torch.no_grad():
        unet.conv_out.bias.fill_(0.4)
    assert probe_v_prediction(unet)[0] is False


def test_loading_never_touches_network(models_dir: Path, tmp_path: Path) -> None:
    """A fresh process with an empty HF_HOME and every socket connect refused loads both
    single files and the diffusers folder."""
    script = textwrap.dedent(f"""
        import socket
        def refuse(*args, **kwargs):
            raise OSError("network access attempted: " + repr(args))
        socket.socket.connect = refuse
        socket.create_connection = refuse
        from pathlib import Path
        from pipelines.loading import load_single_file, load_diffusers_folder
        from pipelines.safeload import load_state_dict
        models = Path({str(models_dir)!r})
        cache = Path({str(tmp_path / "cache")!r})
        for name in ("tiny-sd1.safetensors", "xl/tiny-sdxl.safetensors"):
            path = models / name
            print(load_single_file(path, load_state_dict(path), cache).architecture.value)
        print(load_diffusers_folder(models / "tiny-sd1-diffusers").architecture.value)
    """)
    env = {
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONPATH": str(PROJECT),
    }
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["SD1", "SDXL", "SD1"]


def test_sdxl_with_equal_text_encoder_widths(tmp_path: Path, cache_root: Path) -> None:
    """diffusers' own single-file dispatch loads CLIP-L into text_encoder_2 when both encoders
    are equally wide; the explicit per-encoder prefixes here keep them apart."""
    from pipelines.loading import random_pipeline
    from tests.conftest import FIXTURES
    from tests.ldm_export import save_single_file

    clip_g = tmp_path / "clip-g-32"
    clip_g.mkdir()
    config = (FIXTURES / "tiny-clip-g" / "config.json").read_text()
    (clip_g / "config.json").write_text(config.replace('"hidden_size": 40', '"hidden_size": 32'))
    yaml_text = (FIXTURES / "tiny-sdxl.yaml").read_text()
    yaml_text = yaml_text.replace("version: tiny-clip-g", "version: clip-g-32")
    yaml_text = yaml_text.replace(
        "../../pipelines/configs/demo-tiny-clip", str(CONFIGS_DIR / "demo-tiny-clip")
    )
    yaml_text = yaml_text.replace("context_dim: 72", "context_dim: 64")
    sidecar = tmp_path / "equal.yaml"
    sidecar.write_text(yaml_text)
    reference = random_pipeline(sidecar, 1, cache_root)
    path = tmp_path / "equal.safetensors"
    save_single_file(reference.pipe, path)
    loaded = load_single_file(path, load_state_dict(path), cache_root)
    _same_weights(loaded.pipe.text_encoder, reference.pipe.text_encoder)
    _same_weights(loaded.pipe.text_encoder_2, reference.pipe.text_encoder_2)
