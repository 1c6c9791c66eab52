"""`python -m pipelines`: files with parameters, listings, and the documented exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from frontends.cli.__main__ import (
    EXIT_NOT_FOUND,
    EXIT_UNUSABLE,
    EXIT_USAGE,
    build_parser,
    main,
    parse_controlnet,
    parse_lora,
)
from pipelines.infotext import parse_infotext, read_infotext
from pipelines.loading import LoadedModel
from pipelines.schema import FIELDS, LoraSpec
from tests.test_app_http import PROJECT
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

SMALL = ["--steps", "2", "--width", "64", "--height", "64", "--threads", "2"]


@pytest.fixture(scope="module")
def loras_dir(tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel) -> Path:
    folder = tmp_path_factory.mktemp("cli-loras")
    tags = json.dumps({"10_ink": {"ink style": 12, "castle": 3}})
    state = make_kohya(tiny_sd1.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=1)
    write(folder / "ink.safetensors", state, {"ss_tag_frequency": tags, "ss_output_name": "inky"})
    return folder


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("ink", LoraSpec("ink")),
        ("ink:0.8", LoraSpec("ink", 0.8)),
        ("ink:-0.3", LoraSpec("ink", -0.3)),
        ("ink:0.5:1", LoraSpec("ink", 1.0, 0.5)),
        ("styles/ink:2", LoraSpec("styles/ink", 2.0)),
        ("odd:name", LoraSpec("odd:name")),
    ],
)
def test_parse_lora(text: str, spec: LoraSpec) -> None:
    assert parse_lora(text) == spec


def test_generation_flags_come_from_the_schema() -> None:
    generate = build_parser()._subparsers._group_actions[0].choices["generate"]
    dests = {action.dest for action in generate._actions}
    assert {spec.name for spec in FIELDS} <= dests
    defaults = generate.parse_args([])
    sized = {"width", "height"}  # None until known: img2img takes the init image's size
    assert all(
        getattr(defaults, spec.name) == spec.default for spec in FIELDS if spec.name not in sized
    )
    assert all(getattr(defaults, name) is None for name in sized)


def test_generate_writes_pngs_with_parameters(
    tmp_path: Path, models_dir: Path, loras_dir: Path
) -> None:
    out = tmp_path / "out"
    command = [
        *(sys.executable, "-m", "frontends.cli", "generate"),
        *("--prompt", "a castle", "--negative-prompt", "fog", "--seed", "9"),
        *("--batch-size", "2", "--n-iter", "2", "--lora", "inky:-0.3"),
        *("--sampler", "DPM++ 2M", "--scheduler", "karras", "--cfg-scale", "5"),
        *("--subseed", "4", "--subseed-strength", "0.25", "--tiling"),
        *("--ckpt", "tiny-sd1", "--ckpt-dir", str(models_dir), "--lora-dir", str(loras_dir)),
        *("--data-dir", str(tmp_path), "--out", str(out), *SMALL),
    ]
    completed = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [
        "00000-9.png",
        "00001-10.png",
        "00002-11.png",
        "00003-12.png",
    ]
    assert completed.stdout.split() == [str(f) for f in files]
    parsed = parse_infotext(read_infotext(files[1]))
    assert parsed.params["Seed"] == "10" and parsed.params["Schedule type"] == "Karras"
    assert parsed.params["CFG scale"] == "5" and parsed.negative_prompt == "fog"
    assert parsed.prompt.startswith("a castle") and "<lora:inky:-0.3>" in parsed.prompt
    assert parsed.params["Variation seed"] == "5" and parsed.params["Tiling"] == "True"
    assert parsed.params["Variation seed strength"] == "0.25"


@pytest.mark.parametrize(
    ("arguments", "code", "words"),
    [
        (["--steps", "999"], EXIT_USAGE, ["steps"]),
        (["--sampler", "Nope"], EXIT_USAGE, ["Nope"]),
        (["--ckpt", "no-such-model"], EXIT_NOT_FOUND, ["no-such-model"]),
        (["--lora", "missing:0.5"], EXIT_NOT_FOUND, ["missing"]),
        (["--ckpt", "broken"], EXIT_UNUSABLE, ["broken"]),
        (["--refiner", "tiny-sd1", "--refiner-switch-at", "2"], EXIT_USAGE, ["refiner_switch_at"]),
        (["--ckpt", "xl/tiny-sdxl", "--refiner", "tiny-sd1"], EXIT_USAGE, ["refiner", "SD1"]),
    ],
)
def test_exit_codes_and_messages(
    tmp_path: Path,
    models_dir: Path,
    capsys: pytest.CaptureFixture[str],
    arguments: list[str],
    code: int,
    words: list[str],
) -> None:
    broken = tmp_path / "broken-models"
    broken.mkdir()
    (broken / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    folders = ["--ckpt-dir", str(models_dir), "--ckpt-dir", str(broken)]
    assert main(["generate", *SMALL, *folders, "--data-dir", str(tmp_path), *arguments]) == code
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ")
    assert all(word in error for word in words)


def test_bad_flag_value_is_usage_error(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "frontends.cli", "generate", "--seed", "many"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == EXIT_USAGE and "--seed" in completed.stderr


def test_list_models_and_loras(
    tmp_path: Path, models_dir: Path, loras_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = ["--ckpt-dir", str(models_dir), "--lora-dir", str(loras_dir)]
    assert main(["list-models", *folders, "--data-dir", str(tmp_path)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0][:3] == ["title", "architecture", "kind"]
    sd1 = next(row for row in rows if row[0].startswith("tiny-sd1.safetensors"))
    assert sd1[1] == "SD1" and len(sd1[3]) == 64 and sd1[0].endswith(f"[{sd1[3][:10]}]")
    assert any(row[0].startswith("xl/tiny-sdxl") and row[1] == "SDXL" for row in rows)
    assert main(["list-loras", *folders, "--data-dir", str(tmp_path)]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["name", "alias", "architecture", "hash", "trigger words", "problem"]
    name, alias, architecture, short_hash, words, problem = rows[1]
    assert (name, alias, problem) == ("ink", "inky", "")
    assert architecture.startswith("SD1") and len(short_hash) == 12
    assert words == "ink style, castle"


def test_img2img_from_the_cli_gives_the_services_pixels(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from pipelines.service import build_service
    from pipelines.settings import Settings
    from tests.service_contract import inpainting_request

    wanted = inpainting_request(seed=7)
    assert wanted.img2img is not None and wanted.img2img.mask is not None
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    wanted.img2img.images[0].save(init)
    wanted.img2img.mask.save(mask)
    arguments = [
        *("generate", "--prompt", wanted.prompt, "--seed", "7", "--steps", "2"),
        *("--init-image", str(init), "--mask", str(mask), "--mask-blur", "0"),
        *("--inpainting-fill", "0", "--denoising-strength", "0.8", "--threads", "2"),
        *("--ckpt", "tiny-sd1", "--ckpt-dir", str(models_dir), "--data-dir", str(tmp_path)),
    ]
    assert main(arguments) == 0
    (written,) = capsys.readouterr().out.split()
    assert "/outputs/img2img-images/" in written  # no width/height: the image's size
    cli_pixels = np.asarray(Image.open(written).convert("RGB"))
    settings = Settings(data_dir=tmp_path / "service", ckpt_dirs=(models_dir,), threads=2)
    service = build_service(settings)
    service.folders.hash_missing()
    result = service.generate(wanted)
    assert np.array_equal(cli_pixels, np.asarray(result.images[0]))
    assert read_infotext(Path(written)) == result.infotexts[0]
    assert main([*arguments[:1], "--mask", str(mask), *SMALL]) == EXIT_USAGE
    assert "--init-image" in capsys.readouterr().err


def test_extras_and_list_upscalers(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from tests.upscaler_files import write_esrgan

    upscalers = tmp_path / "ups"
    write_esrgan(upscalers / "2x_tiny.safetensors", scale=2)
    (upscalers / "junk.pth").write_bytes(b"junk")
    source = tmp_path / "in.png"
    Image.new("RGB", (40, 24), (200, 30, 90)).save(source)
    common = ["--esrgan-models-path", str(upscalers), "--data-dir", str(tmp_path)]
    assert main(["list-upscalers", *common]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["name", "architecture", "scale", "problem"]
    assert ["2x_tiny", "ESRGAN", "2x", ""] in rows
    junk = next(row for row in rows if row[0] == "junk")
    assert "junk.pth" in junk[3]
    assert main(["extras", "--image", str(source), "--upscaler", "2x_tiny", *common]) == 0
    (written,) = capsys.readouterr().out.split()
    assert "/outputs/extras-images/" in written
    with Image.open(written) as image:
        assert image.size == (80, 48)
        assert image.info["postprocessing"] == (
            "Postprocess upscale by: 2.0, Postprocess upscaler: 2x_tiny"
        )
    assert main(["extras", "--image", str(source), "--upscaler", "nope", *common]) == EXIT_USAGE
    assert "upscaler_1" in capsys.readouterr().err


def test_hires_flags_give_the_services_pixels(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    from pipelines.schema import GenerationRequest, HiresFix
    from pipelines.service import build_service
    from pipelines.settings import Settings

    arguments = [
        *("generate", "--prompt", "a tower", "--seed", "3", "--steps", "2"),
        *("--width", "64", "--height", "64", "--enable-hr", "--hr-scale", "1.5"),
        *("--hr-upscaler", "Lanczos", "--hr-second-pass-steps", "2"),
        *("--denoising-strength", "0.5", "--threads", "2", "--sampler", "Euler"),
        *("--ckpt", "tiny-sd1", "--ckpt-dir", str(models_dir), "--data-dir", str(tmp_path)),
    ]
    assert main(arguments) == 0
    (written,) = capsys.readouterr().out.split()
    pixels = np.asarray(Image.open(written).convert("RGB"))
    assert pixels.shape == (96, 96, 3)
    service = build_service(Settings(data_dir=tmp_path / "s", ckpt_dirs=(models_dir,), threads=2))
    service.folders.hash_missing()
    result = service.generate(
        GenerationRequest(
            prompt="a tower",
            seed=3,
            steps=2,
            width=64,
            height=64,
            sampler_name="Euler",
            denoising_strength=0.5,
            checkpoint="tiny-sd1",
            hires=HiresFix(scale=1.5, upscaler="Lanczos", second_pass_steps=2),
        )
    )
    assert np.array_equal(pixels, np.asarray(result.images[0]))


def test_styles_from_the_data_dir(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--style` applies styles.csv's styles in order (the infotext carries the styled
    prompts); an unknown one is a usage error before anything loads; `list-styles` lists
    them and reports a malformed row by its line."""
    (tmp_path / "styles.csv").write_bytes(
        b"\xef\xbb\xbfname,prompt,negative_prompt\r\n"
        b'frame,"masterpiece, {prompt}",lowres\r\n'
        b"tail,film grain,\r\n"
        b"broken,a,b,c\r\n"
    )
    common = ["--ckpt-dir", str(models_dir), "--data-dir", str(tmp_path)]
    assert main(["list-styles", *common]) == 0
    listed = capsys.readouterr()
    assert listed.out.splitlines() == [
        "name\tprompt\tnegative_prompt",
        "frame\tmasterpiece, {prompt}\tlowres",
        "tail\tfilm grain\t",
    ]
    assert "warning: styles.csv line 4: 4 cells but the header has 3" in listed.err
    out = tmp_path / "out"
    styled = ["--style", "frame", "--style", "tail", "--prompt", "a castle", "--seed", "3"]
    arguments = ["generate", *SMALL, *common, *styled, "--out", str(out)]
    assert main(arguments) == 0
    parsed = parse_infotext(read_infotext(next(out.glob("*.png"))))
    assert parsed.prompt == "masterpiece, a castle, film grain"
    assert parsed.negative_prompt == "lowres"
    capsys.readouterr()
    assert main(["generate", *SMALL, *common, "--style", "nope"]) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "unknown style 'nope'" in error and "'frame'" in error


