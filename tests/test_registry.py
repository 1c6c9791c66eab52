"""The checkpoint listing: formats, symlinks, loops, clashes, hashing, safe resolution."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest

from pipelines.errors import NotFoundError
from pipelines.folders.hashing import HashCache
from pipelines.folders.registry import ModelFolders


@pytest.fixture()
def folder(tmp_path: Path, models_dir: Path) -> Path:
    root = tmp_path / "models"
    (root / "sub").mkdir(parents=True)
    shutil.copy(models_dir / "tiny-sd1.safetensors", root / "sub" / "a.safetensors")
    return root


class Checkpoints:
    """The checkpoint kind of a ModelFolders, spelled as these tests use it."""

    def __init__(self, roots: tuple[Path, ...], hashes: HashCache | None = None) -> None:
        self.folders = ModelFolders({"checkpoint": roots}, hashes or HashCache(None))

    def scan(self) -> list:
        self.folders.scan()
        return self.entries()

    def hash_all(self) -> None:
        self.folders.hash_missing()

    def entries(self) -> list:
        return self.folders.entries("checkpoint")

    def resolve(self, name: str):
        return self.folders.resolve("checkpoint", name)


def _registry(*roots: Path, cache: Path | None = None, hashes: HashCache | None = None):
    registry = Checkpoints(roots, hashes or HashCache(cache))
    registry.scan()
    return registry


def test_relative_names_and_hash(folder: Path) -> None:
    registry = _registry(folder)
    entry = registry.resolve("sub/a")
    assert entry.relpath == "sub/a.safetensors" and entry.model_name == "sub/a"
    assert entry.title == "sub/a.safetensors"  # no hash yet
    registry.hash_all()
    entry = registry.resolve("sub/a")
    expected = hashlib.sha256((folder / "sub" / "a.safetensors").read_bytes()).hexdigest()
    assert entry.sha256 == expected and entry.title == f"sub/a.safetensors [{expected[:10]}]"
    assert entry.infotext_name == "a"


def test_hash_cache_survives_rescan_and_restart(folder: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hashes.json"
    _registry(folder, cache=cache).hash_all()
    calls: list[Path] = []

    def counting(path: Path) -> str:
        calls.append(path)
        return "0" * 64

    # a "restart": new registry, same cache file
    again = _registry(folder, hashes=HashCache(cache, {"sha256": counting}))
    again.hash_all()
    assert calls == [] and again.resolve("sub/a").sha256 != "0" * 64
    (folder / "sub" / "a.safetensors").write_bytes(b"changed")  # new size and mtime
    again.scan()
    again.hash_all()
    assert len(calls) == 0  # unusable now (not a checkpoint): never hashed
    assert again.resolve("sub/a").error


@pytest.mark.parametrize(
    "name",
    [
        "../models/sub/a",
        "/etc/passwd",
        "sub/../sub/a.safetensors",
        "%2e%2e/a",
        "sub/a\x00",
        str(Path("/") / "tmp"),
    ],
)
def test_requests_cannot_escape_the_listing(folder: Path, name: str) -> None:
    registry = _registry(folder)
    with pytest.raises(NotFoundError):
        registry.resolve(name)


def test_symlinks_followed_and_loops_cut(folder: Path, tmp_path: Path, models_dir: Path) -> None:
    shared = tmp_path / "other-tool-models"
    shared.mkdir()
    shutil.copy(models_dir / "tiny-sd1.safetensors", shared / "b.safetensors")
    os.symlink(shared, folder / "shared")
    os.symlink(folder, folder / "sub" / "loop")  # a loop back to the root
    registry = _registry(folder)
    names = [e.relpath for e in registry.entries()]
    assert "shared/b.safetensors" in names
    assert names.count("sub/a.safetensors") == 1
    assert len(names) == len(set(p.split("/")[-1] for p in names))


def test_clash_between_roots_is_reported(folder: Path, tmp_path: Path) -> None:
    second = tmp_path / "second"
    (second / "sub").mkdir(parents=True)
    shutil.copy(folder / "sub" / "a.safetensors", second / "sub" / "a.safetensors")
    entry = _registry(folder, second).resolve("sub/a")
    assert entry.root == folder
    assert any("name clash" in note and str(second) in note for note in entry.notes)


def test_file_being_copied_is_picked_up_when_complete(folder: Path, models_dir: Path) -> None:
    data = (models_dir / "tiny-sd1.safetensors").read_bytes()
    target = folder / "copying.safetensors"
    registry = Checkpoints((folder,), HashCache(None))
    for cut in (0, 7, 100, len(data) // 2):
        target.write_bytes(data[:cut])
        registry.scan()
        entry = registry.resolve("copying")
        assert entry.error and entry.architecture is None
    target.write_bytes(data)
    registry.scan()
    entry = registry.resolve("copying")
    assert entry.error is None and entry.architecture is not None


def test_unknown_name_lists_close_matches(folder: Path) -> None:
    with pytest.raises(NotFoundError, match="sub/a.safetensors"):
        _registry(folder).resolve("sub/b")
