"""Saving images: dated folders, A1111 sequence names and file-name patterns, A1111's
formats with the parameters inside, atomic, never overwriting."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
import stat
import string
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from PIL import ExifTags, Image

from pipelines.errors import InvalidRequestError
from pipelines.infotext import parse_infotext, write_png_with_infotext

log = logging.getLogger(__name__)

SEQUENCE = re.compile(r"^(\d{5,})[-.]")
_NAMING = threading.Lock()


def next_sequence_number(folder: Path) -> int:
    """One past the highest `NNNNN-` prefix in `folder` (A1111's numbering)."""
    highest = -1
    if folder.is_dir():
        for name in os.listdir(folder):
            match = SEQUENCE.match(name)
            if match:
                highest = max(highest, int(match.group(1)))
    return highest + 1


PLACEHOLDER_GRACE_SECONDS = 60
"""A zero-byte image this old is a placeholder a killed save left behind (a live save holds
one for milliseconds)."""


def _reserve(folder: Path, make_name: Callable[[int], str]) -> Path:
    """Create an empty file under the next free sequence name (O_EXCL: never an existing
    one, also across processes)."""
    with _NAMING:  # one sequence number per image, also across threads
        number = next_sequence_number(folder)
        for _ in range(10_000):
            target = folder / make_name(number)
            try:
                handle = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                number += 1
                continue
            os.close(handle)
            return target
    raise OSError(f"no free file name in {folder}")


def write_new_file(folder: Path, make_name: Callable[[int], str], data: bytes) -> Path:
    """Write `data` under a fresh name, atomically and never overwriting.

    The name is reserved first with an empty placeholder (`O_EXCL`); the data goes to a
    temporary file, is fsynced, and `os.replace` puts it onto the placeholder. No hard
    links, which many FUSE/SMB mounts refuse. A crash leaves at most the empty placeholder
    (`remove_stale_placeholders` clears those at start-up) and a hidden temporary, never a
    half-written image under a final name. `make_name(n)` gives the n-th candidate name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    target = _reserve(folder, make_name)
    handle, temporary_name = tempfile.mkstemp(dir=folder, prefix=".saving-", suffix=".tmp")
    temporary = Path(temporary_name)
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; images are meant to be shared
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        target.unlink(missing_ok=True)  # our own empty placeholder
        raise
    finally:
        temporary.unlink(missing_ok=True)
    return target


def remove_stale_placeholders(outputs_dir: Path, now: float | None = None) -> list[Path]:
    """Delete what killed saves left in the outputs: empty `NNNNN-` placeholders and
    `.saving-*.tmp` temporaries older than `PLACEHOLDER_GRACE_SECONDS`. Returns them."""
    now = time.time() if now is None else now
    removed = []
    if not outputs_dir.is_dir():
        return removed
    for path in outputs_dir.rglob("*"):
        name = path.name
        leftover = name.startswith(".saving-") and name.endswith(".tmp")
        if not leftover and SEQUENCE.match(name) is None:
            continue  # not a name a save writes: no stat needed
        try:
            facts = path.lstat()
            if not stat.S_ISREG(facts.st_mode):
                continue
            placeholder = not leftover and facts.st_size == 0
            if (leftover or placeholder) and now - facts.st_mtime > PLACEHOLDER_GRACE_SECONDS:
                path.unlink()
                removed.append(path)
        except OSError:
            continue  # gone meanwhile, or unreadable: not ours to judge
    return removed


def save_png(
    outputs_dir: Path,
    png: bytes,
    seed: int,
    *,
    kind: str = "txt2img-images",
    today: dt.date | None = None,
) -> Path:
    """Save to `<outputs>/<kind>/YYYY-MM-DD/NNNNN-SEED.png` (contract)."""
    day = (today or dt.date.today()).isoformat()
    folder = outputs_dir / kind / day
    return write_new_file(folder, lambda n: f"{n:05d}-{seed}.png", png)


def save_extras_png(outputs_dir: Path, png: bytes, *, today: dt.date | None = None) -> Path:
    """Save an Extras result to `<outputs>/extras-images/YYYY-MM-DD/NNNNN.png` (no seed:
    nothing was generated)."""
    day = (today or dt.date.today()).isoformat()
    return write_new_file(outputs_dir / "extras-images" / day, lambda n: f"{n:05d}.png", png)


SAMPLES_FORMATS = ("png", "jpg", "jpeg", "webp")
"""A1111's `samples_format` values we write (Pillow formats, parameters kept in each)."""
MAX_PART_LENGTH = 128  # A1111's max_filename_part_length
MAX_NAME_BYTES = 240  # below every common file system's 255-byte name limit
INVALID_CHARACTERS = '#<>:"/\\|?*\n\r\t'
_PATTERN = re.compile(r"(.*?)(?:\[([^\[\]]+)\]|$)")
_PATTERN_ARGUMENT = re.compile(r"(.*)<([^>]*)>$")
_NON_LETTERS = re.compile(r"[\s" + re.escape(string.punctuation) + "]+")
PROMPT_WORDS = 8  # A1111's directories_max_prompt_words


@dataclass(frozen=True)
class SaveOptions:
    """A1111's saving options: `samples_format`, `samples_filename_pattern` ("" is A1111's
    `[seed]`), `jpeg_quality` (also WebP's), `webp_lossless`."""

    samples_format: str = "png"
    filename_pattern: str = ""
    jpeg_quality: int = 80
    webp_lossless: bool = False

    def checked(self) -> SaveOptions:
        """These options, or InvalidRequestError naming A1111's option."""
        fmt = self.samples_format.lower() if isinstance(self.samples_format, str) else ""
        if fmt not in SAMPLES_FORMATS:
            raise InvalidRequestError(
                f"samples_format must be one of {', '.join(SAMPLES_FORMATS)}, got "
                f"{self.samples_format!r}",
                field="samples_format",
            )
        if not isinstance(self.filename_pattern, str) or len(self.filename_pattern) > 1000:
            raise InvalidRequestError(
                "samples_filename_pattern must be text of at most 1000 characters",
                field="samples_filename_pattern",
            )
        quality = self.jpeg_quality
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise InvalidRequestError(
                f"jpeg_quality must be an integer from 1 to 100, got {quality!r}",
                field="jpeg_quality",
            )
        if not isinstance(self.webp_lossless, bool):
            raise InvalidRequestError("webp_lossless must be true or false", field="webp_lossless")
        return replace(self, samples_format=fmt)

    @property
    def extension(self) -> str:
        return self.samples_format.lower()


def encode_image(image: Image.Image, infotext: str, options: SaveOptions) -> bytes:
    """The file's bytes with the parameters where A1111 writes them: a PNG `parameters`
    chunk, or for JPEG/WebP an EXIF UserComment (`UNICODE\\0` + UTF-16 big-endian, as
    piexif writes it); PNG Info and the API's `png-info` read both."""
    fmt = options.extension
    if fmt == "png":
        return write_png_with_infotext(image, infotext)
    exif = Image.Exif()
    comment = b"UNICODE\x00" + infotext.encode("utf-16-be")
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.UserComment] = comment
    buffer = io.BytesIO()
    flat = image.convert("RGB") if image.mode not in ("RGB", "L") else image
    if fmt == "webp":
        flat.save(
            buffer,
            format="WEBP",
            quality=options.jpeg_quality,
            lossless=options.webp_lossless,
            exif=exif,
        )
    else:
        flat.save(buffer, format="JPEG", quality=options.jpeg_quality, exif=exif)
    return buffer.getvalue()


