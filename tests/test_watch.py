"""Hot folders: new, growing, replaced and deleted files are picked up without a restart."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from pipelines.errors import NotFoundError
from pipelines.schema import GenerationRequest
from pipelines.service import build_service
from pipelines.settings import Settings
from pipelines.watch import FolderWatcher
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write


def eventually(check: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture()
def setup(tmp_path: Path, models_dir: Path):
    (tmp_path / "loras").mkdir()
    settings = Settings(
        data_dir=tmp_path,
        ckpt_dirs=(tmp_path / "models",),
        lora_dirs=(tmp_path / "loras",),
        threads=2,
    )
    (tmp_path / "models").mkdir()
    engine = build_service(settings)
    watcher = FolderWatcher(
        [*settings.models_dirs, *settings.loras_dirs],
        engine.rescan,
        debounce_ms=100,
        poll_seconds=2,
    ).start()
    yield engine, tmp_path
    watcher.stop()


def test_growing_checkpoint_appears_once_complete(setup, models_dir: Path) -> None:
    engine, root = setup
    data = (models_dir / "tiny-sd1.safetensors").read_bytes()
    shutil.copy(models_dir / "tiny-sd1.yaml", root / "models" / "late.yaml")
    shutil.copytree(models_dir / "demo-tiny-clip", root / "models" / "demo-tiny-clip")
    target = root / "models" / "late.safetensors"
    with target.open("wb") as handle:  # written in chunks while the watcher rescans
        for start in range(0, len(data), len(data) // 5):
            handle.write(data[start : start + len(data) // 5])
            handle.flush()
            time.sleep(0.3)
    assert eventually(lambda: not engine.resolve_checkpoint("late").error)
    result = engine.generate(
        GenerationRequest(prompt="x", seed=1, width=64, height=64, steps=2, checkpoint="late")
    )
    assert result.images


def test_lora_dropped_replaced_and_deleted(setup, tiny_sd1) -> None:
    engine, root = setup
    keys = sd1_keys(SD1_MODULES)
    engine.select_checkpoint(None)  # demo model: same shapes as the tiny SD1
    request = GenerationRequest(
        prompt="a tower <lora:fresh:1>", seed=4, width=64, height=64, steps=2
    )
    write(
        root / "loras" / "fresh.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=11)
    )
    assert eventually(lambda: any(e.name == "fresh" for e in engine.loras()))
    first = np.asarray(engine.generate(request).images[0])
    write(
        root / "loras" / "other.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=12)
    )
    assert eventually(lambda: any(e.name == "other" for e in engine.loras()))
    expected = np.asarray(
        engine.generate(
            GenerationRequest(prompt="a tower <lora:other:1>", seed=4, width=64, height=64, steps=2)
        ).images[0]
    )
    time.sleep(0.05)  # a new mtime for the replacement
    (root / "loras" / "other.safetensors").replace(root / "loras" / "fresh.safetensors")
    assert eventually(lambda: [e.name for e in engine.loras()] == ["fresh"])
    replaced = np.asarray(engine.generate(request).images[0])
    assert not np.array_equal(replaced, first)
    assert np.array_equal(replaced, expected)  # the new content, never a stale cache
    (root / "loras" / "fresh.safetensors").unlink()
    assert eventually(lambda: not engine.loras())
    with pytest.raises(NotFoundError):
        engine.generate(request)
