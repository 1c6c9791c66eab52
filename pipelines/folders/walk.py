"""Walking a model folder: files by extension, marker folders, symlinks followed safely."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path


def walk_files(
    root: Path,
    extensions: Iterable[str],
    marker: str | None = None,
    skip_top: Iterable[str] = (),
) -> Iterator[Path]:
    """Files under `root` with one of `extensions` (any case), plus folders holding `marker`
    (diffusers and PEFT folders); follows symlinks, cutting loops; skips hidden and
    temporary names, and the top-level folders named in `skip_top` (case-insensitive:
    another kind's folder inside a checkpoint folder, e.g. `models/Lora`)."""
    wanted = tuple(e.lower() for e in extensions)
    skipped = {name.lower() for name in skip_top}
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
                if not (folder == root and child.name.lower() in skipped):
                    stack.append(path)
            elif is_file and child.name.lower().endswith(wanted):
                yield path
