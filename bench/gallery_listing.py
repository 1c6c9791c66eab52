"""Gallery listing benchmark: 10,000 saved images, indexed cold, then pages served warm.

Prints a table from real runs (repeats, median and spread, the machine); asserts nothing.
Run from the repo root:

    .venv/bin/python -m bench.gallery_listing              # 10,000 images
    .venv/bin/python -m bench.gallery_listing --images 200 # quick check (CI)

The images are 8x8 PNGs with a full A1111 parameters chunk (what the index reads), spread
over 10 days and two kinds; half carry a LoRA tag.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from pipelines.gallery import GalleryIndex, GalleryQuery
from pipelines.infotext import write_png_with_infotext


def write_images(outputs: Path, count: int) -> None:
    image = Image.new("RGB", (8, 8), (90, 120, 200))
    for n in range(count):
        kind = "txt2img-images" if n % 4 else "img2img-images"
        day = (dt.date(2026, 11, 20) + dt.timedelta(days=n % 10)).isoformat()
        lora = " <lora:ink:0.8>" if n % 2 else ""
        text = (
            f"a lighthouse number {n}, dusk, detailed{lora}\nNegative prompt: blurry\n"
            f"Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: {n}, "
            "Size: 512x512, Model hash: 0123456789, Model: model-a, Version: lorastack"
        )
        folder = outputs / kind / day
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{n:05d}-{n}.png"
        path.write_bytes(write_png_with_infotext(image, text))
        os.utime(path, (1_700_000_000 + n, 1_700_000_000 + n))


def timed(function: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return times


def row(name: str, times: list[float]) -> str:
    ms = [t * 1000 for t in times]
    spread = f"{min(ms):.1f}-{max(ms):.1f}"
    return f"| {name} | {len(ms)} | {statistics.median(ms):.1f} | {spread} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        outputs, cache = root / "outputs", root / "cache"
        write_images(outputs, args.images)
        cold = []
        for run in range(min(args.runs, 3)):  # a fresh index each time: every file read
            started = time.perf_counter()
            GalleryIndex(outputs, root / f"cold-{run}").refresh()
            cold.append(time.perf_counter() - started)
        index = GalleryIndex(outputs, cache)
        index.refresh()
        pages = index.query(GalleryQuery()).pages
        restarted = timed(lambda: GalleryIndex(outputs, cache).refresh(), args.runs)
        lines = [
            row(f"index {args.images} images cold (read every header)", cold),
            row("restart: load the index, list the folders, read nothing", restarted),
            row("refresh, nothing changed", timed(index.refresh, args.runs)),
            row("first page (48)", timed(lambda: index.query(GalleryQuery()), args.runs)),
            row(
                f"middle page ({pages // 2 + 1} of {pages})",
                timed(lambda: index.query(GalleryQuery(page=pages // 2)), args.runs),
            ),
            row(
                f"last page ({pages} of {pages})",
                timed(lambda: index.query(GalleryQuery(page=pages - 1)), args.runs),
            ),
            row(
                "first page, filtered by LoRA",
                timed(lambda: index.query(GalleryQuery(lora="ink")), args.runs),
            ),
            row(
                "first page, prompt text + day",
                timed(lambda: index.query(GalleryQuery(text="dusk", day="2026-11-25")), args.runs),
            ),
        ]
        first = index.query(GalleryQuery()).items
        thumbs = timed(lambda: [index.thumbnail(item.id) for item in first], 1)
        cached = timed(lambda: [index.thumbnail(item.id) for item in first], args.runs)
        lines.append(row("48 thumbnails, made", thumbs))
        lines.append(row("48 thumbnails, cached", cached))
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d')}"
    )
    print("| step | runs | median ms | min-max ms |")
    print("|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
