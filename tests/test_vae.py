"""External VAEs (A1111's `sd_vae`): every file layout loads offline into the model's VAE,
the baked-in VAE comes back afterwards, another family's VAE is refused with the reason,
and a half-precision decode that overflows is redone in float32."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file

from pipelines.errors import LorastackError
from pipelines.folders.vaes import sidecar_vae
from pipelines.infotext import parse_infotext
from pipelines.loading import LoadedModel
from pipelines.schema import GenerationRequest
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from pipelines.vae import decode_checked
from pipelines.xyz import AxisSpec, XyzPlot, run_xyz
from tests.conftest import DEMO_YAML, copy_yaml_with_clip
from tests.ldm_export import vae_to_ldm

SMALL = {"steps": 2, "sampler_name": "Euler", "seed": 5, "prompt": "a boat", "width": 64}
SMALL["height"] = 64


def vae_file_weights(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The VAE's weights as a VAE file holds them: LDM keys without `first_stage_model.`."""
    state = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    ldm = vae_to_ldm(state, dict(vae.config))
    return {k.removeprefix("first_stage_model."): v for k, v in ldm.items()}


def shifted(state: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    return {k: v + 0.3 if k == key else v for k, v in state.items()}


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel, models_dir: Path):
    """Checkpoints `vbase` and `vside` (the tiny SD1; `vside` has a brighter VAE beside it,
    `vside.vae.safetensors`), and `VAE/` with the layouts people share."""
    folder = tmp_path_factory.mktemp("vae-models")
    checkpoint = load_file(models_dir / "tiny-sd1.safetensors")
    for name in ("vbase", "vside"):
        save_file(checkpoint, folder / f"{name}.safetensors")
        copy_yaml_with_clip(DEMO_YAML, folder / f"{name}.yaml")
    vae = tiny_sd1.pipe.vae
    ldm = vae_file_weights(vae)
    brighter = shifted(ldm, "decoder.conv_out.bias")
    save_file(brighter, folder / "vside.vae.safetensors")
    vaes = folder / "VAE"
    vaes.mkdir()
    save_file(ldm, vaes / "same.safetensors")
    prefixed = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    torch.save({"state_dict": {**prefixed, "loss.logvar": torch.zeros(())}}, vaes / "same.pt")
    save_file(brighter, vaes / "brighter.safetensors")
    diffusers_keys = {k: v.detach().clone().contiguous() for k, v in vae.state_dict().items()}
    diffusers_keys["decoder.conv_out.bias"] = diffusers_keys["decoder.conv_out.bias"] + 0.3
    save_file(diffusers_keys, vaes / "brighter-diffusers-keys.safetensors")
    as_folder = AutoencoderKL(**vae.config)
    as_folder.load_state_dict(diffusers_keys)
    as_folder.save_pretrained(vaes / "brighter-folder")
    config = {**vae.config, "latent_channels": 16}
    torch.manual_seed(0)
    save_file(vae_file_weights(AutoencoderKL(**config)), vaes / "sixteen-channels.safetensors")
    save_file({"weight": torch.zeros(3)}, vaes / "not-a-vae.safetensors")
    save_file(checkpoint, vaes / "full-checkpoint.safetensors")
    return folder


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, vae_folder: Path) -> Service:
    data = tmp_path_factory.mktemp("vae-data")
    made = build_service(Settings(data_dir=data, ckpt_dirs=(vae_folder,), threads=2))
    made.folders.hash_missing()
    return made


def pixels(service: Service, **fields: object) -> tuple[np.ndarray, str]:
    values = {**SMALL, "checkpoint": "vbase", **fields}
    result = service.generate(GenerationRequest(**values))  # type: ignore[arg-type]
    return np.asarray(result.images[0], dtype=np.int16), result.infotexts[0]


def test_every_layout_is_listed_and_the_broken_ones_say_why(service: Service) -> None:
    entries = {entry.name: entry for entry in service.vaes()}
    assert set(entries) == {
        "same.safetensors",
        "same.pt",
        "brighter.safetensors",
        "brighter-diffusers-keys.safetensors",
        "brighter-folder",
        "sixteen-channels.safetensors",
        "not-a-vae.safetensors",
        "full-checkpoint.safetensors",
    }
    assert entries["brighter-folder"].kind == "diffusers"
    assert entries["sixteen-channels.safetensors"].latent_channels == 16
    assert "not a VAE" in (entries["not-a-vae.safetensors"].error or "")
    assert "full checkpoint" in (entries["full-checkpoint.safetensors"].error or "")
    # the sidecar VAE is no checkpoint, and no VAE file is listed as one
    titles = [entry.relpath for entry in service.checkpoints()]
    assert titles == ["vbase.safetensors", "vside.safetensors"], titles


def test_the_baked_in_vae_as_a_file_gives_identical_images(service: Service) -> None:
    baked, info = pixels(service, vae="None")
    assert "VAE" not in parse_infotext(info).params
    for name in ("same.safetensors", "same.pt"):
        image, info = pixels(service, vae=name)
        assert np.array_equal(image, baked), name
        params = parse_infotext(info).params
        entry = next(e for e in service.vaes() if e.name == name)
        assert params["VAE"] == name and params["VAE hash"] == entry.sha256[:10]


def test_a_changed_vae_changes_the_image_and_the_baked_in_one_comes_back(
    service: Service,
) -> None:
    baked, _ = pixels(service, vae="None")
    brighter, _ = pixels(service, vae="brighter.safetensors")
    # the decoder's last bias +0.3 in [-1, 1] space: about +0.15 of full scale, clipped
    assert (brighter - baked).mean() > 20
    for layout in ("brighter-diffusers-keys.safetensors", "brighter-folder", "brighter"):
        image, _ = pixels(service, vae=layout)
        assert np.abs(image - brighter).max() <= 1, layout
    again, _ = pixels(service, vae="Automatic")
    assert np.array_equal(again, baked)


