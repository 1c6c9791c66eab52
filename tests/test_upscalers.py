"""Model upscalers through spandrel, A1111's upscale loop, Extras, and their use by hires
fix and SD upscale: tiny ESRGAN files written in the published layout, checked against an
independent forward pass."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from pipelines.errors import InvalidRequestError, UnusableFileError
from pipelines.extras import ExtrasRequest, extras_png
from pipelines.folders.hashing import HashCache
from pipelines.folders.registry import ModelFolders, default_roots
from pipelines.infotext import parse_infotext
from pipelines.loading import LoadedModel
from pipelines.schema import GenerationRequest, HiresFix, ImageInputs, SdUpscale
from pipelines.service import Service, build_service
from pipelines.settings import Settings, parse_settings
from pipelines.upscalers import Upscaling, import_spandrel, load_upscaler, run_model
from tests.upscaler_files import esrgan_forward, esrgan_state_dict, write_esrgan


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def reference(image: Image.Image, **kwargs: int) -> np.ndarray:
    """What the network must give, from the independent forward pass."""
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    out = esrgan_forward(esrgan_state_dict(**kwargs), tensor[None])[0]
    return np.round(out.permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)


@pytest.fixture(scope="module")
def upscaler_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An A1111 `models/` layout: two ESRGANs (safetensors, Real-ESRGAN-style pickle), a
    file that is no upscaler, a damaged one, and a checkpoint that must stay a checkpoint."""
    models = tmp_path_factory.mktemp("upscaler-models")
    write_esrgan(models / "ESRGAN" / "2x_tiny.safetensors", scale=2)
    write_esrgan(models / "RealESRGAN" / "4x_tiny.pth", scale=4, seed=1)
    save_file({"foo.weight": torch.zeros(4, 4)}, models / "ESRGAN" / "not_an_upscaler.safetensors")
    (models / "SwinIR").mkdir()
    (models / "SwinIR" / "damaged.pth").write_bytes(b"PK\x03\x04 truncated")
    return models


@pytest.fixture(scope="module")
def folders(upscaler_root: Path) -> ModelFolders:
    made = ModelFolders(default_roots([upscaler_root], [upscaler_root / "loras"]), HashCache(None))
    made.scan()
    return made


def test_files_are_found_named_by_stem_and_classified(folders: ModelFolders) -> None:
    entries = {entry.name: entry for entry in folders.entries("upscaler")}
    assert set(entries) == {"2x_tiny", "4x_tiny", "not_an_upscaler", "damaged"}
    assert (entries["2x_tiny"].architecture, entries["2x_tiny"].scale) == ("ESRGAN", 2)
    assert (entries["4x_tiny"].architecture, entries["4x_tiny"].scale) == ("ESRGAN", 4)
    assert entries["2x_tiny"].error is None and entries["4x_tiny"].error is None
    assert "not an upscaler architecture spandrel recognises" in str(
        entries["not_an_upscaler"].error
    )
    assert "damaged.pth" in str(entries["damaged"].error)
    assert folders.entries("checkpoint") == []  # upscaler folders are not checkpoints
    # A1111's list: the built-in ones first, then usable files by name
    assert Upscaling(folders).names() == ["None", "Lanczos", "Nearest", "2x_tiny", "4x_tiny"]


def test_spandrel_imports_without_torchvision_and_leaves_none_behind() -> None:
    """The CPU install has no torchvision: spandrel still imports, and no stand-in stays
    behind for diffusers or transformers to mistake for the real one."""
    import importlib.util

    installed = importlib.util.find_spec("torchvision") is not None
    assert import_spandrel().__name__ == "spandrel"
    assert installed or "torchvision" not in sys.modules


def test_the_network_matches_an_independent_forward_pass(upscaler_root: Path) -> None:
    image = noise_image(40, 24)
    descriptor = load_upscaler(upscaler_root / "ESRGAN" / "2x_tiny.safetensors")
    out = run_model(descriptor, image, device=torch.device("cpu"), dtype=torch.float32)
    expected = reference(image, scale=2)
    assert out.size == (80, 48)
    assert np.abs(np.asarray(out).astype(int) - expected.astype(int)).max() <= 1
    assert expected.std() > 10  # the check is not on a flat image


def test_pickled_real_esrgan_file_loads_weights_only(upscaler_root: Path) -> None:
    descriptor = load_upscaler(upscaler_root / "RealESRGAN" / "4x_tiny.pth")
    image = noise_image(16, 16, seed=3)
    out = run_model(descriptor, image, device=torch.device("cpu"), dtype=torch.float32)
    assert np.abs(np.asarray(out).astype(int) - reference(image, scale=4, seed=1)).max() <= 1


