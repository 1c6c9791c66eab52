"""Saving images: dated folders, A1111 sequence names, atomic, never overwriting."""

from __future__ import annotations

import datetime as dt
import os
import re
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

SEQUENCE = re.compile(r"^(\d{5,})-")
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


def write_new_file(folder: Path, make_name: Callable[[int], str], data: bytes) -> Path:
    """Write `data` under a fresh name: temp file, fsync, then a hard link that fails if the
    name exists, so a crash never leaves a half-written file under a final name and nothing
    is ever overwritten. `make_name(n)` gives the n-th candidate name."""
    folder.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(dir=folder, prefix=".saving-", suffix=".tmp")
    temporary = Path(temporary_name)
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes 0600; images are meant to be shared
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        with _NAMING:  # one sequence number per image, also across threads
            number = next_sequence_number(folder)
            for _ in range(10_000):
                target = folder / make_name(number)
                try:
                    os.link(temporary, target)
                except FileExistsError:
                    number += 1
                    continue
                return target
        raise OSError(f"no free file name in {folder}")
    finally:
        temporary.unlink(missing_ok=True)


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
