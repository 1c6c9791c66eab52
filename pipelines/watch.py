"""Hot folders: rescan models/ and loras/ when files appear, change or go away.

watchfiles (inotify where available) reports changes; a slow periodic rescan backs it up
for what events miss (operator symlinks to other folders, network mounts). Rescans are
cheap: the registries reuse what they know about files whose size and mtime are unchanged.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import watchfiles

log = logging.getLogger(__name__)


class FolderWatcher:
    """Calls `on_change()` after files change under `roots` (debounced), and at least every
    `poll_seconds`. Runs in one daemon thread; `stop()` ends it."""

    def __init__(
        self,
        roots: Iterable[Path],
        on_change: Callable[[], None],
        *,
        debounce_ms: int = 400,
        poll_seconds: float = 30.0,
        force_polling: bool | None = None,
    ) -> None:
        self.roots = tuple(Path(r) for r in roots)
        self.on_change = on_change
        self.debounce_ms = debounce_ms
        self.poll_seconds = poll_seconds
        self.force_polling = force_polling
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> FolderWatcher:
        self._thread = threading.Thread(target=self._run, name="folder-watcher", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _rescan(self) -> None:
        try:
            self.on_change()
        except Exception:  # a rescan must never kill the watcher; the next one retries
            log.exception("rescan after a folder change failed")

    def _run(self) -> None:
        while not self._stop.is_set():
            roots = [r for r in self.roots if r.is_dir()]
            if not roots:
                self._stop.wait(self.poll_seconds)
                self._rescan()
                continue
            for _changes in watchfiles.watch(
                *roots,
                stop_event=self._stop,
                debounce=self.debounce_ms,
                rust_timeout=int(self.poll_seconds * 1000),
                yield_on_timeout=True,
                force_polling=self.force_polling,
                raise_interrupt=False,
            ):
                self._rescan()
