"""All benchmarks in one command: prints tables, writes JSON and a chart. CPU by default.

    .venv/bin/python -m bench.run            # CPU run (SD1.5-size models; ~20 min)
    .venv/bin/python -m bench.run --full     # also eager vs --compile and the HTTP row (~1 h)
    .venv/bin/python -m bench.run --quick    # tiny models only (CI proves it runs)

Each part runs in its own process, so each peak resident memory figure is that part's.
Figures are medians of several runs with the spread shown; no test ever asserts a time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_part(module: str, quick: bool, folder: Path, *extra: str) -> dict:
    """Run `python -m bench.<module>` and return its JSON (tables go to our stdout)."""
    out = folder / f"{module}.json"
    command = [sys.executable, "-m", f"bench.{module}", "--json", str(out), *extra]
    if quick:
        command.append("--quick")
    subprocess.run(command, cwd=ROOT, check=True)
    return json.loads(out.read_text())


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def startup(folder: Path) -> dict:
    """Seconds from `python app.py` to the page answering and to the first image (demo
    model, 64x64, 4 steps, through the Gradio API)."""
    from gradio_client import Client

    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_DISABLE_TELEMETRY="1")
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "app.py", "--data-dir", str(folder / "app"), "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = started + 300
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5):
                    break
            except OSError:
                if time.perf_counter() > deadline or process.poll() is not None:
                    raise RuntimeError("the app did not start") from None
                time.sleep(0.1)
        page = time.perf_counter() - started
        Client(url, verbose=False).predict(
            prompt="a lighthouse",
            negative_prompt="",
            steps=4,
            cfg_scale=7.0,
            seed=1,
            width=64,
            height=64,
            batch_size=1,
            n_iter=1,
            sampler_name="Euler",
            scheduler="Automatic",
            clip_skip=1,
            api_name="/txt2img",
        )
        first_image = time.perf_counter() - started
    finally:
        process.terminate()
        process.wait(timeout=30)
    return {"to_http_s": page, "to_first_image_s": first_image}


def chart(lora: dict, path: Path) -> None:
    """Seconds per step against the number of LoRAs, merged vs unmerged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [row["loras"] for row in lora["steps"]]
    figure, axes = plt.subplots(figsize=(6, 3.6), dpi=120)
    axes.plot(counts, [r["unmerged"] for r in lora["steps"]], "o-", label="unmerged (per step)")
    axes.plot(counts, [r["merged"] for r in lora["steps"]], "s-", label="merged (lorastack)")
    axes.plot(counts, [r["base"] for r in lora["steps"]], ":", color="grey", label="base model")
    axes.set_xlabel("rank-16 LoRAs active")
    axes.set_ylabel("seconds per UNet step")
    axes.set_title(f"{lora['model']}, {lora['threads']} CPU threads")
    axes.set_ylim(bottom=0)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models only (CI)")
    parser.add_argument("--full", action="store_true", help="add --compile and HTTP rows")
    parser.add_argument("--json", type=Path, default=None, help="results file")
    parser.add_argument("--chart", type=Path, default=None, help="chart PNG")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        results = {
            "date": dt.date.today().isoformat(),
            "device": "cpu",
            "engine_vs_plain": run_part(
                "bench_engine", args.quick, folder, *(["--compile"] if args.full else [])
            ),
            "lora": run_part("bench_lora", args.quick, folder),
            "startup": startup(folder),
        }
        if args.full:
            results["http"] = run_part("bench_http", args.quick, folder)
    start = results["startup"]
    print(
        f"\n| start-up (demo model) | seconds |\n|---|---:|\n| to HTTP answer | "
        f"{start['to_http_s']:.1f} |\n| to first image | {start['to_first_image_s']:.1f} |"
    )
    print("\n| part | peak RSS MB |\n|---|---:|")
    for part in ("engine_vs_plain", "lora"):
        print(f"| {part} | {results[part]['peak_rss_mb']:.0f} |")
    json_path = args.json or Path(tempfile.gettempdir()) / "lorastack-bench.json"
    json_path.write_text(json.dumps(results, indent=2))
    chart_path = args.chart or Path(tempfile.gettempdir()) / "lorastack-lora-steps.png"
    chart(results["lora"], chart_path)
    print(f"\nJSON: {json_path}\nchart: {chart_path}")


if __name__ == "__main__":
    main()