def test_automatic_takes_the_vae_beside_the_checkpoint(service: Service, vae_folder: Path) -> None:
    assert sidecar_vae(vae_folder / "vside.safetensors") == vae_folder / "vside.vae.safetensors"
    assert sidecar_vae(vae_folder / "vbase.safetensors") is None
    brighter, _ = pixels(service, vae="brighter.safetensors")
    beside, info = pixels(service, checkpoint="vside", vae="Automatic")
    assert np.array_equal(beside, brighter)
    assert parse_infotext(info).params["VAE"] == "vside.vae.safetensors"
    own, info = pixels(service, checkpoint="vside", vae="None")
    baked, _ = pixels(service, vae="None")
    assert np.array_equal(own, baked) and "VAE" not in parse_infotext(info).params


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("sixteen-channels.safetensors", ["16 latent channels", "4", "another model family"]),
        ("not-a-vae.safetensors", ["not a VAE"]),
        ("full-checkpoint.safetensors", ["full checkpoint"]),
        ("nope.safetensors", ["unknown VAE", "nope"]),
    ],
)
def test_a_vae_that_does_not_fit_is_refused_with_the_reason(
    service: Service, name: str, words: list[str]
) -> None:
    with pytest.raises(LorastackError) as caught:
        pixels(service, vae=name)
    assert caught.value.field == "sd_vae"
    for word in words:
        assert word in caught.value.message
    baked, _ = pixels(service, vae="None")  # the model still serves, with its own VAE
    assert baked.shape == (64, 64, 3)


def test_a_half_precision_overflow_is_decoded_again_in_float32(
    tiny_sd1: LoadedModel, caplog: pytest.LogCaptureFixture
) -> None:
    vae = AutoencoderKL(**tiny_sd1.pipe.vae.config)
    vae.load_state_dict(tiny_sd1.pipe.vae.state_dict())
    with torch.no_grad():  # large enough to overflow float16 (max 65504), fine in float32
        vae.decoder.conv_in.weight.mul_(1e5)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = vae.decode(latents).sample
    assert torch.isfinite(reference).all()
    vae.to(torch.float16)

    def decode(z: torch.Tensor) -> torch.Tensor:
        return vae.decode(z.to(vae.dtype)).sample

    with torch.no_grad():
        assert torch.isnan(decode(latents.half())).any()  # the overflow is real
    with caplog.at_level(logging.WARNING, logger="pipelines.vae"):
        decoded = decode_checked(vae, decode, latents.half())
    assert "NaNs" in caplog.text and "float32" in caplog.text
    assert vae.dtype == torch.float16  # put back for the next decode
    assert torch.isfinite(decoded).all()
    # the float32 decode of the half-rounded weights and latents: within a grey level
    assert torch.allclose(decoded.float(), reference, atol=1 / 255)


def test_the_xyz_vae_axis_gives_each_cell_its_vae(service: Service) -> None:
    base = GenerationRequest(**{**SMALL, "checkpoint": "vbase"})  # type: ignore[arg-type]
    plot = XyzPlot(x=AxisSpec("VAE", "none, Brighter.safetensors"), include_lone_images=True)
    output = run_xyz(service, base, plot, user="me")
    own, _ = pixels(service, vae="None")
    brighter, _ = pixels(service, vae="brighter.safetensors")
    assert np.array_equal(np.asarray(output.images[1], dtype=np.int16), own)
    assert np.array_equal(np.asarray(output.images[2], dtype=np.int16), brighter)
    assert parse_infotext(output.infotexts[2]).params["VAE"] == "brighter.safetensors"


def test_the_cli_lists_vaes_and_takes_one(
    service: Service, vae_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from frontends.cli.__main__ import EXIT_NOT_FOUND, main

    common = ["--ckpt-dir", str(vae_folder), "--data-dir", str(tmp_path), "--threads", "2"]
    assert main(["list-vaes", *common]) == 0
    rows = {row.split("\t")[0]: row.split("\t") for row in capsys.readouterr().out.splitlines()}
    assert rows["brighter.safetensors"][1:] == ["4", rows["brighter.safetensors"][2], ""]
    assert "not a VAE" in rows["not-a-vae.safetensors"][3]
    small = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "5"]
    run = ["generate", "--prompt", "a boat", "--sampler", "Euler", *small, "--ckpt", "vbase"]
    assert main([*run, "--vae", "brighter.safetensors", *common]) == 0
    (written,) = capsys.readouterr().out.split()
    made = Image.open(written)
    assert parse_infotext(made.info["parameters"]).params["VAE"] == "brighter.safetensors"
    brighter, _ = pixels(service, vae="brighter.safetensors")
    assert np.array_equal(np.asarray(made.convert("RGB"), dtype=np.int16), brighter)
    assert main([*run, "--vae", "nope.pt", *common]) == EXIT_NOT_FOUND
    assert "nope.pt" in capsys.readouterr().err


def test_png_info_recalls_the_vae_by_hash_then_name(service: Service) -> None:
    from frontends.page.recall import recall

    _, info = pixels(service, vae="brighter.safetensors")
    assert recall(info, service).vae == "brighter.safetensors"
    renamed = info.replace("VAE: brighter.safetensors", "VAE: old-name.safetensors")
    assert recall(renamed, service).vae == "brighter.safetensors"  # the hash wins
    unknown = info.replace("VAE hash: ", "VAE hash: 00").replace("brighter", "gone")
    found = recall(unknown, service)
    assert found.vae is None and any("gone.safetensors" in w for w in found.warnings)
    _, plain = pixels(service, vae="None")
    assert recall(plain, service).vae is None
