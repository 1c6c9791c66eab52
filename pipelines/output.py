"""Saving images: dated folders, A1111 sequence names, atomic, never overwriting."""

from __future__ import annotations

import datetime as dt
import os
import re
import stat
import tempfile
import threading
import time
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