def sanitize_part(text: str, replace_spaces: bool = True) -> str:
    """A1111's `sanitize_filename_part`: no path or reserved characters, no leading space,
    no trailing space or dot, at most 128 characters."""
    if replace_spaces:
        text = text.replace(" ", "_")
    text = text.translate({ord(c): "_" for c in INVALID_CHARACTERS})
    return text.lstrip(" ")[:MAX_PART_LENGTH].rstrip(" .")


@dataclass(frozen=True)
class NameContext:
    """What A1111's file-name tags read: the image, its parameters, when it was made."""

    image: Image.Image
    infotext: str
    seed: int
    when: dt.datetime
    batch_number: int | None = None  # 1-based within a batch of several; None: one image


def _tag_values(context: NameContext) -> dict[str, Callable[..., object]]:
    parsed = parse_infotext(context.infotext)
    params = parsed.params
    prompt, negative = parsed.prompt, parsed.negative_prompt

    def short_hash(text: str, length: str = "8") -> str:
        return hashlib.sha256(text.encode()).hexdigest()[: int(length)]

    def moment(fmt: str = "%Y%m%d%H%M%S", _zone: str = "") -> str:
        return context.when.strftime(fmt)

    def words() -> str:
        found = [word for word in _NON_LETTERS.split(prompt) if word] or ["empty"]
        return sanitize_part(" ".join(found[:PROMPT_WORDS]), replace_spaces=False)

    def image_hash(length: str = "8") -> str:
        return hashlib.sha256(context.image.tobytes()).hexdigest()[: int(length)]

    def param(key: str) -> Callable[[], object]:
        return lambda: sanitize_part(params[key], replace_spaces=False) if key in params else None

    return {
        "seed": lambda: context.seed,
        "steps": param("Steps"),
        "cfg": param("CFG scale"),
        "width": lambda: context.image.width,
        "height": lambda: context.image.height,
        "sampler": param("Sampler"),
        "scheduler": param("Schedule type"),
        "model_name": param("Model"),
        "model_hash": param("Model hash"),
        "vae_filename": param("VAE"),
        "clip_skip": lambda: params.get("Clip skip", "1"),
        "denoising": lambda: params.get("Denoising strength", _SKIP_PREVIOUS),
        "date": lambda: context.when.strftime("%Y-%m-%d"),
        "datetime": moment,
        "job_timestamp": lambda: context.when.strftime("%Y%m%d%H%M%S"),
        "prompt": lambda: sanitize_part(prompt),
        "prompt_spaces": lambda: sanitize_part(prompt, replace_spaces=False),
        "prompt_words": words,
        "prompt_hash": lambda length="8": short_hash(prompt, length),
        "negative_prompt_hash": lambda length="8": short_hash(negative, length),
        "full_prompt_hash": lambda length="8": short_hash(f"{prompt} {negative}", length),
        "image_hash": image_hash,
        "batch_number": lambda: context.batch_number or _SKIP_PREVIOUS,
        "none": lambda: "",
    }


