"""`--ckpt org/repo`: downloads from a local fake Hub, in fresh processes that run app.main's
start-up path (settings -> build_engine -> resolve_startup_checkpoint -> load_checkpoint).

huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import, and this test process
runs offline (conftest), so every download happens in a subprocess with its own environment.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deployments.hub import _wanted_files, resolve_startup_checkpoint
from pipelines.errors import NotFoundError
from pipelines.folders.hashing import HashCache
from pipelines.folders.registry import ModelFolders
from pipelines.loading import CONFIGS_DIR, LoadedModel
from tests.conftest import DEMO_YAML
from tests.fake_hub import FakeHub
from tests.ldm_export import save_single_file

PROJECT = Path(__file__).resolve().parent.parent
UNET = "unet/diffusion_pytorch_model.safetensors"

# app.main up to the loaded model, once per `--ckpt` value, then one tiny generation.
CLIENT = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from deployments.hub import resolve_startup_checkpoint
    from pipelines.errors import LorastackError
    from pipelines.schema import GenerationRequest
    from pipelines.service import build_folders, build_service
    from pipelines.settings import parse_settings

    data = Path(sys.argv[1])
    for wanted in json.loads(sys.argv[2]):
        flags = ["--data-dir", str(data), "--ckpt", wanted, "--device", "cpu", "--threads", "2"]
        settings = parse_settings(flags, env={})
        settings.models_dirs[0].mkdir(parents=True, exist_ok=True)
        folders = build_folders(settings)
        engine = build_service(settings, folders=folders)
        result = {"wanted": wanted}
        started = time.monotonic()
        try:
            relpath = resolve_startup_checkpoint(settings.ckpt, folders, settings.models_dirs[0])
            result.update(seconds=time.monotonic() - started, relpath=relpath)
            model = engine.select_checkpoint(relpath)
            result.update(title=model.title, architecture=model.family)
            request = GenerationRequest(
                prompt="a cat", steps=2, width=64, height=64, seed=1, sampler_name="Euler"
            )
            result["image"] = list(engine.generate(request).images[0].size)
        except LorastackError as error:
            result.setdefault("seconds", time.monotonic() - started)
            result["error"] = f"{type(error).__name__}: {error.message}"
        folders.scan()
        result["listed"] = [entry.relpath for entry in engine.checkpoints()]
        result["folder"] = sorted(os.listdir(settings.models_dirs[0]))
        print("RESULT " + json.dumps(result), flush=True)
""")


