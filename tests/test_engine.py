"""The local service end to end on tiny models: loading, determinism, samplers, errors,
memory."""

from __future__ import annotations

import gc
import os
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.errors import InvalidRequestError, NotFoundError, UnusableFileError
from pipelines.infotext import parse_infotext
from pipelines.interface import DEMO_MODEL_NAME
from pipelines.samplers import SAMPLER_NAMES
from pipelines.schema import GenerationRequest
from pipelines.service import Service, build_service
from pipelines.settings import Settings

SMALL = {"width": 64, "height": 64, "steps": 2}


def make_engine(data_dir: Path, *models: Path) -> Service:
    """A local service whose hashes are known before anything is generated (infotexts
    are compared with the live server's, which has hashed by then)."""
    service = build_service(Settings(data_dir=data_dir, ckpt_dirs=tuple(models), threads=2))
    service.folders.hash_missing()
    return service


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Service:
    return make_engine(tmp_path_factory.mktemp("data"), models_dir)


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.images]


def test_lists_all_formats(engine: Service) -> None:
    listed = {e.relpath: e for e in engine.checkpoints()}
    assert set(listed) >= {"tiny-sd1.safetensors", "xl/tiny-sdxl.safetensors", "tiny-sd1-diffusers"}
    assert listed["tiny-sd1.safetensors"].architecture.value == "SD1"
    assert listed["xl/tiny-sdxl.safetensors"].architecture.value == "SDXL"
    assert listed["tiny-sd1-diffusers"].kind == "diffusers"


def test_same_request_same_pixels(engine: Service) -> None:
    request = GenerationRequest(
        prompt="a (red:1.2) house", seed=7, batch_size=2, checkpoint="tiny-sd1", **SMALL
    )
    first, second = engine.generate(request), engine.generate(request)
    assert first.seeds == second.seeds == [7, 8]
    for a, b in zip(pixels(first), pixels(second), strict=True):
        assert np.array_equal(a, b)
    assert not np.array_equal(pixels(first)[0], pixels(first)[1])


def test_batch_items_use_consecutive_seeds(engine: Service) -> None:
    batch = engine.generate(
        GenerationRequest(prompt="x", seed=20, batch_size=2, checkpoint="tiny-sd1", **SMALL)
    )
    single = engine.generate(GenerationRequest(prompt="x", seed=21, checkpoint="tiny-sd1", **SMALL))
    difference = np.abs(pixels(batch)[1].astype(int) - pixels(single)[0].astype(int))
    assert difference.max() <= 1  # batched matmuls may round differently by one level


def test_random_seed_is_reported_and_reproduces(engine: Service) -> None:
    result = engine.generate(
        GenerationRequest(prompt="x", seed=-1, n_iter=2, checkpoint="tiny-sd1", **SMALL)
    )
    assert len(result.seeds) == 2 and result.seeds[1] == result.seeds[0] + 1
    again = engine.generate(
        GenerationRequest(
            prompt="x", seed=result.seeds[0], n_iter=2, checkpoint="tiny-sd1", **SMALL
        )
    )
    assert all(np.array_equal(a, b) for a, b in zip(pixels(result), pixels(again), strict=True))


def test_infotext_round_trip(engine: Service) -> None:
    request = GenerationRequest(
        prompt="a castle, (ink:1.1)",
        negative_prompt="blurry",
        seed=42,
        cfg_scale=6.5,
        sampler_name="Euler a",
        clip_skip=2,
        checkpoint="tiny-sd1",
        **SMALL,
    )
    result = engine.generate(request)
    parsed = parse_infotext(result.infotexts[0])
    assert parsed.prompt == request.prompt and parsed.negative_prompt == "blurry"
    assert parsed.params["Seed"] == "42" and parsed.params["Steps"] == "2"
    assert parsed.params["Sampler"] == "Euler a" and parsed.params["Clip skip"] == "2"
    assert parsed.params["Model"] == "tiny-sd1"
    assert parsed.params["Model hash"] == engine.resolve_checkpoint("tiny-sd1").short_hash
    assert parsed.width == 64 and parsed.height == 64
    assert parsed.params["Version"].startswith("lorastack")


@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_every_sampler_runs(engine: Service, sampler: str) -> None:
    result = engine.generate(
        GenerationRequest(prompt="x", seed=1, sampler_name=sampler, checkpoint="tiny-sd1", **SMALL)
    )
    image = pixels(result)[0]
    assert image.shape == (64, 64, 3)
    assert f"Sampler: {sampler}," in result.infotexts[0]


def test_karras_changes_the_image(engine: Service) -> None:
    base = GenerationRequest(
        prompt="x",
        seed=1,
        sampler_name="Euler",
        checkpoint="tiny-sd1",
        width=64,
        height=64,
        steps=4,
    )
    plain = pixels(engine.generate(base))[0]
    karras = pixels(engine.generate(replace(base, scheduler="karras")))[0]
    assert not np.array_equal(plain, karras)


