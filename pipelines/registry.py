"""The model folders: what is there, what each file is, and safe name -> path resolution.

A request can only ever name an entry the scan listed, so no request reaches a path
outside the listing. Operator-made symlinks inside the folders are followed (people share
one model folder between tools); loops are cut. Hashes are computed in the background and
cached by path + size + mtime, so a rescan never re-hashes an unchanged file.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipelines.architecture import Architecture, detect_architecture
from pipelines.errors import NotFoundError, UnusableFileError
from pipelines.loading import architecture_of_diffusers_folder
from pipelines.safeload import non_utf8_name_error, printable_name, read_safetensors_header

log = logging.getLogger(__name__)

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")
HASH_CHUNK = 1 << 20


def sha256_of_file(path: Path) -> str:
    """Full-file sha256 (A1111's AutoV2 "Model hash" is its first 10 hex digits)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """sha256 values keyed by real path + size + mtime, persisted as JSON under the cache."""

    def __init__(self, file: Path | None) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._values: dict[str, str] = {}
        if file is not None and file.is_file():
            try:
                loaded = json.loads(file.read_text())
                self._values = {str(k): str(v) for k, v in loaded.items()}
            except (OSError, ValueError):
                log.warning("hash cache %s is unreadable; starting afresh", file)

    @staticmethod
    def key(path: Path, kind: str = "sha256") -> str | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        return f"{kind}|{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"

    def get(self, path: Path, kind: str = "sha256") -> str | None:
        key = self.key(path, kind)
        with self._lock:
            return self._values.get(key) if key else None

    def compute(self, path: Path, kind: str, function: Callable[[Path], str]) -> str:
        """The cached value, or compute, store and persist it."""
        cached = self.get(path, kind)
        if cached is not None:
            return cached
        key = self.key(path, kind)
        value = function(path)
        if key is not None and key == self.key(path, kind):  # unchanged while hashing
            with self._lock:
                self._values[key] = value
                self._save()
        return value

    def _save(self) -> None:
        if self._file is None:
            return
        self._file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._file.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(self._values, indent=0, sort_keys=True))
        os.replace(temporary, self._file)


def walk_files(root: Path, extensions: Iterable[str], marker: str | None = None) -> Iterator[Path]:
    """Files under `root` with one of `extensions` (any case), plus folders holding `marker`
    (diffusers folders); follows symlinks, cutting loops; skips hidden and temporary names."""
    wanted = tuple(e.lower() for e in extensions)
    seen: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            stat = folder.stat()
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            continue
        seen.add((stat.st_dev, stat.st_ino))
        if marker and folder != root and (folder / marker).is_file():
            yield folder
            continue
        try:
            children = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for child in children:
            if child.name.startswith(".") or child.name.endswith((".tmp", ".part", ".partial")):
                continue
            path = Path(child.path)
            try:
                is_dir = child.is_dir()
                is_file = child.is_file()
            except OSError:
                continue
            if is_dir:
                stack.append(path)
            elif is_file and child.name.lower().endswith(wanted):
                yield path


@dataclass(frozen=True)
class CheckpointEntry:
    """One listed checkpoint. `error` is set (and `architecture` None) when unusable."""

    relpath: str  # relative to its models folder, with extension, "/" separators
    path: Path
    root: Path
    kind: str  # "single" or "diffusers"
    size: int
    mtime_ns: int
    architecture: Architecture | None = None
    error: str | None = None
    sha256: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def model_name(self) -> str:
        """Relative path without extension (A1111 `model_name`)."""
        if self.kind == "diffusers":
            return self.relpath
        return self.relpath.rsplit(".", 1)[0]

    @property
    def short_hash(self) -> str | None:
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        return f"{self.relpath} [{self.short_hash}]" if self.short_hash else self.relpath

    @property
    def infotext_name(self) -> str:
        """Basename without extension: A1111's infotext `Model:` value."""
        return Path(self.model_name).name


def _classify_checkpoint(path: Path) -> tuple[Architecture | None, str | None]:
    """Architecture from the safetensors header; pickles are classified when loaded."""
    if path.is_dir():
        try:
            return architecture_of_diffusers_folder(path), None
        except UnusableFileError as error:
            return None, error.message
    if path.suffix.lower() != ".safetensors":
        return None, None
    try:
        header = read_safetensors_header(path)
        shapes = {name: info.shape for name, info in header.tensors.items()}
        return detect_architecture(shapes, source=path.name).architecture, None
    except UnusableFileError as error:
        return None, error.message
    except ValueError as error:
        return None, str(error)