def test_xyz_plot_from_the_cli_writes_the_grid_and_cells(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    arguments = [
        *("generate", "--prompt", "a boat", "--seed", "4", "--steps", "2", "--threads", "2"),
        *("--width", "64", "--height", "64", "--ckpt", "tiny-sd1"),
        *("--ckpt-dir", str(models_dir), "--data-dir", str(tmp_path)),
        *("--xyz-x", "Steps=1,2", "--xyz-y", "CFG Scale=3, 7", "--xyz-no-legend", "--xyz-cells"),
    ]
    assert main(arguments) == 0
    grid, *cells = capsys.readouterr().out.split()
    assert "/outputs/txt2img-grids/" in grid and len(cells) == 4
    assert all("/outputs/txt2img-images/" in cell for cell in cells)
    pixels = np.asarray(Image.open(grid).convert("RGB"))
    assert pixels.shape == (128, 128, 3)
    last = np.asarray(Image.open(cells[3]).convert("RGB"))  # x = 2 steps, y = CFG 7
    assert np.array_equal(pixels[64:, 64:], last)
    assert "Script: X/Y/Z plot" in (read_infotext(Path(grid)) or "")
    assert "CFG scale: 7" in (read_infotext(Path(cells[3])) or "")
    quiet = [*arguments[:-1]]  # without --xyz-cells: the cells are written all the same
    assert main(quiet) == 0
    grid_again, *cells_again = capsys.readouterr().out.split()
    assert "/txt2img-grids/" in grid_again and len(cells_again) == 4
    assert np.array_equal(np.asarray(Image.open(grid_again).convert("RGB")), pixels)
    bad = [*arguments[:-6], "--xyz-x", "Eta=0,1"]
    assert main(bad) == EXIT_USAGE
    assert "'Eta' axis is not implemented" in capsys.readouterr().err


def test_prompts_file_writes_every_line_s_images(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = tmp_path / "prompts.txt"
    lines.write_text(
        'a cat\n\n--prompt "a dog" --steps 3 --batch_size 2\n--seed 77 --cfg_scale 4\n'
    )
    out = tmp_path / "out"
    base = ["generate", *SMALL, "--ckpt-dir", str(models_dir), "--data-dir", str(tmp_path)]
    flags = ["--prompt", "photo", "--seed", "30", "--prompts-file", str(lines), "--iterate-seed"]
    assert main([*base, *flags, "--prompt-position", "end", "--out", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == [
        "00000-30.png",
        "00001-31.png",
        "00002-32.png",
        "00003-77.png",
    ]
    assert capsys.readouterr().out.split() == [str(f) for f in files]
    parsed = [parse_infotext(read_infotext(f)) for f in files]
    assert [p.prompt for p in parsed] == ["photo a cat", "photo a dog", "photo a dog", "photo"]
    assert parsed[1].params["Steps"] == "3" and parsed[3].params["CFG scale"] == "4"

    lines.write_text("a cat\n--prompt x --stepz 3\n")
    assert main([*base, "--prompts-file", str(lines), "--out", str(out)]) == EXIT_USAGE
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "line 2" in error and "--stepz" in error
    assert len(list(out.glob("*.png"))) == 4


def test_cli_saves_in_a1111_formats_and_names(
    tmp_path: Path, models_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = [
        *("generate", "--prompt", "a lighthouse", "--seed", "12", *SMALL),
        *("--ckpt-dir", str(models_dir), "--data-dir", str(tmp_path), "--out", str(tmp_path)),
        *("--samples-format", "jpg", "--filename-pattern", "[seed]-[steps]-[prompt_words]"),
    ]
    assert main(arguments) == 0
    (written,) = capsys.readouterr().out.splitlines()
    assert Path(written).name == "00000-12-2-a lighthouse.jpg"
    assert parse_infotext(read_infotext(written) or "").params["Seed"] == "12"
    assert main([*arguments[:-4], "--samples-format", "bmp"]) == EXIT_USAGE
    assert "samples_format" in capsys.readouterr().err


def test_controlnet_flag_is_a_unit_with_the_api_names(
    tmp_path: Path,
    tiny_sd1: LoadedModel,
    models_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import argparse

    from PIL import Image

    from tests.test_controlnet import control_image, tiny_controlnet

    picture = tmp_path / "edges.png"
    control_image().save(picture)
    unit = parse_controlnet(
        f"model=tiny-cn, module=canny, image={picture}, weight=0.8, processor_res=64, "
        "pixel_perfect=true, control_mode=My prompt is more important"
    )
    assert (unit.model, unit.module, unit.weight, unit.processor_res) == (
        "tiny-cn",
        "canny",
        0.8,
        64,
    )
    assert unit.pixel_perfect is True and unit.control_mode == "My prompt is more important"
    assert np.array_equal(np.asarray(unit.image), np.asarray(control_image()))
    for bad, named in (
        ("weigth=1", "weigth"),
        ("weight=heavy", "weight"),
        ("image=nope.png", "image"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=named):
            parse_controlnet(bad)
    folder = tmp_path / "ControlNet"
    tiny_controlnet(tiny_sd1.pipe.unet, 1).save_pretrained(folder / "tiny-cn")
    arguments = [
        *("generate", "--prompt", "castle", "--seed", "7", *SMALL),
        *("--ckpt", "tiny-sd1", "--ckpt-dir", str(models_dir), "--data-dir", str(tmp_path)),
        *("--controlnet-dir", str(folder), "--controlnet", f"model=tiny-cn,image={picture}"),
    ]
    assert main(arguments) == 0
    (written,) = capsys.readouterr().out.split()
    assert 'ControlNet 0: "Module: none, Model: tiny-cn [' in read_infotext(Path(written))
    with Image.open(written) as image:
        assert image.size == (64, 64)