_SKIP_PREVIOUS = object()
"""A1111's NOTHING_AND_SKIP_PREVIOUS_TEXT: the tag and the literal text before it vanish."""


def file_decoration(pattern: str, context: NameContext) -> str:
    """A1111's `FilenameGenerator.apply` on `pattern` (`""` is `[seed]`): known tags
    replaced, unknown ones left as written; then made safe as one file-name part (no
    folder separators, whatever the pattern's literal text holds)."""
    values = _tag_values(context)
    result = ""
    for match in _PATTERN.finditer(pattern or "[seed]"):
        text, tag = match.groups()
        if tag is None:
            result += text
            continue
        arguments: list[str] = []
        name = tag
        while (argument := _PATTERN_ARGUMENT.match(name)) is not None:
            name, value = argument.groups()
            arguments.insert(0, value)
        make = values.get(name.lower())
        replacement = None
        if make is not None:
            try:
                replacement = make(*arguments)
            except (TypeError, ValueError):  # a bad argument: the tag stays as written
                replacement = None
        if replacement is _SKIP_PREVIOUS:
            continue
        result += text + (f"[{tag}]" if replacement is None else str(replacement))
    return sanitize_part(result.replace("/", "_").replace("\\", "_"), replace_spaces=False)


def batch_number(index: int, batch_size: int) -> int | None:
    """A1111's `[batch_number]`: 1-based within a batch of several (None for one)."""
    return index % batch_size + 1 if batch_size > 1 and index >= 0 else None


def save_image(
    outputs_dir: Path,
    image: Image.Image,
    infotext: str,
    seed: int,
    *,
    kind: str = "txt2img-images",
    options: SaveOptions = SaveOptions(),  # noqa: B008 - frozen, shared safely
    batch_number: int | None = None,
    now: dt.datetime | None = None,
    folder: Path | None = None,
    data: bytes | None = None,
) -> Path:
    """Save to `<outputs>/<kind>/YYYY-MM-DD/NNNNN-DECORATION.EXT` (CONTRACT; DECORATION is
    the seed unless `options.filename_pattern` says otherwise), or into `folder`, with the
    parameters inside, atomically and never overwriting. `data`: the image already encoded
    with `encode_image` (an API response sends the same bytes)."""
    when = now or dt.datetime.now()
    target = folder or outputs_dir / kind / when.date().isoformat()
    context = NameContext(image, infotext, seed, when, batch_number)
    decoration = file_decoration(options.filename_pattern, context)
    extension = options.extension
    room = MAX_NAME_BYTES - len(extension) - 8  # "NNNNN-" and ".ext"
    decoration = decoration.encode()[:room].decode("utf-8", "ignore").rstrip(" .")
    data = encode_image(image, infotext, options) if data is None else data
    suffix = f"-{decoration}" if decoration else ""
    return write_new_file(target, lambda n: f"{n:05d}{suffix}.{extension}", data)


SAVING_FILE = "saving.json"
"""The saving options in the data folder, so they outlive a restart (A1111's config.json)."""


def read_save_options(data_dir: Path) -> SaveOptions:
    """The stored saving options; a missing or damaged file gives A1111's defaults (and a
    damaged one a warning naming it)."""
    path = data_dir / SAVING_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(SaveOptions)}
        return SaveOptions(**{k: v for k, v in stored.items() if k in known}).checked()
    except FileNotFoundError:
        return SaveOptions()
    except (OSError, ValueError, TypeError, AttributeError, InvalidRequestError) as error:
        log.warning("%s is unreadable (%s); saving as PNG with A1111's names", path, error)
        return SaveOptions()


def write_save_options(data_dir: Path, options: SaveOptions) -> None:
    """Store `options` (atomic replace)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(asdict(options), indent=2)
    write_replacing(data_dir / SAVING_FILE, text.encode())


def write_replacing(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically (a temporary beside it, fsynced, renamed)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".saving-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
