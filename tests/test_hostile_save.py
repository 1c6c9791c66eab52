"""Data safety under kill -9: a process saving big PNGs in a loop through
`pipelines.output.save_png` is SIGKILLed at random moments; every file under a final
`NNNNN-SEED.png` name decodes completely or is the empty placeholder a killed save had
reserved, leftover `.saving-*.tmp` files are hidden temporaries that no listing takes for
an image, and the start-up clean-up removes both.

Atomic writes, never overwriting and a failing write are covered in test_output.py.
"""

from __future__ import annotations

import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.output import SEQUENCE, next_sequence_number, remove_stale_placeholders
from tests.test_app_http import PROJECT

SAVER = """
import io, sys
from pathlib import Path
import numpy as np
from PIL import Image
from pipelines.output import save_png
noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
buffer = io.BytesIO()
Image.fromarray(noise).save(buffer, format="PNG", compress_level=0)
png = buffer.getvalue()
print(len(png), flush=True)
for seed in range(10_000):
    save_png(Path(sys.argv[1]), png, seed)
"""


def test_kill_9_mid_save_leaves_no_half_written_png(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    rng = random.Random(1234)
    expected_size = None
    for _ in range(4):
        saver = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(outputs)],
            cwd=PROJECT,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert saver.stdout is not None
            expected_size = int(saver.stdout.readline())  # the PNG is ready; saving starts
            time.sleep(rng.uniform(0.05, 0.6))
        finally:
            saver.send_signal(signal.SIGKILL)
            saver.wait(timeout=30)
            if saver.stdout is not None:
                saver.stdout.close()
    (folder,) = (outputs / "txt2img-images").iterdir()
    names = sorted(os.listdir(folder))
    placeholders = [n for n in names if SEQUENCE.match(n) and not (folder / n).stat().st_size]
    finals = [n for n in names if SEQUENCE.match(n) and n not in placeholders]
    assert finals, f"nothing was saved before the kills: {names}"
    assert len(placeholders) <= 4  # at most the name each killed save had reserved
    for name in finals:
        data = (folder / name).read_bytes()
        assert len(data) == expected_size, name
        with Image.open(io.BytesIO(data)) as image:
            pixels = np.asarray(image.convert("RGB"))  # decodes every row
        assert pixels.shape == (1024, 1024, 3)
    leftovers = [n for n in names if n not in finals and n not in placeholders]
    assert all(n.startswith(".saving-") and n.endswith(".tmp") for n in leftovers), leftovers
    reserved = [*finals, *placeholders]
    numbers = sorted(int(SEQUENCE.match(n).group(1)) for n in reserved)  # type: ignore[union-attr]
    assert next_sequence_number(folder) == numbers[-1] + 1  # temporaries are not counted
    later = time.time() + 3600  # the next start-up clears what the kills left
    remove_stale_placeholders(outputs, now=later)
    assert sorted(os.listdir(folder)) == sorted(finals)
