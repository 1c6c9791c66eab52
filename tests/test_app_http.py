"""The real app as a user starts it: `python app.py` serves a working txt2img page."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds}s")


@contextlib.contextmanager
def app_server(data: Path, *extra: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """`python app.py --data-dir data` on a free port, stopped afterwards; `env` adds to or
    replaces this process's environment."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", LORASTACK_THREADS="1", **(env or {}))
    with (data / "app.log").open("w") as sink:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--data-dir", str(data), "--port", str(port), *extra],
            cwd=PROJECT,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, process)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    data = tmp_path_factory.mktemp("app-data")
    with app_server(data) as url:
        yield url, data, data / "app.log"


def test_page_serves_on_localhost_with_demo_notice(server: tuple[str, Path, Path]) -> None:
    url, _, log = server
    with urllib.request.urlopen(url, timeout=10) as response:
        page = response.read().decode()
    assert "lorastack" in page
    assert "Demo model" in page or "demo" in page.lower()
    assert "random weights" in log.read_text()
    # Tests run with HF_HUB_OFFLINE=1: no first-run download is tried, and both say why.
    assert "no checkpoint was found and HF_HUB_OFFLINE is set" in log.read_text()
    assert "HF_HUB_OFFLINE is set" in page
    assert "Download a starter checkpoint" in page  # the starter list, while the demo runs


def test_txt2img_through_gradio_client(server: tuple[str, Path, Path]) -> None:
    from gradio_client import Client

    url, data, _ = server
    client = Client(url, verbose=False)
    gallery, infotext, seeds = client.predict(
        prompt="a lighthouse",
        negative_prompt="",
        steps=2,
        cfg_scale=7.0,
        sampler_name="Euler",
        scheduler="Automatic",
        seed=11,
        width=64,
        height=64,
        batch_size=1,
        n_iter=1,
        clip_skip=1,
        checkpoint="lorastack-demo-tiny",
        loras=[],
        api_name="/txt2img",
    )
    client.close()
    assert len(gallery) == 1
    assert "Seed: 11" in infotext and "Size: 64x64" in infotext and seeds == [11]
    saved = list((data / "outputs" / "txt2img-images").rglob("*.png"))
    assert len(saved) == 1 and saved[0].name.endswith("-11.png")
