"""Prompt styles: A1111's `styles.csv` (read, saved), applied to requests, and found again
in a pasted prompt.

Follows A1111 v1.10's `modules/styles.py`:
- the file is CSV with the header `name,prompt,negative_prompt` (the old `name,text` works),
  UTF-8 with a byte-order mark, read with `skipinitialspace`; rows whose name starts with
  `#` are comments;
- a style's text with `{prompt}` replaces the placeholder with the prompt; without it the
  style is appended after `, ` (both stripped, empty parts left out); styles apply in the
  order given, the negative prompt the same way with the negative texts;
- pasting an infotext finds the styles whose texts end (or frame, with `{prompt}`) both
  prompts, removes them and selects the styles ("Apply if any", A1111's default).

Stricter than A1111 on purpose: a row A1111 would load wrongly (more cells than the header,
no name, NUL or bytes that are not UTF-8, a CSV error) is reported with its line number and
left out, and the other rows load; such rows and comment rows are written back unchanged when
the file is saved, so saving never loses a line the admin wrote. Saves are atomic (a temporary
file, then `os.replace`), keeping the previous file as `styles.csv.bak` as A1111 does.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import InvalidRequestError, NotFoundError, UnusableFileError

if TYPE_CHECKING:
    from pipelines.schema import GenerationRequest

STYLES_FILE = "styles.csv"
"""The styles file's name in the data dir (A1111's default `styles.csv`)."""
COLUMNS = ("name", "prompt", "negative_prompt")
"""A1111's header, in the order it writes it."""
PLACEHOLDER = "{prompt}"
MAX_NAME_CHARS = 200
MAX_TEXT_CHARS = 20_000

_BOM = "\ufeff"


