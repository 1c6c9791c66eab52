"""Prompt styles: A1111's `styles.csv` read and saved (round trip, malformed rows reported by
line), applied as A1111 applies them, found again in a pasted prompt, and the store's
atomic saves."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest

from pipelines.errors import InvalidRequestError, NotFoundError, UnusableFileError
from pipelines.schema import GenerationRequest, HiresFix
from pipelines.styles import (
    PromptStyle,
    StyleStore,
    apply_styles,
    apply_to_request,
    extract_style_text,
    extract_styles,
    format_styles,
    merge_prompts,
    parse_styles,
    read_styles,
    write_styles,
)

A1111_ROWS = [
    {"name": "cinematic", "prompt": '{prompt}, 35mm, "film grain"', "negative_prompt": "{prompt}"},
    {"name": "ink", "prompt": "ink wash, monochrome", "negative_prompt": ""},
    {"name": "multi, line", "prompt": "first\nsecond", "negative_prompt": "blurry"},
    {"name": "neg only", "prompt": "", "negative_prompt": "lowres, bad hands"},
    {"name": "ünï", "prompt": "日本画", "negative_prompt": ""},
]  # fmt: skip


def a1111_file(path: Path, rows: list[dict[str, str]]) -> bytes:
    """Write `rows` the way A1111's `save_styles` does: utf-8-sig, csv.DictWriter."""
    with open(path, "w", encoding="utf-8-sig", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["name", "prompt", "negative_prompt"])
        writer.writeheader()
        writer.writerows(rows)
    return path.read_bytes()


def a1111_merge(style_prompt: str, prompt: str) -> str:
    """A1111 1.10's rule, restated for the comparison: `{prompt}` is replaced, else the
    style goes after a comma; empty parts are left out."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    parts = [p for p in (prompt.strip(), style_prompt.strip()) if p]
    return ", ".join(parts)


# --------------------------------------------------------------------------- the file


def test_an_a1111_file_loads_and_round_trips_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    original = a1111_file(path, A1111_ROWS)
    assert original.startswith(b"\xef\xbb\xbf") and b'"multi, line"' in original
    sheet = read_styles(path)
    assert sheet.problems == ()
    assert [(s.name, s.prompt, s.negative_prompt) for s in sheet.styles] == [
        (r["name"], r["prompt"], r["negative_prompt"]) for r in A1111_ROWS
    ]
    write_styles(path, sheet)
    assert path.read_bytes() == original
    assert (tmp_path / "styles.csv.bak").read_bytes() == original  # A1111 keeps one backup


def test_malformed_rows_are_reported_by_line_and_the_others_load(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    a1111_file(path, A1111_ROWS[:3])  # rows span lines 2, 3 and 4-5 (a quoted newline)
    with path.open("ab") as stream:
        stream.write(b"# a comment row, kept,\r\n")  # line 6: A1111 skips these
        stream.write(b"cheap,one, two, three\r\n")  # line 7: an unquoted comma too many
        stream.write(b",no name,\r\n")  # line 8
        stream.write(b"broken,\xff\xfe bytes,\r\n")  # line 9: not UTF-8
        stream.write(b"old style,just a prompt\r\n")  # line 10: short rows are fine
        stream.write(b"ink,ink again,\r\n")  # line 11: a duplicate replaces line 3
    original = path.read_bytes()
    sheet = read_styles(path)
    assert [(p.line, p.message.split(";")[0]) for p in sheet.problems] == [
        (7, "4 cells but the header has 3"),
        (8, "the row has no style name"),
        (9, "it is not UTF-8 text"),
        (11, "style 'ink' is also on line 3"),
    ]
    assert str(sheet.problems[0]).startswith("styles.csv line 7: ")
    assert sheet.names == ["cinematic", "ink", "multi, line", "old style"]
    assert sheet.get("ink") == PromptStyle("ink", "ink again", "")
    assert sheet.get("old style") == PromptStyle("old style", "just a prompt", "")
    # saving keeps every row A1111 would have lost or mangled, bytes included
    write_styles(path, sheet)
    saved = path.read_bytes()
    for raw in (b"# a comment row, kept,\r\n", b"cheap,one, two, three\r\n", b"\xff\xfe bytes"):
        assert raw in saved
    assert read_styles(path).problems[:3] == sheet.problems[:3]
    assert len(saved) < len(original)  # the duplicate row is gone, as in A1111


def test_old_name_text_format_and_missing_file(tmp_path: Path) -> None:
    sheet = parse_styles("name, text\nfilm, film grain\n")
    assert sheet.styles == (PromptStyle("film", "film grain", ""),)
    assert read_styles(tmp_path / "none.csv").styles == ()


def test_an_unreadable_header_loads_nothing_and_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "styles.csv"
    path.write_text("title;prompt\nx;y\n")
    store = StyleStore(path)
    sheet = store.sheet()
    assert sheet.styles == () and not sheet.writable
    assert sheet.problems[0].line == 1 and "header" in sheet.problems[0].message
    with pytest.raises(UnusableFileError, match="line 1"):
        store.save(PromptStyle("new", "x"))
    assert path.read_text() == "title;prompt\nx;y\n"


def test_format_writes_a1111s_dialect() -> None:
    sheet = parse_styles('name,prompt,negative_prompt\n"a, b","say ""hi""",\n')
    assert format_styles(sheet) == ('name,prompt,negative_prompt\r\n"a, b","say ""hi""",\r\n')


