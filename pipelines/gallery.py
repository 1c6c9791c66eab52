"""Everything the outputs folders hold, newest first, searchable by what made it.

The index reads each image's parameters once (a PNG's text chunk or a JPEG/WebP's EXIF
comment: Pillow reads those from the header, never the pixels), keeps them by path + size
+ mtime in `<cache>/gallery-index.json`, and on every refresh only lists the folders and
reads what is new or changed. Thumbnails are made once into `<cache>/thumbnails/`.

Requests name items by the id the index gave them (the path relative to the outputs
folder); a name the index never listed, or one that leaves the folder, is a 404. Deleting
moves the file into `<outputs>/.trash/` (same relative path, never overwriting), from
where it can be restored until the trash is emptied.

On a shared server every image has an owner: the front end records who made it
(`record_owner`) and passes that visitor as `owner` to every call, so a visitor lists,
opens, deletes, restores and empties only their own images; an image nobody recorded
(made before, or by the API or the CLI) belongs to nobody there. `owner=None` is the
single local user, who sees everything. Owners are kept as a short hash of the visitor key
in `<cache>/gallery-owners.json`, by path relative to the outputs folder (trashed files as
`.trash/<trash id>`), so that file names no address or session.
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
OWNERS_FILE = "gallery-owners.json"
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
    owner: str | None = None  # a shared server's visitor: only their images; None: all
    page: int = 0
    per_page: int = PAGE_SIZE


@dataclass(frozen=True)
class GalleryPage:
    items: tuple[GalleryItem, ...]
    page: int
    pages: int
    total: int  # items matching the filters


def owner_tag(owner: str) -> str:
    """What the owners file keeps for a visitor key: a short hash, never the key itself."""
    return hashlib.sha256(owner.encode()).hexdigest()[:20]


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
        self._owners: dict[str, str] = {}  # relative path -> owner_tag
        self._lock = threading.Lock()
        self._load()

    # -- the index

    def _load(self) -> None:
        try:
            owners = json.loads((self.cache_dir / OWNERS_FILE).read_text(encoding="utf-8"))
            self._owners = {str(k): str(v) for k, v in owners.items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, AttributeError) as error:
            # never guess: unreadable owners make those images nobody's on a shared server
            log.warning("gallery owners unreadable (%s); images have no owner", error)
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

    def _save_owners(self) -> None:
        """Called with the lock held."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        write_replacing(self.cache_dir / OWNERS_FILE, json.dumps(self._owners).encode())

    def _owns(self, owner: str | None, relpath: str) -> bool:
        """Called with the lock held."""
        return owner is None or self._owners.get(relpath) == owner_tag(owner)

    def record_owner(self, path: Path, owner: str) -> None:
        """Note that `owner` made the saved file `path` (inside the outputs folder)."""
        try:
            relpath = path.resolve().relative_to(self.outputs_dir.resolve()).as_posix()
        except ValueError:
            message = f"{path.name} is not in the outputs folder"
            raise InvalidRequestError(message, field="image") from None
        with self._lock:
            self._owners[relpath] = owner_tag(owner)
            self._save_owners()

    def _move_owner(self, old: str, new: str) -> None:
        """Called with the lock held: a file moved (to or from the trash)."""
        tag = self._owners.pop(old, None)
        if tag is not None:
            self._owners[new] = tag
            self._save_owners()

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
            items = [i for i in self._items.values() if self._owns(query.owner, i.id)]
        found = [item for item in items if item.matches(query)]
        found.sort(key=lambda item: (item.mtime_ns, item.id), reverse=True)
        pages = max(1, -(-len(found) // query.per_page))
        page = min(query.page, pages - 1)
        start = page * query.per_page
        return GalleryPage(tuple(found[start : start + query.per_page]), page, pages, len(found))

    def days(self, owner: str | None = None) -> list[str]:
        with self._lock:
            days = {i.day for i in self._items.values() if self._owns(owner, i.id)}
        return sorted(days, reverse=True)

    def item(self, item_id: str, owner: str | None = None) -> GalleryItem:
        """A listed item; another visitor's is as unknown as a missing one (404)."""
        with self._lock:
            found = self._items.get(item_id) if self._owns(owner, item_id) else None
        if found is None:
            raise NotFoundError(f"no image {item_id!r} in the outputs", field="image")
        return found

    def path(self, item_id: str, owner: str | None = None) -> Path:
        """The file of a listed item (never a path the index did not list)."""
        return self.outputs_dir / self.item(item_id, owner).id

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

    def delete(self, item_id: str, owner: str | None = None) -> str:
        """Move the item (`owner`'s, when given) into the trash, its relative path kept;
        returns its trash id."""
        source = self.path(item_id, owner)
        target = _free_name(self.trash_dir() / item_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)
        trash_id = target.relative_to(self.trash_dir()).as_posix()
        with self._lock:
            self._items.pop(item_id, None)
            self._save()
            self._move_owner(item_id, f"{TRASH}/{trash_id}")
        return trash_id

    def trashed(self, owner: str | None = None) -> list[str]:
        """Trash ids (paths relative to the trash; `owner`'s only, when given), newest
        first."""
        trash = self.trash_dir()
        if not trash.is_dir():
            return []
        found = [p for p in trash.rglob("*") if p.is_file() and not p.is_symlink()]
        found.sort(key=lambda p: p.stat().st_mtime_ns, reverse=True)
        ids = [p.relative_to(trash).as_posix() for p in found]
        with self._lock:
            return [i for i in ids if self._owns(owner, f"{TRASH}/{i}")]

    def restore(self, trash_id: str, owner: str | None = None) -> str:
        """Put a trashed file (`owner`'s, when given) back where it was (a new number if
        that name is taken now); returns its gallery id."""
        if trash_id not in self.trashed(owner):
            raise NotFoundError(f"no image {trash_id!r} in the trash", field="image")
        source = self.trash_dir() / trash_id
        target = _free_name(self.outputs_dir / trash_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(source, target)
        item_id = target.relative_to(self.outputs_dir).as_posix()
        with self._lock:
            self._move_owner(f"{TRASH}/{trash_id}", item_id)
        self.refresh()
        return item_id

    def empty_trash(self, owner: str | None = None) -> int:
        """Delete the trash (`owner`'s files only, when given) for good; returns how many
        files."""
        if owner is None:
            count = len(self.trashed())
            shutil.rmtree(self.trash_dir(), ignore_errors=True)
            with self._lock:
                self._owners = {
                    k: v for k, v in self._owners.items() if not k.startswith(f"{TRASH}/")
                }
                self._save_owners()
            return count
        mine = self.trashed(owner)
        with self._lock:
            for trash_id in mine:
                (self.trash_dir() / trash_id).unlink(missing_ok=True)
                self._owners.pop(f"{TRASH}/{trash_id}", None)
            self._save_owners()
        return len(mine)


def _free_name(path: Path) -> Path:
    """`path`, or `name (2).ext`, ... when taken: nothing is ever overwritten."""
    if not path.exists():
        return path
    for number in range(2, 100_000):
        candidate = path.with_name(f"{path.stem} ({number}){path.suffix}")
        if not candidate.exists():
            return candidate
    raise OSError(f"no free name for {path.name}")
