"""First run as a user sees it: `python app.py` with no checkpoint serves the page at once,
shows the default checkpoint's download as it arrives (page and console), then swaps the
demo model for it. The fake Hub holds the file after its first chunk until the test has
seen the progress on the page.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants

from deployments.firstrun import DEFAULT_STARTER, STARTERS, BackgroundDownload
from tests import test_browser, test_firstrun
from tests.fake_hub import FakeHub
from tests.test_app_http import app_server
from tests.test_browser import TIMEOUT_MS

browser = test_browser.browser
starter_repo = test_firstrun.starter_repo
DEFAULT = (DEFAULT_STARTER.repo_id, DEFAULT_STARTER.filename)


@pytest.fixture(scope="module")
def held_hub(starter_repo: Path) -> Iterator[tuple[FakeHub, threading.Event]]:
    """The fake Hub with the starters; the default's bytes stop after one download chunk
    (huggingface_hub reports progress per chunk) until the event is set."""
    release = threading.Event()
    with FakeHub() as hub:
        for starter in STARTERS:
            hub.add_repo(starter.repo_id, starter_repo)
        hub.hold[DEFAULT] = (constants.DOWNLOAD_CHUNK_SIZE, release)
        try:
            yield hub, release
        finally:
            release.set()  # never leave the app's download thread waiting


def test_the_page_serves_during_the_download_shows_it_and_then_uses_the_file(
    tmp_path: Path, held_hub: tuple[FakeHub, threading.Event], browser: object
) -> None:
    hub, release = held_hub
    name = DEFAULT_STARTER.filename
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DOWNLOAD_TIMEOUT": "30",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    with app_server(tmp_path, env=env) as url:
        context = browser.new_context(viewport={"width": 1400, "height": 1100})
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        try:
            page.goto(url)  # the download is held: the page already serves
            page.locator("#generate").wait_for()
            banner = page.locator("#demo_banner")
            assert "being downloaded" in banner.inner_text()
            progress = page.locator("#first_download")
            page.wait_for_function(
                "() => /Downloading .* MB of .* MB \\(\\d+%\\)/"
                ".test(document.querySelector('#first_download').innerText)"
            )
            shown = progress.inner_text()
            assert name in shown and "demo model runs meanwhile" in shown
            percent = int(shown.split("(")[1].split("%")[0])
            assert 0 < percent < 100  # one chunk of the file, not all of it
            assert not (tmp_path / "models" / name).exists()
            release.set()
            page.wait_for_function(
                "() => document.querySelector('#first_download').innerText.includes('Downloaded')"
            )
            assert "it is the checkpoint now" in progress.inner_text()
            banner.wait_for(state="hidden")
            menu = page.locator("#checkpoint input")
            page.wait_for_function(
                f"() => document.querySelector('#checkpoint input').value.startsWith('{name}')"
            )
            assert (tmp_path / "models" / name).is_file()
            page.locator("#generate").click()
            page.wait_for_function(
                "() => document.querySelector('#infotext textarea').value.includes('Model: ')",
                timeout=120_000,
            )
            infotext = page.locator("#infotext textarea").input_value()
            assert f"Model: {name.removesuffix('.safetensors')}" in infotext
            assert menu.input_value().startswith(name)
        finally:
            context.close()
    console = (tmp_path / "app.log").read_text(errors="replace")
    assert f"{name}: 100%" in console  # the console's progress bar


def test_a_failed_background_download_keeps_the_demo_and_offers_the_starters(
    tmp_path: Path,
) -> None:
    """This process is offline (conftest): the download fails at once, the failure is kept
    for the page (not raised on the thread), and the page's next tick shows the starter
    list and a banner that says what to do; nothing is placed."""
    from frontends.page.ui import download_updates

    download = BackgroundDownload(DEFAULT_STARTER, tmp_path)
    placed: list[Path] = []
    assert download_updates(download, lambda: "x")[0].startswith("Downloading **")
    download.start(placed.append).join(timeout=30)
    assert download.finished.is_set() and download.placed is None and placed == []
    assert "could not be downloaded" in (download.failure or "")
    line, banner, starters, menu, timer = download_updates(download, lambda: "x")
    assert line.startswith(f"The download of **{DEFAULT_STARTER.filename}** failed")
    assert "download a starter below" in banner.value and starters.visible is True
    assert timer.active is False and not (tmp_path / DEFAULT_STARTER.filename).exists()


def test_progress_lines_name_the_file_and_the_share_done() -> None:
    download = BackgroundDownload(DEFAULT_STARTER, Path("models"))
    download.report(250 * 10**6, 2 * 10**9)
    assert download.line() == (
        f"Downloading **{DEFAULT_STARTER.filename}** from the Hub: 250.0 MB of 2.00 GB (12%); "
        "the demo model runs meanwhile."
    )
