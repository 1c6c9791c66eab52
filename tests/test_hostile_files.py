"""Hostile file names and folders: non-UTF-8 and 255-byte names, symlink loops in loras/,
files removed or replaced while a scan runs. Each bad file is listed as unusable with a
precise reason (or skipped), and no listing (scanner, hash cache, API, UI card, CLI) crashes.

Zero-byte, truncated, header-bomb, not-a-LoRA, NaN and pickle files are covered in
test_safeload.py, test_lora_registry.py and test_engine.py.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from frontends.api import a1111
from frontends.api.routes import build_api
from frontends.page.stack import card_html
from pipelines.errors import NotFoundError
from pipelines.folders.hashing import HashCache
from pipelines.loading import spec_for_checkpoint
from pipelines.safeload import printable_name, read_safetensors_header
from pipelines.service import build_service
from pipelines.settings import Settings
from tests.test_app_http import PROJECT
from tests.test_lora_registry import LoraLibrary, lora_state, save
from tests.test_registry import Checkpoints

BAD_STEM = b"caf\xe9-\xff"  # Latin-1 bytes: not valid UTF-8
SHOWN_STEM = "caf\\xe9-\\xff"


def bytes_path(folder: Path, name: bytes) -> Path:
    """A Path for a file name given as raw bytes (surrogate-escaped, as os.scandir gives)."""
    return Path(os.fsdecode(os.fsencode(folder) + b"/" + name))


def long_name(extension: str) -> str:
    """A file name of exactly 255 bytes (the usual file-system limit)."""
    return "n" * (255 - len(extension)) + extension


def strict_json(value: object) -> bytes:
    """What an HTTP JSON response does: UTF-8 without escapes (fails on lone surrogates)."""
    return json.dumps(value, ensure_ascii=False).encode("utf-8")


@pytest.fixture()
def folders(tmp_path: Path, models_dir: Path) -> tuple[Path, Path]:
    """models/ and loras/ holding one good file and one non-UTF-8-named copy of each."""
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    shutil.copy(models_dir / "tiny-sd1.safetensors", models / "good.safetensors")
    shutil.copy(models_dir / "tiny-sd1.yaml", models / "good.yaml")
    shutil.copytree(models_dir / "demo-tiny-clip", models / "demo-tiny-clip")
    shutil.copy(models_dir / "tiny-sd1.safetensors", bytes_path(models, BAD_STEM + b".safetensors"))
    save(loras / "ink.safetensors", lora_state(0, 768))
    shutil.copy(loras / "ink.safetensors", bytes_path(loras, BAD_STEM + b".safetensors"))
    return models, loras


def test_non_utf8_names_are_listed_unusable_with_the_reason(folders: tuple[Path, Path]) -> None:
    models, loras = folders
    checkpoints = Checkpoints((models,))
    by_path = {e.relpath: e for e in checkpoints.scan()}
    bad = by_path[f"{SHOWN_STEM}.safetensors"]
    assert bad.error and "not valid UTF-8" in bad.error and SHOWN_STEM in bad.error
    assert by_path["good.safetensors"].error is None
    library = LoraLibrary([loras])
    entries = {e.name: e for e in library.scan()}
    assert set(entries) == {"ink", SHOWN_STEM}
    assert entries[SHOWN_STEM].error and "not valid UTF-8" in entries[SHOWN_STEM].error
    with pytest.raises(NotFoundError):
        library.resolve("caf\udce9-\udcff")  # the raw name is not a name either
    for entry in library.entries():  # every listing encodes: API items, UI cards
        strict_json(a1111.lora_item(entry, hide_paths=False))
        card_html(entry, entry.error).encode("utf-8")
    for entry in checkpoints.entries():
        strict_json(a1111.sd_model_item(entry, hide_paths=False))


def test_hash_cache_persists_non_utf8_paths(tmp_path: Path) -> None:
    target = bytes_path(tmp_path, BAD_STEM + b".bin")
    target.write_bytes(b"weights")
    cache_file = tmp_path / "cache" / "hashes.json"
    fixed = HashCache(cache_file, {"sha256": lambda _: "ab" * 32})
    assert fixed.compute(target, "sha256") == "ab" * 32
    json.loads(cache_file.read_text(encoding="utf-8"))  # valid JSON on disk
    assert HashCache(cache_file).get(target) == "ab" * 32  # and read back after a restart


def test_api_listings_with_non_utf8_names(folders: tuple[Path, Path], tmp_path: Path) -> None:
    models, loras = folders
    settings = Settings(data_dir=tmp_path / "data", ckpt_dirs=(models,), lora_dirs=(loras,))
    with TestClient(build_api(build_service(settings), settings)) as client:
        listed = client.get("/loras")
        assert listed.status_code == 200
        assert SHOWN_STEM in {item["name"] for item in listed.json()}
        models_listed = client.get("/sd-models")
        assert models_listed.status_code == 200
        assert [m["model_name"] for m in models_listed.json()] == ["good"]  # unusable hidden
        body = {"prompt": "<lora:caf\udce9-\udcff>", "steps": 1, "width": 64, "height": 64}
        raw = json.dumps(body).encode()  # "\udce9" escapes: JSON a client could send
        refused = client.post("/txt2img", content=raw)
        assert refused.status_code == 422, refused.json()
        assert "surrogates" in refused.json()["detail"]


def test_cli_lists_non_utf8_names(folders: tuple[Path, Path], tmp_path: Path) -> None:
    models, loras = folders
    env = dict(os.environ, PYTHONIOENCODING="utf-8")  # strict: a surrogate would crash print
    for command, folder in (("list-models", "--ckpt-dir"), ("list-loras", "--lora-dir")):
        completed = subprocess.run(
            [
                sys.executable,
                "-m",
                "frontends.cli",
                command,
                folder,
                str(models if "models" in command else loras),
                "--data-dir",
                str(tmp_path / "data"),
            ],
            cwd=PROJECT,
            env=env,
            capture_output=True,
            timeout=120,
        )
        assert completed.returncode == 0, completed.stderr.decode(errors="replace")
        out = completed.stdout.decode("utf-8")
        assert SHOWN_STEM in out and "not valid UTF-8" in out, out


def test_255_byte_names(tmp_path: Path, models_dir: Path) -> None:
    """Sidecar and preview look-ups derive longer names from a 255-byte one; the file
    system refuses those, which must read as 'no sidecar', not crash the scan."""
    loras, models = tmp_path / "loras", tmp_path / "models"
    save(loras / long_name(".safetensors"), lora_state(0, 768))
    torch.save(lora_state(1, 768), loras / long_name(".pt"))
    models.mkdir()
    shutil.copy(models_dir / "tiny-sd1.safetensors", models / long_name(".safetensors"))
    (models / long_name(".pth")).write_bytes(b"\x80\x02}q\x00.")  # tiny pickle, not a model
    entries = LoraLibrary([loras]).scan()
    assert len(entries) == 2 and all(e.error is None for e in entries), entries
    assert all(e.preview is None and e.sidecar == {} for e in entries)
    checkpoints = Checkpoints((models,)).scan()
    assert len(checkpoints) == 2
    for entry in checkpoints:
        assert a1111.sd_model_item(entry, hide_paths=False)["config"] is None
    header = read_safetensors_header(models / long_name(".safetensors"))
    shapes = {name: info.shape for name, info in header.tensors.items()}
    spec, _, chosen = spec_for_checkpoint(models / long_name(".pth"), shapes)
    assert chosen.startswith("stock")


def test_symlink_loops_in_loras(tmp_path: Path) -> None:
    loras = tmp_path / "loras"
    save(loras / "sub" / "ink.safetensors", lora_state(0, 768))
    os.symlink(loras, loras / "sub" / "back-to-root")  # directory loop
    os.symlink(loras / "self.safetensors", loras / "self.safetensors")  # ELOOP link
    os.symlink(tmp_path / "gone.safetensors", loras / "dangling.safetensors")
    entries = LoraLibrary([loras]).scan()
    assert [e.relpath for e in entries] == ["sub/ink.safetensors"]


def _remove_then_read(path_to_remove: Path, replacement: bytes | None):
    """A stand-in for read_safetensors_header that changes the file just before reading."""

    def read(path: Path):
        if path == path_to_remove and path.exists():
            path.unlink()
            if replacement is not None:
                path.write_bytes(replacement)
        return read_safetensors_header(path)

    return read


@pytest.mark.parametrize(
    ("replacement", "reason"),
    [(None, "cannot be read"), (struct.pack("<Q", 1 << 60) + b"{}", "header")],
    ids=["removed", "replaced-by-garbage"],
)
def test_file_changed_mid_scan(
    tmp_path: Path,
    models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    replacement: bytes | None,
    reason: str,
) -> None:
    models, loras = tmp_path / "models", tmp_path / "loras"
    models.mkdir()
    model = models / "vanishing.safetensors"
    shutil.copy(models_dir / "tiny-sd1.safetensors", model)
    shutil.copy(models_dir / "tiny-sd1.safetensors", models / "stays.safetensors")
    lora = save(loras / "vanishing.safetensors", lora_state(0, 768))
    save(loras / "stays.safetensors", lora_state(1, 768))
    monkeypatch.setattr(
        "pipelines.folders.checkpoints.read_safetensors_header",
        _remove_then_read(model, replacement),
    )
    monkeypatch.setattr(
        "pipelines.folders.loras.read_safetensors_header", _remove_then_read(lora, replacement)
    )
    checkpoints = {e.relpath: e for e in Checkpoints((models,)).scan()}
    assert checkpoints["stays.safetensors"].error is None
    assert reason in (checkpoints["vanishing.safetensors"].error or ""), checkpoints
    library = LoraLibrary([loras])
    entries = {e.name: e for e in library.scan()}
    assert entries["stays"].error is None
    assert reason in (entries["vanishing"].error or ""), entries
    library.hash_all()  # hashing skips the unusable file and does not crash
    assert printable_name(entries["vanishing"].error or "") == entries["vanishing"].error
