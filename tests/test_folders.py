"""The model-folders registry: one scan-and-hash coordinator for every kind, facts that
survive rescans, A1111's folder layout, and lookups that always find an exact title."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest

from deployments.hub import resolve_startup_checkpoint
from pipelines.errors import UnusableFileError
from pipelines.folders.hashing import HashCache, sha256_of_file
from pipelines.folders.registry import ModelFolders, default_roots
from tests.test_lora_registry import lora_state, save


@pytest.fixture()
def tiny_file(models_dir: Path) -> Path:
    return models_dir / "tiny-sd1.safetensors"


def test_operator_path_outside_the_folders_survives_rescans(
    tmp_path: Path, tiny_file: Path
) -> None:
    """`--ckpt /outside/file` (defect: it vanished at the watcher's next rescan)."""
    outside = tmp_path / "elsewhere" / "mine.safetensors"
    outside.parent.mkdir()
    shutil.copy(tiny_file, outside)
    models = tmp_path / "models"
    models.mkdir()
    folders = ModelFolders(default_roots([models], [tmp_path / "loras"]), HashCache(None))
    folders.scan()
    key = resolve_startup_checkpoint(str(outside), folders, models)
    assert key == outside.resolve().as_posix()
    for _ in range(3):
        folders.scan()
        assert folders.resolve("checkpoint", key).path == outside.resolve()
    folders.hash_missing()
    assert folders.resolve("checkpoint", key).sha256 == sha256_of_file(outside)


def test_a_load_failure_is_remembered_until_the_file_changes(
    tmp_path: Path, tiny_file: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_file, models / "a.safetensors")
    folders = ModelFolders({"checkpoint": [models]}, HashCache(None))
    folders.scan()
    entry = folders.resolve("checkpoint", "a")
    folders.learn("checkpoint", entry, error="weights do not fit")
    folders.scan()
    assert folders.resolve("checkpoint", "a").error == "weights do not fit"
    time.sleep(0.01)
    shutil.copy(tiny_file, models / "a.safetensors")  # replaced: new mtime
    (models / "a.safetensors").touch()
    folders.scan()
    assert folders.resolve("checkpoint", "a").error is None


def test_a1111_models_folder_works_as_it_is(tmp_path: Path, tiny_file: Path) -> None:
    """`models/Stable-diffusion/x` is listed as `x` (A1111's title); `models/Lora/y` is a
    LoRA, never a checkpoint."""
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    shutil.copy(tiny_file, models / "Stable-diffusion" / "x.safetensors")
    save(models / "Lora" / "y.safetensors", lora_state(0))
    save(models / "VAE" / "z.safetensors", lora_state(1))
    folders = ModelFolders(default_roots([models], [tmp_path / "loras"]), HashCache(None))
    folders.scan()
    assert [e.relpath for e in folders.entries("checkpoint")] == ["x.safetensors"]
    assert [e.name for e in folders.entries("lora")] == ["y"]


def test_an_exact_title_always_resolves(tmp_path: Path, tiny_file: Path, models_dir: Path) -> None:
    """A diffusers folder `sd1/` beside a file `sd1.safetensors`: each listed title
    resolves to its own entry; the bare shared name stays an ambiguity error."""
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_file, models / "sd1.safetensors")
    shutil.copytree(models_dir / "tiny-sd1-diffusers", models / "sd1")
    folders = ModelFolders({"checkpoint": [models]}, HashCache(None))
    folders.scan()
    folders.hash_missing()
    for entry in folders.entries("checkpoint"):
        assert folders.resolve("checkpoint", entry.title) == entry
    assert folders.resolve("checkpoint", "sd1").kind == "diffusers"  # its exact title
    assert folders.resolve("checkpoint", "sd1.safetensors").kind == "single"


def test_one_file_is_hashed_once_however_many_ask(tmp_path: Path, tiny_file: Path) -> None:
    calls: list[Path] = []
    gate = threading.Event()

    def slow(path: Path) -> str:
        calls.append(path)
        gate.wait(10)
        return sha256_of_file(path)

    hashes = HashCache(None, {"sha256": slow})
    answers: list[str] = []
    threads = [
        threading.Thread(target=lambda: answers.append(hashes.compute(tiny_file))) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert len(calls) == 1 and len(set(answers)) == 1 and len(answers) == 4


def test_a_rescan_during_a_hashing_pass_gets_its_files_hashed(
    tmp_path: Path, tiny_file: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(tiny_file, models / "first.safetensors")
    gate = threading.Event()

    def gated(path: Path) -> str:
        gate.wait(10)
        return sha256_of_file(path)

    folders = ModelFolders({"checkpoint": [models]}, HashCache(None, {"sha256": gated}))
    folders.scan()
    folders.start_hashing()  # the first pass blocks on the gate
    shutil.copy(tiny_file, models / "second.safetensors")
    folders.scan()
    folders.start_hashing()  # asked while the first pass runs: runs once more after it
    gate.set()
    deadline = time.monotonic() + 10
    while any(e.sha256 is None for e in folders.entries("checkpoint")):
        assert time.monotonic() < deadline, "the second file was never hashed"
        time.sleep(0.05)


def test_unknown_kind_names_and_ambiguity_name_the_field(tmp_path: Path) -> None:
    save(tmp_path / "loras" / "a" / "dup.safetensors", lora_state(0))
    save(tmp_path / "loras" / "b" / "dup.safetensors", lora_state(1))
    folders = ModelFolders({"lora": [tmp_path / "loras"]}, HashCache(None))
    folders.scan()
    with pytest.raises(UnusableFileError, match="a/dup, b/dup") as caught:
        folders.resolve("lora", "dup")
    assert caught.value.field == "loras"