def test_sdxl_and_diffusers_folder(engine: Service) -> None:
    xl = engine.generate(GenerationRequest(prompt="a cat", seed=3, checkpoint="tiny-sdxl", **SMALL))
    assert "Model: tiny-sdxl" in xl.infotexts[0]
    folder = engine.generate(
        GenerationRequest(prompt="a cat", seed=3, checkpoint="tiny-sd1-diffusers", **SMALL)
    )
    single = engine.generate(
        GenerationRequest(prompt="a cat", seed=3, checkpoint="tiny-sd1", **SMALL)
    )
    assert np.array_equal(pixels(folder)[0], pixels(single)[0])


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"width": 100}, None),
        ({"width": 0}, "width"),
        ({"height": 4096}, "height"),
        ({"steps": 0}, "steps"),
        ({"steps": 10_000}, "steps"),
        ({"batch_size": 1000}, "batch_size"),
        ({"cfg_scale": float("nan")}, "cfg_scale"),
        ({"seed": 2**32}, "seed"),
        ({"prompt": "x" * 100_001}, "prompt"),
        ({"sampler_name": "Bogus"}, "sampler_name"),
        ({"scheduler": "nonsense"}, "scheduler"),
        ({"width": 2048, "height": 2048}, "width"),
    ],
)
def test_bad_requests_name_the_field(engine: Service, change: dict, field: str | None) -> None:
    request = replace(
        GenerationRequest(prompt="x", seed=1, checkpoint="tiny-sd1", **SMALL), **change
    )
    if field is None:  # rounded down to a multiple of 8, as A1111 does
        assert request.validated(engine.bounds()).width == 96
        return
    with pytest.raises(InvalidRequestError) as caught:
        engine.generate(request)
    assert caught.value.field == field


def test_unknown_checkpoint_lists_close_matches(engine: Service) -> None:
    with pytest.raises(NotFoundError, match="tiny-sd1"):
        engine.generate(GenerationRequest(prompt="x", checkpoint="tiny-sd", **SMALL))


def test_lookup_by_title_hash_and_name(engine: Service) -> None:
    engine.folders.hash_missing()
    entry = engine.resolve_checkpoint("tiny-sd1.safetensors")
    assert engine.resolve_checkpoint(entry.title) == entry
    assert engine.resolve_checkpoint(entry.short_hash) == entry
    assert engine.resolve_checkpoint("TINY-SD1") == entry


def test_demo_model_when_nothing_installed(tmp_path: Path) -> None:
    engine = make_engine(tmp_path, tmp_path / "empty-models")
    status = engine.select_checkpoint(None)
    assert status.title == DEMO_MODEL_NAME and status.is_demo
    assert engine.current_model() == status
    result = engine.generate(GenerationRequest(prompt="hello", seed=5, **SMALL))
    assert "Model: lorastack-demo-tiny" in result.infotexts[0]
    assert any("random weights" in note for note in result.notes)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("zero.safetensors", b"", "empty"),
        ("junk.safetensors", os.urandom(4096), ""),
        ("cut.safetensors", None, "truncated"),
        ("old.ckpt", b"not a zip at all", ""),
    ],
)
def test_bad_checkpoint_files_are_refused_and_engine_survives(
    tmp_path: Path, models_dir: Path, name: str, content: bytes | None, reason: str
) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    if content is None:
        content = (models_dir / "tiny-sd1.safetensors").read_bytes()[:50_000]
    (folder / name).write_bytes(content)
    engine = make_engine(tmp_path, folder)
    with pytest.raises(UnusableFileError) as caught:
        engine.select_checkpoint(Path(name).stem)
    assert name in caught.value.message and reason in caught.value.message
    engine.select_checkpoint(None)  # still serves: the demo model
    assert engine.generate(GenerationRequest(prompt="x", seed=1, **SMALL)).images


def test_concurrent_requests_are_serialised(engine: Service) -> None:
    requests = [
        GenerationRequest(prompt=f"p{i}", seed=i, checkpoint="tiny-sd1", **SMALL) for i in range(4)
    ]
    references = [pixels(engine.generate(r))[0] for r in requests]
    results: dict[int, np.ndarray] = {}

    def run(index: int) -> None:
        results[index] = pixels(engine.generate(requests[index]))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, reference in enumerate(references):
        assert np.array_equal(results[index], reference)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_switching_models_frees_memory(engine: Service) -> None:
    """RSS after 10 switches between two tiny models stays within 150 MB of the level after
    the first round (each tiny model is ~20 MB of weights; a leak would add ~40 MB a round)."""
    for name in ("tiny-sd1", "tiny-sdxl"):
        engine.select_checkpoint(name)
    gc.collect()
    baseline = _rss_bytes()
    for _ in range(10):
        for name in ("tiny-sd1", "tiny-sdxl"):
            engine.select_checkpoint(name)
    gc.collect()
    growth = _rss_bytes() - baseline
    assert growth < 150 * 2**20, f"RSS grew by {growth / 2**20:.0f} MiB"


class _Exploit:
    """Pickles as a call that would create a marker file if anything unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_unsafe_pickle_checkpoint_runs_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    folder.mkdir()
    marker = tmp_path / "pwned"
    torch.save(
        {"state_dict": {"x": torch.zeros(1)}, "evil": _Exploit(marker)}, folder / "evil.ckpt"
    )
    (folder / "notes.txt").write_text("not a model")  # wrong extension: not listed
    engine = make_engine(tmp_path, folder)
    assert [e.relpath for e in engine.checkpoints()] == ["evil.ckpt"]
    with pytest.raises(UnusableFileError, match="evil.ckpt.*system") as caught:
        engine.select_checkpoint("evil")
    assert "safetensors" in caught.value.message
    assert not marker.exists()
    assert engine.resolve_checkpoint("evil").error  # now listed as unusable