def test_a_pickle_with_code_is_refused(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("ran",))

    path = tmp_path / "evil.pth"
    torch.save({"params_ema": esrgan_state_dict(), "x": Boom()}, path)
    with pytest.raises(UnusableFileError, match="evil.pth"):
        load_upscaler(path)


def test_tiles_blend_into_the_untiled_result_away_from_seams(folders: ModelFolders) -> None:
    image = noise_image(300, 200, seed=5)
    descriptor = load_upscaler(folders.resolve("upscaler", "2x_tiny").path)
    tiled = np.asarray(
        run_model(descriptor, image, device=torch.device("cpu"), dtype=torch.float32)
    ).astype(int)
    whole = np.asarray(
        run_model(descriptor, image, device=torch.device("cpu"), dtype=torch.float32, tile_size=0)
    ).astype(int)
    assert tiled.shape == whole.shape == (400, 600, 3)
    # A1111's grid for 300x200 in 192 px tiles: columns at x 0 and 108, rows at y 0 and 8;
    # each later tile is pasted over the earlier from its overlap on. The network sees
    # about 20 input pixels of context, so 25 pixels inside the tile that supplies them
    # (input x 25..100, y 45..170) the tiled result is the untiled one.
    assert np.abs(tiled[90:340, 50:200] - whole[90:340, 50:200]).max() <= 1
    assert np.abs(tiled - whole).max() > 1  # and the test would see a seam
    assert np.mean(np.abs(tiled - whole)) < 2


@pytest.mark.parametrize(
    ("name", "scale", "size", "expected"),
    [
        ("2x_tiny", 2.0, (40, 24), (80, 48)),
        ("2x_tiny", 3.0, (20, 16), (56, 48)),  # two passes (4x), Lanczos down to 60//8*8
        ("4x_tiny", 2.0, (20, 20), (40, 40)),  # one 4x pass, Lanczos down
        ("Lanczos", 2.5, (20, 20), (48, 48)),
        ("Nearest", 2.0, (21, 13), (40, 24)),
        ("None", 2.0, (20, 20), (40, 40)),
    ],
)
def test_a1111_upscale_loop_sizes(
    folders: ModelFolders, name: str, scale: float, size: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert Upscaling(folders).upscale(noise_image(*size), scale, name).size == expected


def test_model_upscale_at_its_own_scale_is_the_network_output(folders: ModelFolders) -> None:
    image = noise_image(40, 24, seed=2)
    out = Upscaling(folders).upscale(image, 2.0, "2x_tiny")
    assert np.abs(np.asarray(out).astype(int) - reference(image, scale=2)).max() <= 1


def test_unknown_and_unusable_names_are_refused(folders: ModelFolders) -> None:
    upscaling = Upscaling(folders)
    with pytest.raises(InvalidRequestError, match="hr_upscaler: 'ESRGAN_4x' is not a known"):
        upscaling.check("ESRGAN_4x", "hr_upscaler")
    with pytest.raises(UnusableFileError, match="not_an_upscaler"):
        upscaling.check("not_an_upscaler", "upscaler_1")


def test_stop_between_tiles_still_gives_a_whole_image(folders: ModelFolders) -> None:
    calls: list[int] = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 1  # the first tile runs, the others only resize

    out = Upscaling(folders, stop=stop).upscale(noise_image(300, 200), 2.0, "2x_tiny")
    assert out.size == (600, 400) and len(calls) > 2


def test_upscaler_folder_flags(tmp_path: Path) -> None:
    settings = parse_settings(
        ["--data-dir", str(tmp_path), "--esrgan-models-path", str(tmp_path / "mine")], env={}
    )
    roots = default_roots(settings.models_dirs, settings.loras_dirs, settings.upscaler_dirs)
    assert roots["upscaler"][0] == (tmp_path / "mine").resolve()
    assert tmp_path.resolve() / "models" / "RealESRGAN" in roots["upscaler"]


# ------------------------------------------------------------------------------- extras


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    upscaler_root: Path,
    tiny_sd1: LoadedModel,
) -> Service:
    data = tmp_path_factory.mktemp("upscalers-data")
    settings = Settings(
        data_dir=data,
        ckpt_dirs=(models_dir,),
        upscaler_dirs=(upscaler_root / "ESRGAN",),
        threads=2,
    )
    return build_service(settings)


def test_extras_scale_by_with_a_model(service: Service) -> None:
    image = noise_image(40, 24, seed=7)
    result = service.postprocess(ExtrasRequest((image,), upscaler_1="2x_tiny"))
    assert result.images[0].size == (80, 48)
    assert np.abs(np.asarray(result.images[0]).astype(int) - reference(image, scale=2)).max() <= 1
    assert result.infotexts == ["Postprocess upscale by: 2.0, Postprocess upscaler: 2x_tiny"]


