"""First run: the default checkpoint from a local fake Hub, in one fresh process that runs
app.main's start-up path (settings -> folders -> first_run) once per scenario.

The fake Hub serves tiny single-file checkpoints under the pinned repo ids and file names.
huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE at import and this test process runs
offline (conftest), so the downloads happen in a subprocess; before each scenario it
requests `/_step/NAME`, which sets up that scenario's faults and splits the Hub's request
log, so each scenario's contacts are known.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import constants

from deployments.firstrun import (
    DEFAULT_STARTER,
    STARTERS,
    StarterInfo,
    _check_download,
    download_refusal,
    first_run,
    link_cached_repo,
)
from deployments.hub import resolve_startup_checkpoint
from pipelines.folders.hashing import HashCache
from pipelines.folders.registry import ModelFolders
from pipelines.loading import CONFIGS_DIR, LoadedModel
from pipelines.settings import Settings
from tests.conftest import DEMO_YAML
from tests.fake_hub import COMMIT, FakeHub
from tests.ldm_export import save_single_file
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT = (DEFAULT_STARTER.repo_id, DEFAULT_STARTER.filename)
LICENCES = ["creativeml-openrail-m", "openrail++", "openrail++"]

# Each scenario: (name, data dir, extra flags). `unreachable` points huggingface_hub at a
# closed port (its endpoint is read at import, so the client changes it in place), and
# `preload` fills the Hub cache as a Space's `preload_from_hub` does at build time.
CLIENT = textwrap.dedent("""
    import json, sys, time, urllib.request
    from pathlib import Path
    from huggingface_hub import constants, hf_hub_download
    from deployments.firstrun import DEFAULT_STARTER, STARTERS, first_run, starter_info
    from pipelines.errors import LorastackError
    from pipelines.service import build_folders, build_service
    from pipelines.settings import parse_settings

    root, hub, closed = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    for step, folder, flags in json.loads(sys.argv[4]):
        urllib.request.urlopen(f"{hub}/_step/{step}").read()
        result = {"step": step}
        if step == "info":
            result["info"] = [[i.size, i.sha256, i.licence, i.revision]
                              for i in map(starter_info, STARTERS)]
        elif step == "page":
            from frontends.page.starters_panel import describe_starter, download_choice
            class Rescans:
                count = 0
                def rescan(self): Rescans.count += 1
            fractions = []
            choice = str(STARTERS[1])
            result["info"] = describe_starter(choice)
            result["status"] = download_choice(
                Rescans(), root / "page", choice,
                progress=lambda fraction, desc: fractions.append(fraction))
            result.update(fractions=fractions, rescans=Rescans.count,
                          folder=sorted(p.name for p in (root / "page").iterdir()))
        elif step == "preload":
            for name in (DEFAULT_STARTER.filename, "v1-5-pruned-emaonly.yaml"):
                hf_hub_download(DEFAULT_STARTER.repo_id, name)
        else:
            if step == "unreachable":
                constants.ENDPOINT = closed
            data = root / folder
            settings = parse_settings(["--data-dir", str(data), "--device", "cpu", *flags],
                                      env={})
            settings.models_dirs[0].mkdir(parents=True, exist_ok=True)
            folders = build_folders(settings)
            started = time.monotonic()
            outcome = first_run(settings, folders)
            result.update(seconds=time.monotonic() - started, reason=outcome.reason,
                          checkpoint=outcome.checkpoint and outcome.checkpoint.name,
                          listed=[e.relpath for e in folders.entries("checkpoint")],
                          folder=sorted(p.name for p in settings.models_dirs[0].iterdir()))
            if outcome.checkpoint is not None:
                service = build_service(settings, folders=folders)
                try:
                    result["family"] = service.select_checkpoint(outcome.checkpoint.name).family
                except LorastackError as error:
                    result["family"] = error.message
        print("RESULT " + json.dumps(result), flush=True)
