"""A1111 infotext write/parse and image storage (pipelines/infotext.py)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipelines.errors import InvalidRequestError
from pipelines.infotext import (
    format_infotext,
    format_lora_hashes,
    parse_infotext,
    parse_lora_hashes,
    quote,
    read_infotext,
    unquote,
    write_png_with_infotext,
)
from pipelines.samplers import resolve_sampler

COMPAT_EXAMPLE = (
    "a castle <lora:ink:0.8>\n"
    "Negative prompt: blurry\n"
    "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, "
    "Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, "
    'Lora hashes: "ink: 7c6bad76eb54", Version: v1.10.1'
)

REAL_A1111 = (
    "masterpiece, best quality, 1girl, <lora:add_detail:0.6>, (detailed eyes:1.2)\n"
    "BREAK\n"
    "sunset, <lora:ink:0.4:0.8>\n"
    "Negative prompt: (worst quality:1.4), lowres, bad anatomy, EasyNegative\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3141592653, "
    "Size: 512x768, Model hash: 7f96a1a9ca, Model: anyloraCheckpoint_bakedvaeBlessedFp16, "
    "VAE hash: 735e4c3a44, VAE: vae-ft-mse-840000-ema-pruned.safetensors, "
    "Denoising strength: 0.45, Clip skip: 2, Hires upscale: 2, Hires steps: 15, "
    "Hires upscaler: R-ESRGAN 4x+ Anime6B, "
    'Lora hashes: "add_detail: 7c6bad76eb54, ink: 0123456789ab", '
    'TI hashes: "EasyNegative: c74b4e810b03", Emphasis: Original, Version: v1.10.1'
)


def _example_params() -> dict[str, object]:
    # Insertion order scrambled on purpose: the output order is A1111's, not the caller's.
    return {
        "Version": "v1.10.1",
        "Lora hashes": format_lora_hashes([("ink", "7c6bad76eb54")]),
        "Clip skip": 2,
        "Model": "v1-5-pruned-emaonly",
        "Seed": 42,
        "Size": "512x768",
        "CFG scale": 7.0,
        "Steps": 25,
        "Schedule type": "Karras",
        "Model hash": "6ce0161689",
        "Sampler": "DPM++ 2M",
        "Variation seed": None,
        "VAE": "",
    }


def test_compat_example_formats_exactly():
    text = format_infotext("a castle <lora:ink:0.8>", "blurry", _example_params())
    assert text == COMPAT_EXAMPLE


def test_key_order_extra_keys_then_version():
    params = {
        "Version": "lorastack 0.1.0",
        "Hires upscale": 2,
        "Denoising strength": 0.7,
        "Lora hashes": "a: 1",
        "Variation seed strength": 0.3,
        "Variation seed": 5,
        "VAE": "ft-mse",
        "VAE hash": "735e4c3a44",
        "Model": "m",
        "Steps": 20,
    }
    line = format_infotext("p", "", params).split("\n")[-1]
    keys = [pair.split(":")[0] for pair in line.split(", ")]
    assert keys == [
        "Steps",
        "Model",
        "VAE hash",
        "VAE",
        "Variation seed",
        "Variation seed strength",
        "Denoising strength",
        "Hires upscale",
        "Lora hashes",
        "Version",
    ]


@pytest.mark.parametrize(
    ("params", "expected_line"),
    [
        ({"Steps": 20, "Clip skip": 1, "Seed": 1, "Size": "8x8"}, "Steps: 20, Seed: 1, Size: 8x8"),
        ({"Steps": 20, "Clip skip": "1"}, "Steps: 20"),
        ({"Steps": 20, "Clip skip": 3}, "Steps: 20, Clip skip: 3"),
        ({"Steps": 20, "Model": None, "VAE": ""}, "Steps: 20"),
        ({"Steps": 20, "CFG scale": 7.5}, "Steps: 20, CFG scale: 7.5"),
        ({"Steps": 20, "Denoising strength": 1.0}, "Steps: 20, Denoising strength: 1"),
        ({"Steps": 20, "Tiling": True}, "Steps: 20, Tiling: True"),
        ({"Steps": 20, "Schedule type": "Automatic"}, "Steps: 20, Schedule type: Automatic"),
        ({"Steps": 20, "Hires prompt": "a, b"}, 'Steps: 20, Hires prompt: "a, b"'),
        ({"Steps": 20, "Note": "x: y"}, 'Steps: 20, Note: "x: y"'),
        ({"Steps": 20, "Note": "a\nb"}, 'Steps: 20, Note: "a\\nb"'),
        ({"Steps": 20, "Note": 'say "hi", ok'}, 'Steps: 20, Note: "say \\"hi\\", ok"'),
        ({"Steps": 20, "Note": "ünïcode, 猫"}, 'Steps: 20, Note: "ünïcode, 猫"'),
        ({"Steps": 20, "Flag": "Flag"}, "Steps: 20, Flag"),
    ],
)
def test_value_rules(params, expected_line):
    assert format_infotext("p", "", params) == "p\n" + expected_line


def test_layout_without_negative_or_params():
    assert format_infotext("a cat", "", {}) == "a cat"
    assert format_infotext("a cat", "dog", {}) == "a cat\nNegative prompt: dog"
    assert format_infotext("a cat", "", {"Steps": 1}) == "a cat\nSteps: 1"


@pytest.mark.parametrize(
    ("value", "quoted"),
    [
        ("plain", "plain"),
        ("a,b", '"a,b"'),
        ("a:b", '"a:b"'),
        ("a\nb", '"a\\nb"'),
        ("猫, 犬", '"猫, 犬"'),
        (7, "7"),
    ],
)
def test_quote_matches_a1111(value, quoted):
    assert quote(value) == quoted
    assert unquote(quoted) == str(value)


@pytest.mark.parametrize("text", ['"unterminated', '"bad \\x escape"', "", '"'])
def test_unquote_leaves_malformed_text_alone(text):
    assert unquote(text) == text


def test_lora_hashes_strip_separators_from_names():
    items = [("ink", "7c6bad76eb54"), ("a:b,c", "0123456789ab"), ("ink", "ffffffffffff")]
    assert format_lora_hashes(items) == "ink: ffffffffffff, abc: 0123456789ab"
    assert format_lora_hashes([]) == ""
    assert parse_lora_hashes("ink: 7c6bad76eb54, abc: 0123456789ab, junk, : x") == {
        "ink": "7c6bad76eb54",
        "abc": "0123456789ab",
    }


ROUND_TRIPS = [
    pytest.param("a cat", "dog", id="simple"),
    pytest.param("a castle <lora:ink:0.8> <lora:a b:0.5:0.3>", "blurry", id="lora-tags"),
    pytest.param("line one,\nline two\nline three", "neg one\nneg two", id="multi-line"),
    pytest.param("猫耳の少女, ünïcode ✨ 🐱", "ぼやけた", id="unicode"),
    pytest.param("a cat", "", id="empty-negative"),
    pytest.param("a photo. Negative prompt: mid-line stays", "x", id="negative-mid-line"),
    pytest.param("Steps: 1, Seed: 2, Size: 3x4 in the prompt", "", id="params-like-prompt"),
    pytest.param("(masterpiece:1.2), [cat|dog], {a|b}", "(worst:1.4)", id="emphasis"),
]


@pytest.mark.parametrize(("prompt", "negative"), ROUND_TRIPS)
def test_round_trip(prompt, negative):
    params = {
        **_example_params(),
        "Hires prompt": "two, words\nand: a line",
        "Quoted": '"already quoted"?, yes',
    }
    parsed = parse_infotext(format_infotext(prompt, negative, params))
    assert parsed.prompt == prompt
    assert parsed.negative_prompt == negative
    assert parsed.width == 512 and parsed.height == 768
    assert parsed.lora_hashes == {"ink": "7c6bad76eb54"}
    assert parsed.params["Hires prompt"] == "two, words\nand: a line"
    assert parsed.params["Quoted"] == '"already quoted"?, yes'
    assert parsed.params["Steps"] == "25"
    assert parsed.params["CFG scale"] == "7"
    assert parsed.params["Clip skip"] == "2"
    assert parsed.params["Lora hashes"] == "ink: 7c6bad76eb54"
    assert "Variation seed" not in parsed.params


def test_a_prompt_line_starting_with_negative_prompt_splits_as_in_a1111():
    """A1111 does not escape it either: such a line starts the negative prompt on paste."""
    text = format_infotext(
        "a cat\nNegative prompt: not really", "", {"Steps": 1, "Seed": 2, "Size": "8x8"}
    )
    parsed = parse_infotext(text)
    assert parsed.prompt == "a cat"
    assert parsed.negative_prompt == "not really"


def test_lines_are_stripped_as_in_a1111():
    parsed = parse_infotext(
        "  a cat  \n  Negative prompt:   dog  \nSteps: 1, Seed: 2, CFG scale: 3"
    )
    assert (parsed.prompt, parsed.negative_prompt) == ("a cat", "dog")


def test_parse_real_a1111_infotext():
    parsed = parse_infotext(REAL_A1111)
    assert parsed.prompt == (
        "masterpiece, best quality, 1girl, <lora:add_detail:0.6>, (detailed eyes:1.2)\n"
        "BREAK\n"
        "sunset, <lora:ink:0.4:0.8>"
    )
    assert parsed.negative_prompt == "(worst quality:1.4), lowres, bad anatomy, EasyNegative"
    assert parsed.params["Sampler"] == "DPM++ 2M"
    assert parsed.params["Schedule type"] == "Karras"
    assert parsed.params["CFG scale"] == "6.5"
    assert parsed.params["Seed"] == "3141592653"
    assert parsed.params["Hires upscaler"] == "R-ESRGAN 4x+ Anime6B"
    assert parsed.params["TI hashes"] == "EasyNegative: c74b4e810b03"
    assert parsed.params["Version"] == "v1.10.1"
    assert (parsed.width, parsed.height) == (512, 768)
    assert parsed.lora_hashes == {"add_detail": "7c6bad76eb54", "ink": "0123456789ab"}
    assert parsed.a1111_parameters()["Size-1"] == "512"
    assert parsed.a1111_parameters()["Size-2"] == "768"
    assert parsed.a1111_parameters()["Prompt"] == parsed.prompt
    assert "Size" not in parsed.a1111_parameters()


def test_parse_old_infotext_fills_a1111_defaults():
    old = (
        "girl with an artist's beret, determined, blue eyes\n"
        "Negative prompt: ugly, fat\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 965400086, Size: 512x512, "
        "Model hash: 45dee52b"
    )
    parsed = parse_infotext(old)
    assert parsed.params["Clip skip"] == "1"
    assert parsed.params["Schedule type"] == "Automatic"
    assert parsed.lora_hashes == {}
    choice = resolve_sampler(parsed.params["Sampler"], parsed.params["Schedule type"])
    assert (choice.sampler, choice.schedule) == ("DPM++ 2M", "karras")


def test_last_line_needs_three_pairs_to_count_as_parameters():
    parsed = parse_infotext("a cat\nStyle: ink, Mood: calm")
    assert parsed.prompt == "a cat\nStyle: ink, Mood: calm"
    assert parsed.params == {"Clip skip": "1", "Schedule type": "Automatic"}
    assert parsed.width is None and parsed.height is None


def test_parse_skips_empty_values_and_odd_sizes():
    parsed = parse_infotext("p\nSteps: 20, Model: , Seed: 1, Size: 512 x 512")
    assert "Model" not in parsed.params
    assert parsed.params["Size"] == "512 x 512"
    assert parsed.width is None


def test_parse_empty_text():
    parsed = parse_infotext("")
    assert (parsed.prompt, parsed.negative_prompt) == ("", "")


def _png_chunk_types(data: bytes) -> list[bytes]:
    types, pos = [], 8
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        types.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return types


@pytest.mark.parametrize(
    ("text", "chunk"),
    [
        (COMPAT_EXAMPLE, b"tEXt"),
        ("café crème, naïve\nSteps: 1, Seed: 2, Size: 8x8", b"tEXt"),
        (
            "猫耳の少女 🐱 <lora:ink:0.8>\nNegative prompt: ぼやけた\nSteps: 1, Seed: 2, Size: 8x8",
            b"iTXt",
        ),
    ],
)
def test_png_round_trip(tmp_path, text, chunk):
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    data = write_png_with_infotext(image, text)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert chunk in _png_chunk_types(data)
    assert read_infotext(data) == text
    path = tmp_path / "x.png"
    path.write_bytes(data)
    assert read_infotext(path) == text
    assert read_infotext(str(path)) == text
    with Image.open(io.BytesIO(data)) as reopened:
        assert reopened.size == (8, 8)
        assert reopened.getpixel((0, 0)) == (10, 20, 30)
        assert read_infotext(reopened) == text


def _with_user_comment(fmt: str, comment: bytes) -> bytes:
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize(
    ("encode", "text"),
    [
        # piexif.helper.UserComment.dump(text, encoding="unicode"), as A1111 writes it.
        (lambda t: b"UNICODE\x00" + t.encode("utf-16-be"), COMPAT_EXAMPLE),
        (lambda t: b"UNICODE\x00" + t.encode("utf-16-be"), "猫耳 🐱\nSteps: 1, Seed: 2, Size: 8x8"),
        (lambda t: b"UNICODE\x00" + t.encode("utf-16-le"), COMPAT_EXAMPLE),
        (
            lambda t: b"UNICODE\x00" + t.encode("utf-16"),
            "with BOM, ü\nSteps: 1, Seed: 2, Size: 8x8",
        ),
        (lambda t: b"ASCII\x00\x00\x00" + t.encode("ascii"), COMPAT_EXAMPLE),
        (lambda t: t.encode("utf-8"), "no prefix, Steps: 1"),
    ],
)
def test_exif_user_comment_read(fmt, encode, text):
    assert read_infotext(_with_user_comment(fmt, encode(text))) == text


def test_image_without_infotext_reads_none():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    assert read_infotext(buffer.getvalue()) is None
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")
    assert read_infotext(buffer.getvalue()) is None


def test_not_an_image_is_a_request_error():
    with pytest.raises(InvalidRequestError) as err:
        read_infotext(b"definitely not an image")
    assert err.value.field == "image"
