"""Live previews by A1111's `show_progress_type`: TAESD decoders read from
`models/VAE-approx/` (A1111's decoder-only `.pth` checked against the original TAESD
network, and AutoencoderTiny folders), the model's own VAE ("Full"), and Approx cheap."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderTiny
from torch import nn

from pipelines.errors import InvalidRequestError, UnusableFileError
from pipelines.interface import ProgressSnapshot
from pipelines.preview import (
    PreviewDecoders,
    check_preview_method,
    latents_to_images,
    load_taesd_decoder,
    render_preview,
)
from pipelines.schema import GenerationRequest
from pipelines.service import Service, build_service
from pipelines.settings import Settings


def _conv(n_in: int, n_out: int, **kwargs: object) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, padding=1, **kwargs)  # type: ignore[arg-type]


class _Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class _Block(nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            _conv(n_in, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(), _conv(n_out, n_out)
        )
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def original_taesd_decoder() -> nn.Sequential:
    """TAESD's decoder as its author wrote it (madebyollin/taesd `taesd.py`), whose
    state dict is what A1111's `taesd_decoder.pth` holds; it outputs [0, 1]."""

    def stage() -> list[nn.Module]:
        return [_Block(64, 64), _Block(64, 64), _Block(64, 64), nn.Upsample(scale_factor=2)]

    return nn.Sequential(
        _Clamp(),
        _conv(4, 64),
        nn.ReLU(),
        *stage(),
        _conv(64, 64, bias=False),
        *stage(),
        _conv(64, 64, bias=False),
        *stage(),
        _conv(64, 64, bias=False),
        _Block(64, 64),
        _conv(64, 3),
    )


@pytest.fixture(scope="module")
def approx(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Path:
    """A models folder (the shared tiny checkpoints, linked) with `VAE-approx/` holding
    A1111's SD1 `taesd_decoder.pth` and an SDXL AutoencoderTiny folder."""
    folder = tmp_path_factory.mktemp("approx-models")
    for item in models_dir.iterdir():
        (folder / item.name).symlink_to(item)
    torch.manual_seed(3)
    decoder = original_taesd_decoder()
    (folder / "VAE-approx").mkdir()
    torch.save(decoder.state_dict(), folder / "VAE-approx" / "taesd_decoder.pth")
    torch.manual_seed(4)
    AutoencoderTiny().save_pretrained(folder / "VAE-approx" / "taesdxl")
    return folder


def test_a1111_taesd_file_decodes_as_the_original_network(approx: Path) -> None:
    torch.manual_seed(3)
    original = original_taesd_decoder().eval()
    ours = load_taesd_decoder(approx / "VAE-approx" / "taesd_decoder.pth")
    latents = torch.randn(1, 4, 6, 5, generator=torch.Generator().manual_seed(1)) * 2
    with torch.no_grad():
        expected = original(latents) * 2 - 1
        assert torch.allclose(ours(latents), expected, atol=1e-5)


def test_the_family_picks_its_decoder_and_folders_load(approx: Path) -> None:
    decoders = PreviewDecoders([approx])
    assert decoders.find("SD1") == approx / "VAE-approx" / "taesd_decoder.pth"
    assert decoders.find("SDXL") == approx / "VAE-approx" / "taesdxl"
    assert decoders.find("Flux") is None
    xl = decoders.decoder("SDXL")
    assert xl is decoders.decoder("SDXL")  # loaded once
    tiny = AutoencoderTiny.from_pretrained(approx / "VAE-approx" / "taesdxl")
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(xl(latents), tiny.decoder(latents))


def test_a_file_that_is_no_taesd_is_refused_and_previews_fall_back(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "VAE-approx").mkdir()
    bad = tmp_path / "VAE-approx" / "taesd_decoder.pth"
    torch.save({"weight": torch.zeros(3)}, bad)
    with pytest.raises(UnusableFileError, match="taesd_decoder.pth: not a TAESD decoder"):
        load_taesd_decoder(bad)
    latents = torch.randn(1, 4, 2, 2)
    with caplog.at_level(logging.WARNING, logger="pipelines.preview"):
        images = render_preview("TAESD", latents, "SD1", nn.Identity(), PreviewDecoders([tmp_path]))
    cheap = latents_to_images(latents, "SD1")
    assert np.array_equal(np.asarray(images[0]), np.asarray(cheap[0]))
    assert "not a TAESD decoder" in caplog.text
    with pytest.raises(InvalidRequestError, match="Approx NN.*not available"):
        check_preview_method("Approx NN")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, approx: Path) -> Service:
    data = tmp_path_factory.mktemp("approx-data")
    return build_service(Settings(data_dir=data, ckpt_dirs=(approx,), threads=2))


def previews(service: Service, method: str) -> list[np.ndarray]:
    service.set_preview_method(method)
    shown: list[np.ndarray] = []

    def keep(snapshot: ProgressSnapshot) -> None:
        shown.extend(np.asarray(image) for image in snapshot.preview)

    request = GenerationRequest(
        prompt="a hill", steps=3, seed=9, width=64, height=64, checkpoint="tiny-sd1"
    )
    try:
        service.generate(request, on_progress=keep, preview_every=1)
    finally:
        service.set_preview_method("Approx cheap")
    return shown


def test_the_preview_method_chooses_how_the_job_shows_its_steps(service: Service) -> None:
    cheap = previews(service, "Approx cheap")
    taesd = previews(service, "TAESD")
    full = previews(service, "Full")
    assert len(cheap) == len(taesd) == len(full) == 2  # steps 1 and 2 of 3
    assert {image.shape for image in cheap + taesd + full} == {(64, 64, 3)}
    assert not np.array_equal(cheap[0], taesd[0])
    assert not np.array_equal(taesd[0], full[0])
    assert np.array_equal(taesd[1], previews(service, "TAESD")[1])  # same seed, same preview