# --------------------------------------------------------------------------- applying


@pytest.mark.parametrize(
    ("style", "prompt", "expected"),
    [
        ("{prompt}, cinematic", "a cat", "a cat, cinematic"),
        ("photo of {prompt}, {prompt}", "a cat", "photo of a cat, a cat"),
        ("{prompt}", "", ""),
        ("film grain", "a cat", "a cat, film grain"),
        ("  film grain ", " a cat  ", "a cat, film grain"),
        ("film grain", "", "film grain"),
        ("", "a cat ", "a cat"),
        ("", "", ""),
    ],
)
def test_merge_as_a1111(style: str, prompt: str, expected: str) -> None:
    assert merge_prompts(style, prompt) == expected == a1111_merge(style, prompt)


def test_styles_apply_in_order_to_both_prompts_and_hires_prompts() -> None:
    styles = [
        PromptStyle("frame", "masterpiece, {prompt}", "{prompt}, lowres"),
        PromptStyle("tail", "film grain", "blurry"),
    ]
    request = GenerationRequest(prompt="a cat", negative_prompt="", styles=("frame", "tail"))
    styled = apply_to_request(request, styles)
    assert styled.prompt == "masterpiece, a cat, film grain"
    assert styled.negative_prompt == ", lowres, blurry"  # A1111 keeps the empty placeholder
    expected = "a cat"
    for style in styles:
        expected = a1111_merge(style.prompt, expected)
    assert styled.prompt == expected == apply_styles("a cat", [s.prompt for s in styles])
    assert styled.styles == ("frame", "tail")
    hires = GenerationRequest(prompt="a cat", hires=HiresFix(prompt="a dog"))
    assert apply_to_request(hires, styles).hires == HiresFix(
        prompt="masterpiece, a dog, film grain"
    )  # an empty hires negative stays empty: it means the first pass's (styled) one
    assert apply_to_request(GenerationRequest(hires=HiresFix()), styles).hires == HiresFix()


# --------------------------------------------------------------------------- pasting


@pytest.mark.parametrize(
    ("style", "prompt", "expected"),
    [  # A1111's docstring examples, then the edges of its rule
        ("masterpiece", "1girl, art by greg, masterpiece", (True, "1girl, art by greg")),
        ("masterpiece, {prompt}", "masterpiece, 1girl, art by greg", (True, "1girl, art by greg")),
        ("masterpiece, {prompt}", "exquisite, 1girl", (False, "exquisite, 1girl")),
        ("film", "a cat film", (True, "a cat ")),
        ("{prompt} and {prompt}", "x and x", (False, "x and x")),
    ],
)  # fmt: skip
def test_extract_style_text_as_a1111(style: str, prompt: str, expected: tuple) -> None:
    assert extract_style_text(style, prompt) == expected