def test_extras_scale_to_crops_to_the_size(service: Service) -> None:
    result = service.postprocess(
        ExtrasRequest(
            (noise_image(40, 20),),
            resize_mode=1,
            upscaling_resize_w=64,
            upscaling_resize_h=64,
            upscaler_1="Lanczos",
        )
    )
    assert result.images[0].size == (64, 64)
    assert "Postprocess crop to: 64x64" in result.infotexts[0]


def test_extras_max_side_length_and_second_upscaler(service: Service) -> None:
    image = noise_image(40, 20, seed=1)
    request = ExtrasRequest(
        (image, image),
        upscaling_resize=4,
        max_side_length=100,
        upscaler_1="2x_tiny",
        upscaler_2="Nearest",
        upscaler_2_visibility=0.5,
    )
    result = service.postprocess(request)
    assert [im.size for im in result.images] == [(96, 48), (96, 48)]
    assert "Max side length: 100" in result.infotexts[0]
    assert "Postprocess upscaler 2: Nearest" in result.infotexts[0]
    first = Upscaling(service.folders).upscale(image, 2.5, "2x_tiny")
    second = Upscaling(service.folders).upscale(image, 2.5, "Nearest")
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(Image.blend(first, second, 0.5)))


def test_extras_none_leaves_the_image_and_keeps_its_parameters(service: Service) -> None:
    image = Image.open(io.BytesIO(extras_png(noise_image(8, 8), "a cat\nSteps: 3", "")))
    result = service.postprocess(ExtrasRequest((image,)))
    assert np.array_equal(np.asarray(result.images[0]), np.asarray(image.convert("RGB")))
    assert result.parameters == ["a cat\nSteps: 3"]
    png = Image.open(io.BytesIO(extras_png(result.images[0], "a cat", "x: 1")))
    assert png.info["parameters"] == "a cat" and png.info["postprocessing"] == "x: 1"


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"upscaler_1": "nope"}, "upscaler_1"),
        ({"upscaler_1": "not_an_upscaler"}, None),
        ({"upscaler_1": "Lanczos", "upscaling_resize": 200}, "upscaling_resize"),
        (
            {
                "upscaler_1": "Lanczos",
                "resize_mode": 1,
                "upscaling_resize_w": 9000,
                "upscaling_resize_h": 9000,
            },
            "upscaling_resize_w",
        ),
        ({"upscaler_1": "Lanczos", "resize_mode": 2}, "resize_mode"),
    ],
)
def test_extras_errors_name_the_field(
    service: Service, request_fields: dict[str, object], field: str | None
) -> None:
    with pytest.raises((InvalidRequestError, UnusableFileError)) as raised:
        service.postprocess(ExtrasRequest((noise_image(64, 64),), **request_fields))
    if field is not None:
        assert getattr(raised.value, "field", None) == field


# ------------------------------------------------------- hires fix and SD upscale with models


def test_hires_fix_with_a_model_upscaler(service: Service) -> None:
    request = GenerationRequest(
        prompt="a house",
        steps=2,
        seed=3,
        width=64,
        height=64,
        sampler_name="Euler",
        checkpoint="tiny-sd1",
        denoising_strength=0.5,
        hires=HiresFix(scale=2.0, upscaler="2x_tiny"),
    )
    first, second = service.generate(request), service.generate(request)
    assert first.images[0].size == (128, 128)
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(second.images[0]))
    assert parse_infotext(first.infotexts[0]).params["Hires upscaler"] == "2x_tiny"
    lanczos = service.generate(
        GenerationRequest(**{**request.__dict__, "hires": HiresFix(scale=2.0, upscaler="Lanczos")})
    )
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(lanczos.images[0]))


def test_hires_unknown_upscaler_is_refused_before_queueing(service: Service) -> None:
    request = GenerationRequest(
        prompt="x", steps=2, width=64, height=64, hires=HiresFix(upscaler="ESRGAN_4x")
    )
    with pytest.raises(InvalidRequestError) as raised:
        service.submit(request)
    assert raised.value.field == "hr_upscaler"
    assert service.jobs() == []


def test_sd_upscale_with_a_model_upscaler(service: Service) -> None:
    init = noise_image(64, 64, seed=9)
    request = GenerationRequest(
        prompt="a house",
        steps=2,
        seed=3,
        width=64,
        height=64,
        sampler_name="Euler",
        checkpoint="tiny-sd1",
        denoising_strength=0.3,
        img2img=ImageInputs(
            (init,), sd_upscale=SdUpscale(scale=2.0, upscaler="2x_tiny", overlap=16)
        ),
    )
    result = service.generate(request)
    assert result.images[0].size == (128, 128)
