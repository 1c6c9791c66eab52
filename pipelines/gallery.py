"""Everything the outputs folders hold, newest first, searchable by what made it.

The index reads each image's parameters once (a PNG's text chunk or a JPEG/WebP's EXIF
comment: Pillow reads those from the header, never the pixels), keeps them by path + size
+ mtime in `<cache>/gallery-index.json`, and on every refresh only lists the folders and
reads what is new or changed. Thumbnails are made once into `<cache>/thumbnails/`.

Requests name items by the id the index gave them (the path relative to the outputs
folder); a name the index never listed, or one that leaves the folder, is a 404. Deleting
moves the file into `<outputs>/.trash/` (same relative path, never overwriting), from
where it can be restored until the trash is emptied.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from pipelines.errors import InvalidRequestError, LorastackError, NotFoundError
from pipelines.images import open_image
from pipelines.infotext import parse_infotext, read_infotext
from pipelines.output import write_replacing
from pipelines.prompt import extract_lora_tags

log = logging.getLogger(__name__)

KINDS = ("txt2img-images", "img2img-images", "extras-images", "txt2img-grids", "img2img-grids")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
TRASH = ".trash"
INDEX_FILE = "gallery-index.json"
THUMBNAIL_SIDE = 256
PAGE_SIZE = 48


@dataclass(frozen=True)
class GalleryItem:
    """One image: where it is, when, and what its parameters say made it."""

    id: str  # path relative to the outputs folder, "/" separators
    kind: str
    day: str  # its dated folder, YYYY-MM-DD
    size: int
    mtime_ns: int
    infotext: str = ""
    prompt: str = ""
    checkpoint: str = ""  # infotext "Model"
    model_hash: str = ""
    loras: tuple[str, ...] = field(default_factory=tuple)
    seed: str = ""

    def matches(self, query: GalleryQuery) -> bool:
        if query.kind and self.kind != query.kind:
            return False
        if query.day and not self.day.startswith(query.day):
            return False
        if query.text and query.text.lower() not in self.infotext.lower():
            return False
        if query.checkpoint and query.checkpoint.lower() not in (
            f"{self.checkpoint} {self.model_hash}".lower()
        ):
            return False
        return not query.lora or any(query.lora.lower() == n.lower() for n in self.loras)


@dataclass(frozen=True)
class GalleryQuery:
    """Filters (all optional, all must hold) and the page wanted (0-based)."""

    text: str = ""  # anywhere in the parameters: prompt, negative, any value
    checkpoint: str = ""  # part of the Model name or hash
    lora: str = ""  # a LoRA's name (prompt tag or Lora hashes)
    day: str = ""  # YYYY-MM-DD, or a prefix: YYYY-MM
    kind: str = ""  # one of KINDS
    page: int = 0
    per_page: int = PAGE_SIZE


@dataclass(frozen=True)
class GalleryPage:
    items: tuple[GalleryItem, ...]
    page: int
    pages: int
    total: int  # items matching the filters


def _facts(relpath: str, path: Path, size: int, mtime_ns: int) -> GalleryItem:
    """The item for one file: its parameters read from the header only."""
    kind, day = (relpath.split("/") + ["", ""])[:2]
    try:
        infotext = read_infotext(path) or ""
    except (LorastackError, OSError) as error:
        log.warning("gallery: %s has unreadable parameters (%s)", relpath, error)
        infotext = ""
    parsed = parse_infotext(infotext) if infotext else None
    params = parsed.params if parsed else {}
    tags: list[str] = []
    if parsed is not None:
        try:
            tags = [spec.name for spec in extract_lora_tags(parsed.prompt)[1]]
        except LorastackError:
            tags = []
    loras = tuple(dict.fromkeys([*tags, *(parsed.lora_hashes if parsed else {})]))
    return GalleryItem(
        id=relpath,
        kind=kind,
        day=day,
        size=size,
        mtime_ns=mtime_ns,
        infotext=infotext,
        prompt=parsed.prompt if parsed else "",
        checkpoint=params.get("Model", ""),
        model_hash=params.get("Model hash", ""),
        loras=loras,
        seed=params.get("Seed", ""),
    )


class GalleryIndex:
    """The outputs folders' images, kept up to date by `refresh`.

    Args:
        outputs_dir: the data folder's `outputs/`.
        cache_dir: where the index and the thumbnails are kept.
    """

    def __init__(self, outputs_dir: Path, cache_dir: Path) -> None:
        self.outputs_dir = outputs_dir
        self.cache_dir = cache_dir
        self._items: dict[str, GalleryItem] = {}
        self._lock = threading.Lock()
        self._load()

    # -- the index

    def _load(self) -> None:
        try:
            stored = json.loads((self.cache_dir / INDEX_FILE).read_text(encoding="utf-8"))
            items = [GalleryItem(**{**i, "loras": tuple(i["loras"])}) for i in stored["items"]]
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError) as error:
            log.warning("gallery index unreadable (%s); it is rebuilt", error)
            return
        self._items = {item.id: item for item in items}

    def _save(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        items = [asdict(item) for item in self._items.values()]
        write_replacing(self.cache_dir / INDEX_FILE, json.dumps({"items": items}).encode())

    def _listed(self) -> Iterable[tuple[str, Path, os.stat_result]]:
        for kind in KINDS:
            top = self.outputs_dir / kind
            if not top.is_dir():
                continue
            for day in os.scandir(top):
                if not day.is_dir(follow_symlinks=False) or day.name.startswith("."):
                    continue
                for file in os.scandir(day.path):
                    name = file.name
                    if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                        continue
                    if not file.is_file(follow_symlinks=False):
                        continue
                    stat = file.stat(follow_symlinks=False)
                    if stat.st_size == 0:  # a save's placeholder, not yet an image
                        continue
                    yield f"{kind}/{day.name}/{name}", Path(file.path), stat

    def refresh(self) -> int:
        """List the folders; read new and changed files; forget removed ones. Returns how
        many files were read."""
        seen: dict[str, GalleryItem] = {}
        read = 0
        with self._lock:
            known = dict(self._items)
        for relpath, path, stat in self._listed():
            item = known.get(relpath)
            if item is None or (item.size, item.mtime_ns) != (stat.st_size, stat.st_mtime_ns):
                item = _facts(relpath, path, stat.st_size, stat.st_mtime_ns)
                read += 1
            seen[relpath] = item
        with self._lock:
            changed = read > 0 or seen.keys() != self._items.keys()
            self._items = seen
            if changed:
                self._save()
        return read

    def query(self, query: GalleryQuery) -> GalleryPage:
        """The page of items matching `query`, newest first (by file time, then name)."""
        if query.per_page < 1 or query.page < 0:
            raise InvalidRequestError("page must be >= 0 and per_page >= 1", field="page")
        with self._lock:
            items = list(self._items.values())
        found = [item for item in items if item.matches(query)]
        found.sort(key=lambda item: (item.mtime_ns, item.id), reverse=True)
        pages = max(1, -(-len(found) // query.per_page))
        page = min(query.page, pages - 1)
        start = page * query.per_page
        return GalleryPage(tuple(found[start : start + query.per_page]), page, pages, len(found))

    def days(self) -> list[str]:
        with self._lock:
            return sorted({item.day for item in self._items.values()}, reverse=True)

    def item(self, item_id: str) -> GalleryItem:
        with self._lock:
            found = self._items.get(item_id)
        if found is None:
            raise NotFoundError(f"no image {item_id!r} in the outputs", field="image")
        return found

    def path(self, item_id: str) -> Path:
        """The file of a listed item (never a path the index did not list)."""
        return self.outputs_dir / self.item(item_id).id

    # -- thumbnails

    def thumbnail(self, item_id: str) -> Path:
        """A small WebP of the item, made once per file version."""
        item = self.item(item_id)
        key = hashlib.sha1(f"{item.id}|{item.size}|{item.mtime_ns}".encode()).hexdigest()
        target = self.cache_dir / "thumbnails" / f"{key}.webp"
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_image(self.outputs_dir / item.id) as image:
            small = image.convert("RGB")
            small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
        staged = target.with_suffix(".tmp")
        small.save(staged, format="WEBP", quality=80)
        os.replace(staged, target)
        return target

    # -- trash

    def trash_dir(self) -> Path:
        return self.outputs_dir / TRASH

    def delete(self, item_id: str) -> str:
        """Move the item into the trash (its relative path kept); returns its trash id."""
        source = self.path(item_id)
        target = _free_name(self.trash_dir() / item_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)
        with self._lock:
            self._items.pop(item_id, None)
            self._save()
        return target.relative_to(self.trash_dir()).as_posix()

    def trashed(self) -> list[str]:
        """Trash ids (paths relative to the trash), newest first."""
        trash = self.trash_dir()
        if not trash.is_dir():
            return []
        found = [p for p in trash.rglob("*") if p.is_file() and not p.is_symlink()]
        found.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
        return [p.relative_to(trash).as_posix() for p in found]

    def restore(self, trash_id: str) -> str:
        """Put a trashed file back where it was (a new number if that name is taken now);
        returns its gallery id."""
        if trash_id not in self.trashed():
            raise NotFoundError(f"no image {trash_id!r} in the trash", field="image")
        source = self.trash_dir() / trash_id
        target = _free_name(self.outputs_dir / trash_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)
        self.refresh()
        return target.relative_to(self.outputs_dir).as_posix()

    def empty_trash(self) -> int:
        """Delete everything in the trash for good; returns how many files."""
        count = len(self.trashed())
        shutil.rmtree(self.trash_dir(), ignore_errors=True)
        return count


def _free_name(path: Path) -> Path:
    """`path`, or `name (2).ext`, ... when taken: nothing is ever overwritten."""
    if not path.exists():
        return path
    for number in range(2, 100_000):
        candidate = path.with_name(f"{path.stem} ({number}){path.suffix}")
        if not candidate.exists():
            return candidate
    raise OSError(f"no free name for {path.name}")
