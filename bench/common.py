"""What every benchmark table states: the machine, repeats and spread; and cold files.

A figure without its machine, repeat count and spread cannot be judged, so every table is
printed under `machine()` and its cells come from `Stat`.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch


def machine() -> str:
    """CPU (or GPU) model, cores, torch threads, versions, load and date."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{model}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}; {dt.date.today().isoformat()}"
    )


@dataclass(frozen=True)
class Stat:
    """Median of repeated measurements with their spread (max - min)."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        return max(self.values) - min(self.values)

    def cell(self, digits: int = 3) -> str:
        return f"{self.median:.{digits}f} ±{self.spread:.{digits}f}"

    def as_dict(self) -> dict[str, object]:
        return {"median": self.median, "spread": self.spread, "values": list(self.values)}


def filesystem(path: Path) -> str:
    """The type of the filesystem holding `path` (longest mount point in /proc/mounts)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _device, point, fstype, *_ = line.split()
            if str(path.resolve()).startswith(point) and len(point) > len(best):
                best, kind = point, fstype
    except OSError:
        pass
    return kind


def resident_bytes(path: Path) -> int | None:
    """Bytes of `path` in the page cache, from util-linux `fincore` (None: not installed)."""
    if shutil.which("fincore") is None:
        return None
    done = subprocess.run(
        ["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout.split()[0])


def make_cold(path: Path) -> str:
    """Push `path` out of the page cache (fsync, then posix_fadvise DONTNEED) and say how,
    with fincore's count of bytes still resident; a RAM-backed folder cannot be cold."""
    kind = filesystem(path)
    if kind in ("tmpfs", "ramfs"):
        return f"NOT cold: {path.parent} is on {kind} (RAM)"
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(descriptor)
    resident = resident_bytes(path)
    checked = "fincore not installed" if resident is None else f"fincore: {resident} B resident"
    return f"fsync + posix_fadvise(DONTNEED) on {kind}; {checked} of {path.stat().st_size} B"
