"""A1111's saving options: jpg/webp keep the parameters where A1111 writes them (EXIF
UserComment, `UNICODE\\0` + UTF-16 big-endian), file-name patterns replace only the seed
part of `NNNNN-SEED`, and the options outlive a restart."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import pytest
from PIL import Image

from pipelines.errors import InvalidRequestError
from pipelines.infotext import read_infotext
from pipelines.output import (
    NameContext,
    SaveOptions,
    encode_image,
    file_decoration,
    read_save_options,
    save_image,
    write_save_options,
)

INFOTEXT = (
    "a cat, on a (red:1.2) mat — ü\nNegative prompt: blurry\n"
    "Steps: 7, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 5, "
    "Size: 24x16, Model hash: 0123456789, Model: my/model v2, Version: lorastack"
)
WHEN = dt.datetime(2026, 12, 4, 9, 30, 15)


def _image() -> Image.Image:
    return Image.new("RGB", (24, 16), (200, 40, 10))


@pytest.mark.parametrize("fmt", ["jpg", "jpeg", "webp"])
def test_jpeg_and_webp_carry_the_parameters_as_a1111_writes_them(fmt: str) -> None:
    data = encode_image(_image(), INFOTEXT, SaveOptions(samples_format=fmt))
    image = Image.open(io.BytesIO(data))
    assert image.format == ("WEBP" if fmt == "webp" else "JPEG")
    comment = image.getexif().get_ifd(0x8769)[0x9286]  # Exif IFD, UserComment
    assert comment == b"UNICODE\x00" + INFOTEXT.encode("utf-16-be")  # piexif's "unicode"
    assert read_infotext(data) == INFOTEXT


def test_quality_and_lossless_change_the_bytes() -> None:
    low = encode_image(_image(), INFOTEXT, SaveOptions("jpg", jpeg_quality=5))
    high = encode_image(_image(), INFOTEXT, SaveOptions("jpg", jpeg_quality=95))
    assert low != high
    lossless = encode_image(_image(), INFOTEXT, SaveOptions("webp", webp_lossless=True))
    assert Image.open(io.BytesIO(lossless)).convert("RGB").getpixel((3, 3)) == (200, 40, 10)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("", "5"),
        ("[seed]", "5"),
        ("[seed]-[prompt_words]", "5-a cat on a red 1 2 mat"),
        ("[model_name]_[steps]_[cfg]_[sampler]", "my_model v2_7_6.5_DPM++ 2M"),
        ("[scheduler]-[model_hash]-[width]x[height]", "Karras-0123456789-24x16"),
        ("[date] [datetime<%H%M>] [job_timestamp]", "2026-12-04 0930 20261204093015"),
        ("[prompt_hash]-[prompt_hash<4>]", "PROMPT8-PROMPT4"),
        ("x[nope]y", "x[nope]y"),  # unknown tags stay as written (A1111)
        ("a-[denoising]-b", "-b"),  # no denoising: the tag and the text before it vanish
        ("s[batch_number]", "s3"),
        ("../../etc/[seed]", ".._.._etc_5"),  # never a folder separator
        ("[none]", ""),
        ("  [prompt]  ", "a_cat,_on_a_(red_1.2)_mat_—_ü"),
    ],
)
def test_file_name_patterns_as_a1111(pattern: str, expected: str) -> None:
    import hashlib

    prompt = "a cat, on a (red:1.2) mat — ü"
    digest = hashlib.sha256(prompt.encode()).hexdigest()
    expected = expected.replace("PROMPT8", digest[:8]).replace("PROMPT4", digest[:4])
    context = NameContext(_image(), INFOTEXT, 5, WHEN, batch_number=3)
    assert file_decoration(pattern, context) == expected


def test_saved_names_keep_the_contract_numbering(tmp_path: Path) -> None:
    plain = save_image(tmp_path, _image(), INFOTEXT, 5, now=WHEN)
    assert plain == tmp_path / "txt2img-images" / "2026-12-04" / "00000-5.png"
    words = SaveOptions("webp", filename_pattern="[seed]-[prompt_words]")
    second = save_image(tmp_path, _image(), INFOTEXT, 5, now=WHEN, options=words)
    assert second.name == "00001-5-a cat on a red 1 2 mat.webp"
    empty = save_image(
        tmp_path, _image(), INFOTEXT, 5, now=WHEN, options=SaveOptions("jpg", "[none]")
    )
    assert empty.name == "00002.jpg"
    after = save_image(tmp_path, _image(), INFOTEXT, 6, now=WHEN)
    assert after.name == "00003-6.png"  # numbering counts every format and pattern
    assert read_infotext(second) == read_infotext(empty) == INFOTEXT
    huge = SaveOptions(filename_pattern="[prompt]" * 20)
    long = save_image(tmp_path, _image(), INFOTEXT, 5, now=WHEN, options=huge)
    assert len(long.name.encode()) <= 255 and long.suffix == ".png"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (SaveOptions("gif"), "samples_format"),
        (SaveOptions(jpeg_quality=0), "jpeg_quality"),
        (SaveOptions(jpeg_quality=True), "jpeg_quality"),  # type: ignore[arg-type]
        (SaveOptions(filename_pattern=5), "samples_filename_pattern"),  # type: ignore[arg-type]
        (SaveOptions(webp_lossless="yes"), "webp_lossless"),  # type: ignore[arg-type]
    ],
)
def test_bad_options_name_a1111s_option(options: SaveOptions, field: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        options.checked()
    assert caught.value.field == field


def test_options_outlive_a_restart_and_a_damaged_file_is_survived(tmp_path: Path) -> None:
    assert read_save_options(tmp_path) == SaveOptions()
    chosen = SaveOptions("webp", "[seed]-[model_name]", 90, True)
    write_save_options(tmp_path, chosen)
    assert read_save_options(tmp_path) == chosen
    (tmp_path / "saving.json").write_text('{"samples_format": "tiff"}')
    assert read_save_options(tmp_path) == SaveOptions()
    (tmp_path / "saving.json").write_text("not json")
    assert read_save_options(tmp_path) == SaveOptions()