""")

STEPS = [
    ("info", "", []),
    ("fresh", "a", []),
    ("exists", "a", []),
    ("flag", "f", ["--no-download-sd-model"]),
    ("corrupt", "c", []),
    ("interrupted", "r", []),
    ("resumed", "r", []),
    ("page", "", []),
    ("unreachable", "u", []),
    ("preload", "", []),
    ("space", "s", []),
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def starter_repo(tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel) -> Path:
    """One repo folder holding every starter's file name: the tiny SD1 as a single file,
    with the default's same-named sidecar yaml (so it loads) and a file never fetched."""
    root = tmp_path_factory.mktemp("starters")
    first = root / DEFAULT_STARTER.filename
    save_single_file(tiny_sd1.pipe, first, text_encoder_layout="hf")
    for starter in STARTERS[1:]:
        os.link(first, root / starter.filename)
    clip = CONFIGS_DIR / "demo-tiny-clip"
    sidecar = DEMO_YAML.read_text().replace("version: demo-tiny-clip", f"version: {clip}")
    (root / DEFAULT_STARTER.filename.replace(".safetensors", ".yaml")).write_text(sidecar)
    (root / "v1-5-pruned.safetensors").write_bytes(b"another checkpoint, never fetched")
    return root


@pytest.fixture(scope="module")
def hub(starter_repo: Path) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        for starter, licence in zip(STARTERS, LICENCES, strict=True):
            fake.add_repo(starter.repo_id, starter_repo)
            fake.cards[starter.repo_id] = {"license": licence}
        yield fake


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub, starter_repo: Path) -> dict:
    """Every scenario of STEPS in one process; the results and the requests of each."""
    size = (starter_repo / DEFAULT_STARTER.filename).stat().st_size

    def fault(cut: bool = False, corrupt: bool = False) -> None:
        hub.down.clear()
        hub.corrupt.clear()
        if cut:  # the client writes whole 10 MB chunks: drop the connection near the end
            hub.cut[DEFAULT] = size - 1
        if corrupt:
            hub.corrupt.add(DEFAULT)

    hub.on_step = {name: fault for name, _, _ in STEPS}
    hub.on_step["interrupted"] = lambda: fault(cut=True)
    hub.on_step["corrupt"] = lambda: fault(corrupt=True)
    root = tmp_path_factory.mktemp("firstrun")
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens there
    environment = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(PROJECT),
        "HOME": str(root),
        "HF_HOME": str(root / "hf-home"),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, str(root), hub.url, closed, json.dumps(STEPS)],
        env=environment,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT")]
    assert [r["step"] for r in lines] == [name for name, _, _ in STEPS], done.stderr[-4000:]
    return {
        "root": root,
        "size": size,
        "requests": hub.steps(),
        **{r["step"]: r for r in lines},
    }


# ---------------------------------------------------------------------------- downloads


def test_hub_metadata_gives_size_sha256_and_licence(
    run: dict[str, Any], starter_repo: Path
) -> None:
    for starter, licence, info in zip(STARTERS, LICENCES, run["info"]["info"], strict=True):
        path = starter_repo / starter.filename
        assert info == [path.stat().st_size, sha256(path), licence, COMMIT]


def test_first_run_downloads_the_default_with_its_sidecar(
    run: dict[str, Any], starter_repo: Path
) -> None:
    fresh = run["fresh"]
    assert fresh["reason"] is None and fresh["checkpoint"] == DEFAULT_STARTER.filename
    assert fresh["listed"] == [DEFAULT_STARTER.filename] and fresh["family"] == "SD1"
    models = run["root"] / "a" / "models"
    assert sha256(models / DEFAULT_STARTER.filename) == sha256(
        starter_repo / DEFAULT_STARTER.filename
    )
    sidecar = DEFAULT_STARTER.filename.replace(".safetensors", ".yaml")
    assert fresh["folder"] == sorted([DEFAULT_STARTER.filename, sidecar])  # nothing left over
    gets = [r for r in run["requests"]["fresh"] if r.startswith("GET")]
    assert f"GET /cdn/{DEFAULT[0]}/{DEFAULT[1]}" in gets
    assert not any("v1-5-pruned.safetensors" in r for r in run["requests"]["fresh"])


