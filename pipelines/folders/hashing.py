"""File hashes A1111 users rely on, cached by path + size + mtime and computed once.

`HashCache.compute` is single-flight: two callers asking for the same file's hash at the
same time share one read of the file (a multi-GB checkpoint is read once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from pipelines.safeload import read_safetensors_header

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20

HashFunction = Callable[[Path], str]


def sha256_of_file(path: Path) -> str:
    """Full-file sha256 (A1111's AutoV2 "Model hash" is its first 10 hex digits)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def addnet_hash(path: Path) -> str:
    """A1111's LoRA hash: sha256 of a safetensors file's bytes after its header (metadata
    edits do not change it); other files hash whole."""
    if path.suffix.lower() != ".safetensors":
        return sha256_of_file(path)
    header = read_safetensors_header(path)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(header.data_offset)
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


DEFAULT_FUNCTIONS: Mapping[str, HashFunction] = {"sha256": sha256_of_file, "addnet": addnet_hash}


class HashCache:
    """Hash values keyed by real path + size + mtime, persisted as JSON under the cache.

    Args:
        file: where the values persist (None: memory only).
        functions: hash kind -> function; tests inject slow or counting ones here.
    """

    def __init__(
        self, file: Path | None, functions: Mapping[str, HashFunction] | None = None
    ) -> None:
        self._file = file
        self._functions = dict(DEFAULT_FUNCTIONS if functions is None else functions)
        self._lock = threading.Lock()
        self._values: dict[str, str] = {}
        self._running: dict[str, threading.Event] = {}
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

    def compute(self, path: Path, kind: str = "sha256") -> str:
        """The cached value, or compute, store and persist it; concurrent callers for the
        same file and kind wait for one computation instead of reading the file twice."""
        while True:
            key = self.key(path, kind)
            with self._lock:
                if key is not None and key in self._values:
                    return self._values[key]
                running = self._running.get(key or "")
                if running is None:
                    mine = threading.Event()
                    if key is not None:
                        self._running[key] = mine
                    break
            running.wait()
        try:
            value = self._functions[kind](path)
            if key is not None and key == self.key(path, kind):  # unchanged while hashing
                with self._lock:
                    self._values[key] = value
                    self._save()
            return value
        finally:
            with self._lock:
                self._running.pop(key or "", None)
            mine.set()

    def _save(self) -> None:
        if self._file is None:
            return
        self._file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._file.with_suffix(f".tmp{os.getpid()}")
        temporary.write_text(json.dumps(self._values, indent=0, sort_keys=True))
        os.replace(temporary, self._file)