def run_client(data_dir: Path, wanted: list[str], **env: str) -> list[dict[str, Any]]:
    """Run CLIENT in a fresh process whose only environment is `env` plus the basics."""
    environment = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(PROJECT),
        "HOME": str(data_dir),
        "HF_HOME": str(data_dir / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_ETAG_TIMEOUT": "3",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
        "NO_PROXY": "127.0.0.1,localhost",
        **env,
    }
    done = subprocess.run(
        [sys.executable, "-c", CLIENT, str(data_dir), json.dumps(wanted)],
        env=environment,
        cwd=PROJECT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == len(wanted), done.stdout + done.stderr[-4000:]
    return [json.loads(line) for line in lines]


def tree(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every non-hidden file under `folder`."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts)
    }


def closed_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def repos(tmp_path_factory: pytest.TempPathFactory, tiny_sd1: LoadedModel) -> dict[str, Path]:
    """Repo folders: a diffusers model (plus files it must not fetch), a single-file
    checkpoint with its sidecar yaml, and a repo with nothing usable."""
    root = tmp_path_factory.mktemp("hub-repos")
    tiny = root / "tiny"
    tiny_sd1.pipe.save_pretrained(tiny)
    (tiny / "README.md").write_text("# tiny\n")
    (tiny / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"variant")
    (tiny / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    (tiny / "safety_checker").mkdir()
    (tiny / "safety_checker" / "config.json").write_text("{}")

    single = root / "single"
    single.mkdir()
    save_single_file(tiny_sd1.pipe, single / "tiny.safetensors", text_encoder_layout="hf")
    clip = CONFIGS_DIR / "demo-tiny-clip"
    sidecar = DEMO_YAML.read_text().replace("version: demo-tiny-clip", f"version: {clip}")
    (single / "tiny.yaml").write_text(sidecar)
    (single / "README.md").write_text("# single\n")
    (single / "extra").mkdir()
    (single / "extra" / "nested.safetensors").write_bytes(b"not top-level")

    empty = root / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "README.md").write_text("# nothing here\n")
    (empty / "model.bin").write_bytes(b"pickle")
    (empty / "sub" / "model.safetensors").write_bytes(b"not top-level")
    return {"tiny": tiny, "single": single, "empty": empty}


@pytest.fixture(scope="module")
def hub(repos: dict[str, Path]) -> Iterator[FakeHub]:
    with FakeHub() as fake:
        fake.add_repo("org/tiny", repos["tiny"])
        fake.add_repo("org/partial", repos["tiny"])
        fake.add_repo("org/single", repos["single"])
        fake.add_repo("org/empty", repos["empty"])
        yield fake


# (--ckpt value, key of its result)
ONLINE_STEPS = [
    ("org/tiny", "tiny"),
    ("org/single", "single"),
    ("org/empty", "empty"),
    ("org/nope", "nope"),
    ("org/partial", "interrupted"),
    ("org/partial", "resumed"),
]


@pytest.fixture(scope="module")
def online(tmp_path_factory: pytest.TempPathFactory, hub: FakeHub) -> dict[str, Any]:
    """One process starting the app once per ONLINE_STEPS value against the fake Hub; the
    first GET of org/partial's UNet weights fails, interrupting that download once."""
    data = tmp_path_factory.mktemp("online")
    hub.fail[("org/partial", UNET)] = 1
    wanted = [value for value, _ in ONLINE_STEPS]
    results = run_client(data, wanted, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0")
    keyed = {key: result for (_, key), result in zip(ONLINE_STEPS, results, strict=True)}
    return {"data": data, "models": data / "models", **keyed}


# ---------------------------------------------------------------------------- downloads


def test_diffusers_repo_downloads_lists_and_loads(
    online: dict[str, Any], repos: dict[str, Path], hub: FakeHub
) -> None:
    result = online["tiny"]
    assert "error" not in result, result
    assert result["relpath"] == result["title"] == "org--tiny"
    assert result["architecture"] == "SD1"
    assert result["image"] == [64, 64]
    assert "org--tiny" in result["listed"]
    # Exactly what save_pretrained wrote, byte for byte: no README, variant, pickle or
    # safety checker, and no download bookkeeping left in the model folder.
    wanted = tree(repos["tiny"])
    for extra in ("README.md", "unet/diffusion_pytorch_model.fp16.safetensors",
                  "unet/diffusion_pytorch_model.bin", "safety_checker/config.json"):  # fmt: skip
        del wanted[extra]
    folder = online["models"] / "org--tiny"
    assert tree(folder) == wanted
    assert not (folder / ".cache").exists()
    # local_dir downloads leave no second copy in the HF cache.
    assert not list((online["data"] / "hf-home").rglob("*.safetensors"))
    # The weights came through the fake CDN (the Hub's LFS redirect).
    assert f"GET /cdn/org/tiny/{UNET}" in hub.requests


def test_single_file_repo_downloads_with_its_sidecar(online: dict[str, Any]) -> None:
    result = online["single"]
    assert "error" not in result, result
    assert result["relpath"] == "org--single/tiny.safetensors"
    assert result["architecture"] == "SD1"
    assert "org--single/tiny.safetensors" in result["listed"]
    assert sorted(tree(online["models"] / "org--single")) == ["tiny.safetensors", "tiny.yaml"]


def test_repo_without_a_checkpoint_is_refused(online: dict[str, Any]) -> None:
    error = online["empty"]["error"]
    assert error.startswith("NotFoundError")
    assert "org/empty" in error and "neither a diffusers model" in error
    assert not (online["models"] / "org--empty").exists()


def test_unknown_repo_names_the_repo(online: dict[str, Any]) -> None:
    error = online["nope"]["error"]
    assert "--ckpt org/nope: not found locally, and the Hub at http://127.0.0.1:" in error
    assert "RepositoryNotFoundError" in error


def test_interrupted_download_is_not_listed_and_resumes(
    online: dict[str, Any], hub: FakeHub
) -> None:
    failed = online["interrupted"]
    assert "org/partial" in failed["error"] and "500" in failed["error"]
    assert not any(name.startswith("org--partial") for name in failed["listed"])
    assert ".org--partial.partial" in failed["folder"]
    assert "org--partial" not in failed["folder"]
    # The next start finished it; only the failed file was fetched again.
    resumed = online["resumed"]
    assert resumed["relpath"] == "org--partial" and resumed["image"] == [64, 64]
    assert (online["models"] / "org--partial" / UNET).is_file()
    assert not (online["models"] / ".org--partial.partial").exists()
    gets = Counter(r for r in hub.requests if r.startswith("GET /cdn/org/partial/"))
    assert gets[f"GET /cdn/org/partial/{UNET}"] == 2
    assert set(gets.values()) == {1, 2}


def test_restart_without_the_hub_reuses_the_download_and_fails_fast_otherwise(
    online: dict[str, Any],
) -> None:
    """Hub unreachable: an earlier download is found again; anything else fails at once."""
    down = {"HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}", "HF_HUB_OFFLINE": "0"}
    reused, missing = run_client(online["data"], ["org/tiny", "org/other"], **down)
    assert reused["relpath"] == "org--tiny" and reused["image"] == [64, 64]
    error = missing["error"]
    assert "--ckpt org/other: not found locally, and the Hub at http://127.0.0.1:" in error
    assert "ConnectError" in error
    assert missing["seconds"] < 5  # one attempt, not huggingface_hub's 5 backed-off retries
    assert "org--other" not in missing["folder"] and ".org--other.partial" not in missing["folder"]


def test_offline_mode_fails_fast_naming_the_repo(tmp_path: Path) -> None:
    """This process runs with HF_HUB_OFFLINE=1 (conftest)."""
    from huggingface_hub import constants

    registry = ModelFolders({"checkpoint": [tmp_path]}, HashCache(None))
    with pytest.raises(NotFoundError, match="--ckpt org/tiny: not found locally") as caught:
        resolve_startup_checkpoint("org/tiny", registry, tmp_path)
    if constants.HF_HUB_OFFLINE:
        assert "OfflineModeIsEnabled" in caught.value.message
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- no download


def test_listed_names_and_paths_never_download(models_dir: Path, tmp_path: Path) -> None:
    """This process is offline (conftest), so any download attempt would raise."""
    registry = ModelFolders({"checkpoint": [models_dir]}, HashCache(None))
    registry.scan()
    resolve = resolve_startup_checkpoint
    assert resolve(None, registry, models_dir) is None
    assert resolve("tiny-sd1", registry, models_dir) == "tiny-sd1.safetensors"
    assert resolve("xl/tiny-sdxl", registry, models_dir) == "xl/tiny-sdxl.safetensors"
    folder = models_dir / "tiny-sd1-diffusers"
    assert resolve(str(folder), registry, models_dir) == folder.resolve().as_posix()
    with pytest.raises(NotFoundError, match="no listed checkpoint, file or Hub repo id"):
        resolve("not a repo id", registry, models_dir)


def test_unlisted_folder_in_the_way_is_reported(tmp_path: Path) -> None:
    (tmp_path / "org--junk").mkdir()
    (tmp_path / "org--junk" / "notes.txt").write_text("mine")
    registry = ModelFolders({"checkpoint": [tmp_path]}, HashCache(None))
    registry.scan()
    with pytest.raises(NotFoundError, match="org--junk exists but holds no listed checkpoint"):
        resolve_startup_checkpoint("org/junk", registry, tmp_path)


# ---------------------------------------------------------------------------- file choice

DIFFUSERS_REPO = [
    "model_index.json",
    "README.md",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer.json",
    "tokenizer_2/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors.index.json",
    "unet/diffusion_pytorch_model-00001-of-00002.safetensors",
    "unet/diffusion_pytorch_model-00002-of-00002.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors.index.json",
    "text_encoder_2/model-00001-of-00002.safetensors",
    "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.fp16.safetensors",
    "safety_checker/model.safetensors",
    "sd_xl_base_1.0.safetensors",
]


def test_diffusers_file_choice() -> None:
    chosen = _wanted_files("org/xl", DIFFUSERS_REPO)
    left_out = {
        "README.md",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "text_encoder_2/model.fp16.safetensors",
        "safety_checker/model.safetensors",
        "sd_xl_base_1.0.safetensors",
    }
    assert set(chosen) == set(DIFFUSERS_REPO) - left_out


@pytest.mark.parametrize(
    ("files", "chosen"),
    [
        (["README.md", "b.safetensors", "a.safetensors", "a.yaml"], ["a.safetensors", "a.yaml"]),
        (["model.safetensors", "sub/x.safetensors", "b.yaml"], ["model.safetensors"]),
    ],
)
def test_single_file_choice(files: list[str], chosen: list[str]) -> None:
    assert _wanted_files("org/one", files) == chosen


@pytest.mark.parametrize(
    ("files", "message"),
    [
        (["README.md", "model.ckpt", "sub/model.safetensors"], "neither a diffusers model"),
        (["model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.bin"], "unet"),
        (
            [
                "model_index.json",
                "unet/diffusion_pytorch_model.safetensors",
                "text_encoder/config.json",
                "text_encoder/model.fp16.safetensors",
            ],
            "for text_encoder",
        ),  # fmt: skip
    ],
)
def test_unusable_repos_are_refused(files: list[str], message: str) -> None:
    with pytest.raises(NotFoundError, match=message) as caught:
        _wanted_files("org/bad", files)
    assert "org/bad" in caught.value.message