def test_no_contact_once_a_checkpoint_exists_or_with_the_flag(run: dict[str, Any]) -> None:
    assert run["requests"]["exists"] == []
    assert run["exists"]["reason"] is None and run["exists"]["checkpoint"] is None
    assert run["requests"]["flag"] == []
    assert "--no-download-sd-model" in run["flag"]["reason"]
    assert run["flag"]["listed"] == [] and run["flag"]["folder"] == []


def test_a_corrupt_download_is_refused_and_not_kept(run: dict[str, Any]) -> None:
    corrupt = run["corrupt"]
    assert corrupt["checkpoint"] is None and corrupt["listed"] == []
    assert f"{DEFAULT_STARTER.filename}: sha256 is " in corrupt["reason"]
    assert "the file was not kept" in corrupt["reason"]
    assert corrupt["folder"] == []  # no partial folder: a bad file must not resume


def test_an_interrupted_download_resumes_on_the_next_start(
    run: dict[str, Any], hub: FakeHub
) -> None:
    interrupted = run["interrupted"]
    assert interrupted["checkpoint"] is None and interrupted["listed"] == []
    assert "500" in interrupted["reason"] and "the next start resumes" in interrupted["reason"]
    assert interrupted["folder"] == [f".{DEFAULT_STARTER.filename}.partial"]
    resumed = run["resumed"]
    assert resumed["checkpoint"] == DEFAULT_STARTER.filename and resumed["family"] == "SD1"
    # The second start asked only for the bytes the first one had written (whole chunks).
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    assert run["size"] > chunk, "the tiny checkpoint must exceed one download chunk"
    assert hub.ranges == [(DEFAULT_STARTER.filename, (run["size"] - 1) // chunk * chunk)]


def test_an_unreachable_hub_falls_back_to_the_demo_fast(run: dict[str, Any]) -> None:
    unreachable = run["unreachable"]
    assert unreachable["checkpoint"] is None and unreachable["folder"] == []
    assert "the default checkpoint could not be downloaded" in unreachable["reason"]
    assert "ConnectError" in unreachable["reason"]
    assert unreachable["seconds"] < 4  # one attempt with the 3 s time-out, no retries


def test_a_preloaded_checkpoint_is_found_in_the_hub_cache(run: dict[str, Any]) -> None:
    space = run["space"]
    assert run["requests"]["space"] == []
    assert space["checkpoint"] == DEFAULT_STARTER.filename and space["family"] == "SD1"
    link = run["root"] / "s" / "models" / DEFAULT_STARTER.filename
    assert link.is_symlink() and (run["root"] / "hf-home") in link.resolve().parents


def test_the_page_shows_a_starters_size_and_licence_and_downloads_it(
    run: dict[str, Any], starter_repo: Path
) -> None:
    page = run["page"]
    sdxl = STARTERS[1]
    size = (starter_repo / sdxl.filename).stat().st_size
    assert page["info"] == f"**{sdxl.label}**: {size / 10**9:.2f} GB, licence openrail++"
    assert page["status"].startswith(f"Downloaded {sdxl.filename}")
    assert page["folder"] == [sdxl.filename] and page["rescans"] == 1
    fractions = page["fractions"]
    assert fractions and fractions == sorted(fractions) and fractions[-1] == 1.0


def test_the_page_download_is_an_admin_action(tmp_path: Path) -> None:
    from frontends.page.starters_panel import download_choice

    refused = download_choice(
        None,  # type: ignore[arg-type] - never reached
        tmp_path,
        str(DEFAULT_STARTER),
        refusal="wrong admin user or password",
    )
    assert refused == (
        "Not downloaded: downloading a checkpoint is an admin action; wrong admin user or password"
    )
    assert download_choice(None, tmp_path, "org/unknown/x.safetensors").startswith(  # type: ignore[arg-type]
        "Not downloaded: unknown starter 'org/unknown/x.safetensors'"
    )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- in process


def test_offline_mode_runs_the_demo_and_says_why(tmp_path: Path) -> None:
    """HF_HUB_OFFLINE is set here (conftest): no contact is tried at all."""
    settings = Settings(data_dir=tmp_path)
    folders = ModelFolders({"checkpoint": [tmp_path / "models"]}, HashCache(None))
    folders.scan()
    outcome = first_run(settings, folders, cache_dir=tmp_path / "empty-cache")
    assert outcome.checkpoint is None and "HF_HUB_OFFLINE" in outcome.reason
    assert download_refusal(settings, {"HF_HUB_OFFLINE": "0"}) is None
    assert "HF_HUB_OFFLINE" in download_refusal(settings, {"HF_HUB_OFFLINE": "true"})


def test_any_checkpoint_means_no_first_run(models_dir: Path, tmp_path: Path) -> None:
    folders = ModelFolders({"checkpoint": [models_dir]}, HashCache(None))
    folders.scan()
    outcome = first_run(Settings(data_dir=tmp_path), folders, env={"HF_HUB_OFFLINE": "0"})
    assert outcome.checkpoint is None and outcome.reason is None  # this process is offline


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path: Path, tiny_sd1: LoadedModel) -> None:
    """Right size and sha256, wrong content (a LoRA under the pinned name)."""
    lora = tmp_path / DEFAULT_STARTER.filename
    write(lora, make_kohya(tiny_sd1.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=1))
    info = StarterInfo(DEFAULT_STARTER, COMMIT, lora.stat().st_size, sha256(lora), None, ())
    problem = _check_download(lora, info)
    assert problem is not None and "looks like a LoRA" in problem
    short = StarterInfo(DEFAULT_STARTER, COMMIT, lora.stat().st_size + 1, None, None, ())
    assert "bytes arrived" in (_check_download(lora, short) or "")


def test_starters_are_pinned_single_files() -> None:
    names = [(s.repo_id, s.filename) for s in STARTERS]
    assert names[:2] == [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "v1-5-pruned-emaonly.safetensors"),
        ("stabilityai/stable-diffusion-xl-base-1.0", "sd_xl_base_1.0.safetensors"),
    ]
    assert all(f.endswith(".safetensors") and "/" not in f for _, f in names)