def test_extract_styles_undoes_apply() -> None:
    styles = [
        PromptStyle("frame", "masterpiece, {prompt}", "{prompt}, lowres"),
        PromptStyle("tail", "film grain", "blurry"),
        PromptStyle("unused", "never", ""),
        PromptStyle("empty", "", ""),
    ]
    request = GenerationRequest(prompt="a cat", negative_prompt="ugly", styles=("frame", "tail"))
    styled = apply_to_request(request, styles[:2])
    found = extract_styles(styles, styled.prompt, styled.negative_prompt)
    assert found == (["frame", "tail"], "a cat", "ugly")
    assert extract_styles(styles, "a dog", "") == ([], "a dog", "")
    # both prompts must match: a positive match alone is not the style
    assert extract_styles(styles, "a cat, film grain", "sharp") == (
        [],
        "a cat, film grain",
        "sharp",
    )


# --------------------------------------------------------------------------- the store


def test_store_saves_atomically_rereads_edits_and_resolves(tmp_path: Path) -> None:
    path = tmp_path / "data" / "styles.csv"
    store = StyleStore(path)
    assert store.sheet().styles == ()
    store.save(PromptStyle("  film ", "  {prompt}, film grain", "blurry"))
    store.save(PromptStyle("ink", "ink wash"))
    sheet = store.save(PromptStyle("film", "{prompt}, film", ""))  # same name: replaced
    assert sheet.styles == (
        PromptStyle("film", "{prompt}, film", ""),
        PromptStyle("ink", "ink wash"),
    )
    assert path.read_bytes().startswith(b"\xef\xbb\xbfname,prompt,negative_prompt\r\n")
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".styles-")] == []
    # a hand edit is seen without a restart
    with path.open("a", encoding="utf-8", newline="") as stream:
        stream.write("added,by hand,\r\n")
    assert store.sheet().names == ["film", "ink", "added"]
    assert store.resolve(["ink", "film"]) == (sheet.styles[1], sheet.styles[0])
    with pytest.raises(InvalidRequestError, match="unknown style 'nope'.*'film'") as error:
        store.resolve(["nope"])
    assert error.value.field == "styles"
    assert store.delete("ink").names == ["film", "added"]
    with pytest.raises(NotFoundError):
        store.delete("ink")
    for bad in (PromptStyle(""), PromptStyle("#x"), PromptStyle("x", "a\x00b")):
        with pytest.raises(InvalidRequestError):
            store.save(bad)


def test_csv_module_reads_what_we_write(tmp_path: Path) -> None:
    """A1111's own reader (csv.DictReader, skipinitialspace) reads our file back."""
    path = tmp_path / "styles.csv"
    StyleStore(path).save(PromptStyle("q", 'say "hi", then\nbye', "x, y"))
    with open(path, encoding="utf-8-sig", newline="") as stream:
        rows = list(csv.DictReader(io.StringIO(stream.read()), skipinitialspace=True))
    assert rows == [{"name": "q", "prompt": 'say "hi", then\nbye', "negative_prompt": "x, y"}]


def test_a_symlinked_file_is_saved_where_it_points_with_its_mode(tmp_path: Path) -> None:
    """People share one styles.csv between A1111, Forge and us: the link stays a link."""
    shared = tmp_path / "a1111" / "styles.csv"
    shared.parent.mkdir()
    a1111_file(shared, A1111_ROWS[:1])
    shared.chmod(0o664)
    link = tmp_path / "data" / "styles.csv"
    link.parent.mkdir()
    link.symlink_to(shared)
    StyleStore(link).save(PromptStyle("new", "x"))
    assert link.is_symlink() and read_styles(shared).names == ["cinematic", "new"]
    assert shared.stat().st_mode & 0o777 == 0o664
    fresh = tmp_path / "fresh" / "styles.csv"
    StyleStore(fresh).save(PromptStyle("new", "x"))
    assert fresh.stat().st_mode & 0o777 == 0o644
