"""The benchmark command runs end to end in its short mode (no time is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
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
    row = results["engine_vs_plain"]["rows"][0]
    assert row["ratio_cold"] > 0 and row["ratio_warm"] > 0
    assert len(row["engine_cold"]["values"]) == len(row["plain_warm"]["values"]) == row["runs"]
    zero = results["lora"]["steps"][0]  # the 0-LoRA row is measured, not copied from base
    assert zero["merged"] != zero["base"] and zero["unmerged"] != zero["base"]
    assert "posix_fadvise(DONTNEED)" in results["lora"]["cold_load"]
    assert "Machine:" in done.stdout
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gpu_bench_drives_the_engine_on_cpu() -> None:
    """The GPU benchmark's code path (the real engine, adapter stack and LoRA files),
    exercised on the CPU with the tiny model."""
    from bench.bench_gpu import measure
    from pipelines.loading import CONFIGS_DIR

    row = measure(CONFIGS_DIR / "demo-tiny.yaml", 64, 12, "cpu", "eager", 4)
    assert row["stack_change_recompiles"] == 0 and row["peak_gpu_mb"] is None
    assert len(row["stack_change_s"]["values"]) == 3
    # a rate from every pair, or none when load inverted a pair (never a made-up one)
    rates = row["it_per_s"]["values"] if row["it_per_s"] else []
    assert (len(rates) == 3 and min(rates) > 0) or row["it_per_s_invalid_pairs"] > 0


def test_unmerged_hooks_scale_by_the_files_alpha() -> None:
    """The bench's per-forward LoRA mode computes what the adapter stack merges."""
    import torch

    from bench.bench_lora import _Pipe, add_hooks, tiny_unet, write_loras
    from pipelines.architecture import Architecture
    from pipelines.lora.stack import AdapterStack

    unet = tiny_unet()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 77, unet.config.cross_attention_dim)
    with tempfile.TemporaryDirectory() as folder, torch.no_grad():
        paths, states = write_loras(unet, 2, 4, Path(folder))
        handles = add_hooks(unet, states)
        hooked = unet(x, 500, encoder_hidden_states=text).sample
        for handle in handles:
            handle.remove()
        AdapterStack(_Pipe(unet), Architecture.SD1).apply_paths(
            [(p, p.stem, 1.0, 1.0) for p in paths]
        )
        merged = unet(x, 500, encoder_hidden_states=text).sample
    torch.testing.assert_close(hooked, merged, rtol=1e-4, atol=1e-4)


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


def test_gpu_checks_run_on_cpu_and_dynamo_changes_no_pixel() -> None:
    """`bench.gpu_verify`'s code path on the CPU with the tiny model: the same seed twice
    gives the same pixels, and dynamo's capture without code generation (what `--compile`
    wraps the UNet in) leaves every pixel of both stacks as eager made it."""
    from bench.gpu_verify import compiled_agreement, determinism
    from pipelines.loading import CONFIGS_DIR
    from pipelines.samplers import schedulers_for

    yaml = CONFIGS_DIR / "demo-tiny.yaml"
    found = determinism(yaml, 64, "cpu", ["Euler a"])
    assert found["combinations"] == len(schedulers_for("Euler a")) and found["differing"] == {}
    agreement = compiled_agreement(yaml, 64, "cpu", ["dynamo-eager"])
    assert agreement["vs_eager"]["dynamo-eager"] == [{"max": 0, "mean": 0.0}] * 2
    assert agreement["stack_change_mean_difference"] > 0
