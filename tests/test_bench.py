"""The benchmark command runs end to end in its short mode (no time is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def test_bench_run_quick_writes_tables_json_and_chart(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.run",
            "--quick",
            "--json",
            str(tmp_path / "r.json"),
            "--chart",
            str(tmp_path / "c.png"),
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "merged vs base" in done.stdout and "to first image" in done.stdout
    results = json.loads((tmp_path / "r.json").read_text())
    assert [row["loras"] for row in results["lora"]["steps"]] == [0, 1, 2, 5]
    assert results["engine_vs_plain"]["rows"][0]["ratio"] > 0
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_bench_code_runs_on_cpu() -> None:
    """The GPU benchmark's code path, exercised on the CPU with the tiny UNet."""
    import torch

    from bench.bench_gpu import Variant, measure, variants

    found = variants(torch.device("cpu"))
    assert all(v.attention == "sdpa" and v.compile_mode is None for v in found)
    assert {v.loras for v in found} == {0, 5}
    row = measure("tiny", Variant("sdpa", None, True, 5), torch.device("cpu"), torch.float32, 64, 2)
    assert row["it_per_s"] > 0 and row["peak_gpu_mb"] is None


def test_gallery_bench_runs_and_prints_its_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.gallery_listing", "--images", "120", "--runs", "2"],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "index 120 images cold" in done.stdout and "last page (3 of 3)" in done.stdout


def test_batching_bench_runs_and_prints_its_table(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.bench_batching",
            "--quick",
            "--requests",
            "3",
            "--window-ms",
            "1000",  # all three submitted within it even on a loaded machine
            "--json",
            str(tmp_path / "b.json"),
        ],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Machine:" in done.stdout and "| tiny demo | 64 | 4 |" in done.stdout
    row = json.loads((tmp_path / "b.json").read_text())["rows"][0]
    assert row["alone_unet_calls"] == 3 * 4 and row["batched_unet_calls"] == 4