class CheckpointRegistry:
    """The checkpoints in the models folders, rescanned on demand."""

    def __init__(self, roots: Iterable[Path], hashes: HashCache) -> None:
        self.roots = tuple(roots)
        self.hashes = hashes
        self._lock = threading.Lock()
        self._entries: dict[str, CheckpointEntry] = {}
        self._classified: dict[tuple[str, int, int], tuple[Architecture | None, str | None]] = {}

    def scan(self) -> list[CheckpointEntry]:
        """Rescan every root; unchanged files keep their classification and hash."""
        entries: dict[str, CheckpointEntry] = {}
        for root in self.roots:
            if not root.is_dir():
                continue
            for path in walk_files(root, CHECKPOINT_EXTENSIONS, marker="model_index.json"):
                entry = self._entry_for(root, path)
                if entry is None:
                    continue
                if entry.relpath in entries:
                    kept = entries[entry.relpath]
                    clash = f"name clash: {path} is hidden by {kept.path}"
                    entries[entry.relpath] = replace(kept, notes=(*kept.notes, clash))
                    log.warning(clash)
                    continue
                entries[entry.relpath] = entry
        with self._lock:
            self._entries = entries
        return self.entries()

    def _entry_for(self, root: Path, path: Path) -> CheckpointEntry | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        relpath = path.relative_to(root).as_posix()
        bad_name = non_utf8_name_error(relpath)
        relpath = printable_name(relpath)
        kind = "diffusers" if path.is_dir() else "single"
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._classified:
            if bad_name:
                self._classified[key] = (None, bad_name)
            elif kind == "single" and stat.st_size == 0:
                self._classified[key] = (None, f"{relpath}: empty file (0 bytes)")
            else:
                self._classified[key] = _classify_checkpoint(path)
        architecture, error = self._classified[key]
        sha = None if kind == "diffusers" else self.hashes.get(path)
        return CheckpointEntry(
            relpath=relpath,
            path=path,
            root=root,
            kind=kind,
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
            architecture=architecture,
            error=error,
            sha256=sha,
        )

    def entries(self) -> list[CheckpointEntry]:
        with self._lock:
            return sorted(self._entries.values(), key=lambda e: e.relpath.lower())

    def hash_all(self) -> None:
        """Compute missing hashes (run in a background thread at scan time)."""
        for entry in self.entries():
            if entry.kind != "single" or entry.sha256 or entry.error:
                continue
            try:
                digest = self.hashes.compute(entry.path, "sha256", sha256_of_file)
            except OSError as error:
                log.warning("cannot hash %s: %s", entry.path, error)
                continue
            with self._lock:
                current = self._entries.get(entry.relpath)
                if current is not None and current.mtime_ns == entry.mtime_ns:
                    self._entries[entry.relpath] = replace(current, sha256=digest)

    def refresh_entry(self, entry: CheckpointEntry) -> CheckpointEntry:
        """Record facts learnt while loading (hash, architecture of a pickle)."""
        with self._lock:
            self._entries[entry.relpath] = entry
        return entry

    def resolve(self, name: str) -> CheckpointEntry:
        """A title, model_name, relative path, file name or hash -> the one entry it names.

        Raises NotFoundError listing close matches, or UnusableFileError when ambiguous.
        """
        wanted = name.strip()
        entries = self.entries()
        for matcher in (
            lambda e: wanted in (e.title, e.relpath, e.model_name),
            lambda e: wanted.lower() in (e.title.lower(), e.relpath.lower(), e.model_name.lower()),
            lambda e: wanted in (Path(e.relpath).name, e.infotext_name),
            lambda e: (
                bool(e.sha256)
                and len(wanted) >= 8
                and e.sha256.startswith(wanted.lower().strip("[]"))
            ),
        ):
            found = [e for e in entries if matcher(e)]
            if len(found) == 1:
                return found[0]
            if len(found) > 1:
                raise UnusableFileError(
                    f"checkpoint name '{name}' is ambiguous: "
                    + ", ".join(e.relpath for e in found),
                    field="checkpoint",
                )
        names = [e.title for e in entries]
        close = difflib.get_close_matches(wanted, names, n=5, cutoff=0.3)
        hint = f"; close matches: {', '.join(close)}" if close else ""
        known = f"; known: {', '.join(names[:20])}" if names and not close else ""
        raise NotFoundError(f"unknown checkpoint '{name}'{hint}{known}", field="checkpoint")

    def register_path(self, path: Path) -> CheckpointEntry:
        """List a file or diffusers folder outside the models folders. Only for the
        operator's own `--ckpt PATH`; request-supplied names never reach this."""
        path = path.resolve()
        entry = self._entry_for(path.parent, path)
        if entry is None:
            raise NotFoundError(f"checkpoint path {path} does not exist", field="ckpt")
        entry = replace(entry, relpath=path.as_posix())
        with self._lock:
            self._entries.setdefault(entry.relpath, entry)
            return self._entries[entry.relpath]