@dataclass(frozen=True)
class PromptStyle:
    """One style: texts merged into the prompt and the negative prompt."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""


@dataclass(frozen=True)
class StyleProblem:
    """A row of the file that was not loaded, and why (`line` counts from 1)."""

    line: int
    message: str

    def __str__(self) -> str:
        return f"{STYLES_FILE} line {self.line}: {self.message}"


@dataclass(frozen=True)
class KeptRows:
    """Lines of the file written back as they were: comments and malformed rows."""

    text: str


@dataclass(frozen=True)
class StyleSheet:
    """A styles file as read: its rows in order, and the problems found.

    `writable` is False when the header is unusable (then nothing loads, and saving is
    refused rather than overwriting the admin's file).
    """

    entries: tuple[PromptStyle | KeptRows, ...] = ()
    problems: tuple[StyleProblem, ...] = ()
    writable: bool = True

    @property
    def styles(self) -> tuple[PromptStyle, ...]:
        return tuple(e for e in self.entries if isinstance(e, PromptStyle))

    @property
    def names(self) -> list[str]:
        return [style.name for style in self.styles]

    def get(self, name: str) -> PromptStyle | None:
        return next((style for style in self.styles if style.name == name), None)

    def with_style(self, style: PromptStyle) -> StyleSheet:
        """This sheet with `style` replacing the one of the same name, else appended."""
        if self.get(style.name) is None:
            return replace(self, entries=(*self.entries, style))
        entries = tuple(
            style if isinstance(e, PromptStyle) and e.name == style.name else e
            for e in self.entries
        )
        return replace(self, entries=entries)

    def without(self, name: str) -> StyleSheet:
        entries = tuple(
            e for e in self.entries if not (isinstance(e, PromptStyle) and e.name == name)
        )
        return replace(self, entries=entries)


# ------------------------------------------------------------------------ applying


def merge_prompts(style_text: str, prompt: str) -> str:
    """A1111's `merge_prompts`: `{prompt}` is replaced, else the style is appended.

    Example: `merge_prompts("photo of {prompt}", "a cat")` -> `"photo of a cat"`;
    `merge_prompts("film grain", "a cat ")` -> `"a cat, film grain"`.
    """
    if PLACEHOLDER in style_text:
        return style_text.replace(PLACEHOLDER, prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, style_texts: Iterable[str]) -> str:
    """Merge each style text into `prompt` in turn (A1111's `apply_styles_to_prompt`)."""
    for text in style_texts:
        prompt = merge_prompts(text, prompt)
    return prompt


def apply_to_request(
    request: GenerationRequest, styles: Sequence[PromptStyle]
) -> GenerationRequest:
    """`request` with `styles` merged into its prompts (and a hires pass's own prompts, as
    A1111 styles `hr_prompt`); `request.styles` keeps the names."""
    positive = [style.prompt for style in styles]
    negative = [style.negative_prompt for style in styles]
    styled = replace(
        request,
        prompt=apply_styles(request.prompt, positive),
        negative_prompt=apply_styles(request.negative_prompt, negative),
    )
    hires = request.hires
    if hires is not None and (hires.prompt or hires.negative_prompt):
        # an empty hires prompt means "the first pass's", which is styled already
        styled = replace(
            styled,
            hires=replace(
                hires,
                prompt=apply_styles(hires.prompt, positive) if hires.prompt else "",
                negative_prompt=apply_styles(hires.negative_prompt, negative)
                if hires.negative_prompt
                else "",
            ),
        )
    return styled


def extract_style_text(style_text: str, prompt: str) -> tuple[bool, str]:
    """A1111's `extract_style_text_from_prompt`: whether `prompt` carries `style_text`
    (framing it, with `{prompt}`; ending it, without), and the prompt without it.

    Example: `extract_style_text("masterpiece", "1girl, masterpiece")` -> `(True, "1girl")`.
    """
    stripped_prompt = prompt.strip()
    stripped_style = style_text.strip()
    if PLACEHOLDER in stripped_style:
        left, _, right = stripped_style.partition(PLACEHOLDER)
        if PLACEHOLDER in right:  # A1111's split(..., 2) cannot unpack this: no match
            return False, prompt
        if stripped_prompt.startswith(left) and stripped_prompt.endswith(right):
            return True, stripped_prompt[len(left) : len(stripped_prompt) - len(right)]
    elif stripped_prompt.endswith(stripped_style):
        rest = stripped_prompt[: len(stripped_prompt) - len(stripped_style)]
        return True, rest[:-2] if rest.endswith(", ") else rest
    return False, prompt


def _extract_one(style: PromptStyle, prompt: str, negative: str) -> tuple[bool, str, str]:
    if not style.prompt and not style.negative_prompt:
        return False, prompt, negative
    matched, new_prompt = extract_style_text(style.prompt, prompt)
    if not matched:
        return False, prompt, negative
    matched, new_negative = extract_style_text(style.negative_prompt, negative)
    if not matched:
        return False, prompt, negative
    return True, new_prompt, new_negative


def extract_styles(
    styles: Sequence[PromptStyle], prompt: str, negative_prompt: str
) -> tuple[list[str], str, str]:
    """A1111's `extract_styles_from_prompt`: peel off the styles the prompts end with (the
    last applied first) and return their names in applied order, with the prompts left.

    Example: with style `film` = ("film grain", ""), `extract_styles([film], "a cat,
    film grain", "")` -> `(["film"], "a cat", "")`.
    """
    found: list[str] = []
    candidates = list(styles)
    while True:
        for style in candidates:
            matched, new_prompt, new_negative = _extract_one(style, prompt, negative_prompt)
            if matched:
                prompt, negative_prompt = new_prompt, new_negative
                candidates.remove(style)
                found.append(style.name)
                break
        else:
            break
    return list(reversed(found)), prompt, negative_prompt


# ------------------------------------------------------------------------ the file


def _bad_text(value: str) -> str | None:
    if "\x00" in value:
        return "it contains a NUL character"
    if any("\udc80" <= ch <= "\udcff" for ch in value):
        return "it is not UTF-8 text"
    return None


def parse_styles(text: str) -> StyleSheet:
    """Read a styles file's text (the byte-order mark removed) as A1111 reads it; rows that
    cannot be read are reported with their line number and kept aside, the others load.

    Example: `parse_styles("name,prompt,negative_prompt\\nfilm,film grain,\\n").names`
    -> `["film"]`.
    """
    lines = io.StringIO(text, newline="").readlines()
    reader = csv.reader(iter(lines), skipinitialspace=True)
    entries: list[PromptStyle | KeptRows] = []
    problems: list[StyleProblem] = []
    header: list[str] | None = None
    where: dict[str, int] = {}  # name -> index in entries
    first_line: dict[str, int] = {}
    start = 0
    while True:
        try:
            row = next(reader)
            error = None
        except StopIteration:
            break
        except csv.Error as caught:
            row, error = [], f"not valid CSV: {caught}"
        line, raw = start + 1, "".join(lines[start : reader.line_num])
        start = reader.line_num

        def keep(message: str | None, raw: str = raw, line: int = line) -> None:
            entries.append(KeptRows(raw))
            if message:
                problems.append(StyleProblem(line, message))

        if error is not None:
            keep(error)
            continue
        if not row:  # a blank line
            continue
        if header is None:
            header = [cell.strip() for cell in row]
            if "name" not in header or not {"prompt", "text"} & set(header):
                problems.append(
                    StyleProblem(
                        line,
                        f"the header must name the columns {','.join(COLUMNS)}; "
                        f"it is {','.join(header)!r}, so no style was loaded",
                    )
                )
                return StyleSheet(tuple(entries), tuple(problems), writable=False)
            continue
        values = dict(zip(header, row, strict=False))
        name = values.get("name", "")
        if name.startswith("#"):
            keep(None)  # a comment row (A1111 skips them)
            continue
        if len(row) > len(header):
            keep(
                f"{len(row)} cells but the header has {len(header)}; put a prompt that "
                'contains commas in double quotes ("a, b")'
            )
            continue
        if not name.strip():
            keep("the row has no style name")
            continue
        prompt = values.get("prompt", values.get("text", ""))
        negative = values.get("negative_prompt", "")
        reason = next(filter(None, map(_bad_text, (name, prompt, negative))), None)
        if reason is not None:
            keep(reason)
            continue
        style = PromptStyle(name, prompt, negative)
        if name in where:  # as in A1111, the later row wins and takes the earlier's place
            problems.append(
                StyleProblem(
                    line,
                    f"style {name!r} is also on line {first_line[name]}; this row replaces it",
                )
            )
            entries[where[name]] = style
            continue
        where[name], first_line[name] = len(entries), line
        entries.append(style)
    return StyleSheet(tuple(entries), tuple(problems))


def format_styles(sheet: StyleSheet) -> str:
    """The file's text (without the byte-order mark) as A1111 writes it: the header, then
    each style, QUOTE_MINIMAL, CRLF; kept rows are written back as they were."""
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for entry in sheet.entries:
        if isinstance(entry, PromptStyle):
            writer.writerow((entry.name, entry.prompt, entry.negative_prompt))
        else:
            out.write(entry.text if entry.text.endswith(("\n", "\r")) else entry.text + "\r\n")
    return out.getvalue()


def read_styles(path: Path) -> StyleSheet:
    """The styles in `path` (none when it does not exist)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return StyleSheet()
    text = data.decode("utf-8", errors="surrogateescape")
    return parse_styles(text.removeprefix(_BOM))


def write_styles(path: Path, sheet: StyleSheet) -> None:
    """Save atomically: a temporary file in the same folder, then `os.replace`; the file
    it replaces is kept as `<name>.bak` (A1111 keeps one backup too). A symlinked file (one
    styles.csv shared with A1111 or Forge) is saved where the link points, with its mode."""
    data = (_BOM + format_styles(sheet)).encode("utf-8", errors="surrogateescape")
    target = path.resolve() if path.is_symlink() else path
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=".styles-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        if target.exists():
            shutil.copymode(target, temporary)
            shutil.copy2(target, target.with_name(target.name + ".bak"))
        else:
            os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide it from other tools
        os.replace(temporary, target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def check_style(style: PromptStyle) -> PromptStyle:
    """A style fit to save: a name that reads back as a style (not a `#` comment), texts
    without NUL and within the prompt limit; leading spaces are dropped, since A1111's
    reader drops them anyway."""
    name = style.name.strip() if isinstance(style.name, str) else ""
    if not name:
        raise InvalidRequestError("a style needs a name", field="name")
    if name.startswith("#"):
        raise InvalidRequestError(
            "a style name must not start with '#' (such rows are comments)", field="name"
        )
    if len(name) > MAX_NAME_CHARS:
        raise InvalidRequestError(
            f"a style name is at most {MAX_NAME_CHARS} characters", field="name"
        )
    texts = {"prompt": style.prompt, "negative_prompt": style.negative_prompt}
    for label, value in (("name", name), *texts.items()):
        if not isinstance(value, str) or _bad_text(value) or len(value) > MAX_TEXT_CHARS:
            raise InvalidRequestError(
                f"the style's {label} must be text of at most {MAX_TEXT_CHARS} characters "
                "without NUL",
                field=label,
            )
    return PromptStyle(name, style.prompt.lstrip(), style.negative_prompt.lstrip())


@dataclass
class StyleStore:
    """The data dir's styles file, re-read when it changes on disk (an admin may edit it by
    hand), saved atomically under a lock."""

    path: Path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _cached: tuple[tuple[int, int] | None, StyleSheet] | None = field(default=None, repr=False)

    def _stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def sheet(self) -> StyleSheet:
        """The styles as the file holds them now."""
        with self._lock:
            return self._current()

    def _current(self) -> StyleSheet:
        stamp = self._stamp()
        if self._cached is None or self._cached[0] != stamp:
            self._cached = (stamp, read_styles(self.path))
        return self._cached[1]

    def resolve(self, names: Sequence[str]) -> tuple[PromptStyle, ...]:
        """The styles `names` ask for, in order. A1111 skips unknown names silently; here
        an unknown name is an error naming the field `styles` and listing the known ones,
        so a client never gets images without the style it asked for."""
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise InvalidRequestError("styles must be a list of style names", field="styles")
        sheet = self.sheet()
        found = []
        for name in names:
            style = sheet.get(name)
            if style is None:
                known = ", ".join(repr(n) for n in sheet.names) or "none"
                raise InvalidRequestError(
                    f"styles: unknown style {name!r}; {STYLES_FILE} has {known}", field="styles"
                )
            found.append(style)
        return tuple(found)

    def save(self, style: PromptStyle) -> StyleSheet:
        """Add `style`, or replace the style of that name (A1111's "save style")."""
        style = check_style(style)
        with self._lock:
            sheet = self._writable()
            return self._write(sheet.with_style(style))

    def delete(self, name: str) -> StyleSheet:
        with self._lock:
            sheet = self._writable()
            if sheet.get(name) is None:
                raise NotFoundError(f"there is no style {name!r} to delete", field="name")
            return self._write(sheet.without(name))

    def _writable(self) -> StyleSheet:
        sheet = self._current()
        if not sheet.writable:
            problems = "; ".join(str(p) for p in sheet.problems)
            raise UnusableFileError(
                f"{problems}. Fix the file by hand; it is not overwritten", field="styles"
            )
        return sheet

    def _write(self, sheet: StyleSheet) -> StyleSheet:
        write_styles(self.path, sheet)
        saved = read_styles(self.path)
        self._cached = (self._stamp(), saved)
        return saved