def test_a_repo_preloaded_in_the_hub_cache_is_not_downloaded_again(
    models_dir: Path, tmp_path: Path
) -> None:
    """`--ckpt org/repo` listed in `preload_from_hub`: the cached snapshot is linked as
    `org--repo`, which `--ckpt` then finds (this process is offline: a download would fail)."""
    cache, models = tmp_path / "hub-cache", tmp_path / "models"
    for repo, files in {
        "org/tiny": [models_dir / "tiny-sd1-diffusers"],
        "org/single": [models_dir / "tiny-sd1.safetensors", models_dir / "tiny-sd1.yaml"],
    }.items():
        root = cache / f"models--{repo.replace('/', '--')}"
        (root / "refs").mkdir(parents=True)
        (root / "refs" / "main").write_text(COMMIT)
        snapshot = root / "snapshots" / COMMIT
        snapshot.mkdir(parents=True)
        for path in files:
            if path.is_dir():
                shutil.copytree(path, snapshot, dirs_exist_ok=True)
            else:
                os.link(path, snapshot / path.name)
    folders = ModelFolders({"checkpoint": [models]}, HashCache(None))
    assert link_cached_repo("org/tiny", models, cache) == models / "org--tiny"
    assert link_cached_repo("org/single", models, cache) == models / "org--single"
    assert link_cached_repo("org/missing", models, cache) is None
    assert link_cached_repo("org/tiny", models, cache) is None  # already linked: left alone
    assert sorted(p.name for p in (models / "org--single").iterdir()) == [
        "tiny-sd1.safetensors",
        "tiny-sd1.yaml",
    ]
    folders.scan()
    assert resolve_startup_checkpoint("org/tiny", folders, models) == "org--tiny"
    single = resolve_startup_checkpoint("org/single", folders, models)
    assert single == "org--single/tiny-sd1.safetensors"
    assert sorted(p.name for p in models.iterdir()) == ["org--single", "org--tiny"]
