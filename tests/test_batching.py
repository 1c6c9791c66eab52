"""Request batching (`--batch-requests`): which requests are compatible, and a batch of
them denoised in one UNet call per step, each image equal to its request run alone."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.engine import Engine
from pipelines.errors import BusyError
from pipelines.folders.registry import ModelFolders
from pipelines.generation.batch import batch_key, merge_blocks
from pipelines.generation.run import check_request
from pipelines.interface import ProgressSnapshot
from pipelines.jobs import Batchable, JobService
from pipelines.limits import UserLimits
from pipelines.loading import LoadedModel
from pipelines.schema import GenerationRequest, GenerationResult, HiresFix, ImageInputs, LoraSpec
from pipelines.service import Service, build_folders
from pipelines.settings import Settings, parse_settings
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

SMALL = {"width": 64, "height": 64, "steps": 3, "checkpoint": "tiny-sd1", "prompt": "a tower"}
BLOCKER_WIDTH = 72  # the blocker's latents are 9 wide: its UNet calls are told apart


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest(**{**SMALL, **fields})  # type: ignore[arg-type]


# -- the compatibility key


def key(**fields: object) -> object:
    return batch_key(check_request(request(**{"seed": 1, **fields})))


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a castle by the sea"},
        {"negative_prompt": "blurry"},
        {"seed": 7},
        {"subseed": 3, "subseed_strength": 0.4},
        {"seed_resize_from_w": 128, "seed_resize_from_h": 128},
        {"batch_size": 2},
        {"randn_source": "NV"},
        {"eta_noise_seed_delta": 31337},  # re-seeds each item's own generator
        {"prompt": "a tower, (red:1.3), BREAK roof"},  # chunks are compared after encoding
    ],
)
def test_per_image_fields_keep_requests_compatible(change: dict) -> None:
    assert key(**change) == key() is not None


@pytest.mark.parametrize(
    "change",
    [
        {"checkpoint": "other"},
        {"vae": "None"},
        {"loras": (LoraSpec("ink", 0.5),)},
        {"prompt": "a tower <lora:ink:0.5>"},
        {"loras": (LoraSpec("ink", 0.5, 1.0),)},
        {"width": 128},
        {"height": 128},
        {"sampler_name": "Euler a"},
        {"scheduler": "karras"},
        {"steps": 4},
        {"cfg_scale": 5.0},
        {"clip_skip": 2},
        {"n_iter": 2},
        {"tiling": True},
        {"prompt": "a tower AND a moat"},  # two AND parts: more UNet rows per image
        {"prompt": "a tower :1.2"},  # one part, another weight
        {"prompt": "a [tower:castle:2]"},  # the text changes after step 2
        {"prompt": "a [tower|castle]"},  # alternates every step
        {"negative_prompt": "[blurry::1]"},
    ],
)
def test_run_changing_fields_make_another_key(change: dict) -> None:
    assert key(**change) != key()


def test_block_weights_split_and_weight_schedules_run_alone() -> None:
    blocks = key(prompt="a tower <lora:ink:0.5:in=0:mid=1:out=1>")
    assert blocks is not None and blocks != key(prompt="a tower <lora:ink:0.5>")
    assert blocks == key(prompt="a moat <lora:ink:0.5:in=0:mid=1:out=1>")
    assert key(prompt="a tower <lora:ink:0@0,1@0.5>") is None  # re-merged between steps


def test_controlnet_units_run_alone() -> None:
    from pipelines.schema import ControlNetUnit

    assert key(controlnet=(ControlNetUnit(model="any"),)) is None


def test_layered_runs_never_share_a_batch() -> None:
    assert key(hires=HiresFix()) is None
    assert key(img2img=ImageInputs(images=())) is None
    assert key(refiner_checkpoint="tiny-sd1") is None


def test_loras_with_the_same_stack_share_a_key() -> None:
    tagged = key(prompt="a castle <lora:ink:0.5>")
    assert tagged == key(prompt="a dog <lora:ink:0.5>")
    assert tagged == key(loras=(LoraSpec("ink", 0.5),))  # a row or a tag: one stack


def test_blocks_merge_copy_major() -> None:
    """[uncond a, cond a] + [uncond b1, uncond b2, cond b1, cond b2] -> the uncond rows
    of every request first, then the cond rows, each request's in order."""
    a = torch.tensor([[1.0], [2.0]])
    b = torch.tensor([[10.0], [11.0], [20.0], [21.0]])
    merged = merge_blocks([a, b], 2)
    assert merged.flatten().tolist() == [1.0, 10.0, 11.0, 2.0, 20.0, 21.0]


# -- settings


def test_off_by_default_and_set_by_flag_or_environment() -> None:
    assert Settings().batch_requests == 0
    assert parse_settings([], {}).batch_requests == 0
    assert parse_settings([], {"LORASTACK_BATCH_REQUESTS": "250"}).batch_requests == 250
    given = parse_settings(["--batch-requests", "40"], {"LORASTACK_BATCH_REQUESTS": "250"})
    assert given.batch_requests == 40
    with pytest.raises(SystemExit):
        parse_settings(["--batch-requests", "-1"], {})


# -- the queue (fake executors)


def test_queue_groups_compatible_jobs_and_keeps_the_others_in_order() -> None:
    gate = threading.Event()
    runs: list[list[str]] = []

    def alone(work: str, control: object) -> str:
        if work == "block":
            gate.wait(10)
        runs.append([work])
        return work

    def together(works: list[str], controls: list[object]) -> list[str]:
        runs.append(list(works))
        return [work.upper() for work in works]

    jobs = JobService(alone, execute_batch=together, batch_window=0.05, batch_capacity=3)
    blocker = jobs.submit("block", kind="t", user="u")
    time.sleep(0.1)
    ids = {
        work: jobs.submit(work, kind="t", user="u", batchable=Batchable(group, size))
        for work, group, size in (
            ("a1", "a", 1),
            ("b1", "b", 1),
            ("a2", "a", 2),
            ("a3", "a", 1),  # over the capacity: a batch of its own later
            ("b2", "b", 1),
        )
    }
    plain = jobs.submit("plain", kind="t", user="u")
    gate.set()
    assert jobs.result(blocker) == "block"
    assert [jobs.result(ids[w]) for w in ("a1", "a2", "b1", "b2")] == ["A1", "A2", "B1", "B2"]
    assert jobs.result(ids["a3"]) == "a3" and jobs.result(plain) == "plain"
    assert runs == [["block"], ["a1", "a2"], ["b1", "b2"], ["a3"], ["plain"]]


def test_limits_count_each_batched_request() -> None:
    """Queue slots and the rate limit count every request, batched or not."""
    gate = threading.Event()

    def together(works: list[str], controls: list[object]) -> list[str]:
        gate.wait(10)
        return works

    limits = UserLimits(rate_limit=3, queue_slots=2)
    jobs = JobService(
        lambda work, control: together([work], [control])[0],
        limits=limits,
        execute_batch=together,
        batch_window=5.0,
    )
    first = jobs.submit("a", kind="t", user="ann", batchable=Batchable("k", 1))
    second = jobs.submit("b", kind="t", user="ann", batchable=Batchable("k", 1))
    assert limits.slots.in_use("ann") == 2
    with pytest.raises(BusyError, match="queue limit"):
        jobs.submit("c", kind="t", user="ann", batchable=Batchable("k", 1))
    gate.set()
    assert jobs.result(first) == "a" and jobs.result(second) == "b"
    assert limits.slots.in_use("ann") == 0
    with pytest.raises(BusyError, match="rate limit"):  # the refused one counted too
        jobs.submit("d", kind="t", user="ann", batchable=Batchable("k", 1))


# -- the engine: tiny SD1, 64x64, 3 steps


@pytest.fixture(scope="module")
def engine_parts(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> tuple[Settings, Engine, ModelFolders]:
    data = tmp_path_factory.mktemp("batching")
    loras = data / "loras"
    keys = sd1_keys(SD1_MODULES)
    write(loras / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    settings = Settings(data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(loras,), threads=2)
    folders = build_folders(settings)
    return settings, Engine(settings, folders), folders


@pytest.fixture(scope="module")
def alone(engine_parts: tuple[Settings, Engine, ModelFolders]) -> Service:
    """The default service (batching off)."""
    settings, engine, folders = engine_parts
    return Service(settings, folders, engine)


@pytest.fixture(scope="module")
def batched(engine_parts: tuple[Settings, Engine, ModelFolders]) -> Service:
    """A service batching over 100 ms, on the same engine as `alone`."""
    settings, engine, folders = engine_parts
    return Service(replace(settings, batch_requests=100), folders, engine)


@pytest.fixture
def unet_rows(
    engine_parts: tuple[Settings, Engine, ModelFolders], alone: Service
) -> Iterator[list[int]]:
    """The row count of every UNet call on 64-pixel-wide latents (not the blocker's)."""
    engine = engine_parts[1]
    alone.select_checkpoint("tiny-sd1")
    assert engine.manager.current is not None
    rows: list[int] = []

    def hook(module: object, args: tuple) -> None:
        sample = args[0]
        if sample.shape[-1] == SMALL["width"] // 8:  # type: ignore[operator]
            rows.append(int(sample.shape[0]))

    handle = engine.manager.current.pipe.unet.register_forward_pre_hook(hook)
    yield rows
    handle.remove()


Progress = Callable[[ProgressSnapshot], None] | None


def submit_together(
    service: Service,
    requests: list[GenerationRequest],
    progress: list[Progress] | None = None,
    preview_every: int = 0,
) -> list[str]:
    """Queue `requests` while the worker is held inside another job, so all of them wait
    in the queue when it takes the next one (no reliance on timing)."""
    gate, holding = threading.Event(), threading.Event()

    def hold(snapshot: ProgressSnapshot) -> None:
        if snapshot.sampling_step >= 1 and not gate.is_set():
            holding.set()
            gate.wait(30)

    blocker = service.submit(request(width=BLOCKER_WIDTH, steps=1, seed=9), on_progress=hold)
    assert holding.wait(60)
    callbacks = progress or [None] * len(requests)
    ids = [
        service.submit(item, on_progress=callback, preview_every=preview_every)
        for item, callback in zip(requests, callbacks, strict=True)
    ]
    gate.set()
    service.result(blocker)
    return ids


def pixels(result: GenerationResult) -> list[np.ndarray]:
    return [np.asarray(image).astype(np.int16) for image in result.images]


def assert_close(batched: GenerationResult, alone: GenerationResult) -> None:
    """Same seeds and infotexts; every image within one grey level (1/255)."""
    assert batched.seeds == alone.seeds
    assert batched.infotexts == alone.infotexts
    assert len(batched.images) == len(alone.images) > 0
    for got, want in zip(pixels(batched), pixels(alone), strict=True):
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1


@pytest.mark.parametrize("sampler", ["DPM++ 2M", "Euler a"])
def test_merged_requests_take_one_unet_call_per_step_and_match_alone(
    batched: Service, alone: Service, unet_rows: list[int], sampler: str
) -> None:
    """Three requests (one of two images; a LoRA as a row or as a tag; a negative prompt)
    share every UNet call: one call per step of 2 x 4 rows (uncond and cond of 4 images).
    The ancestral sampler checks that each image keeps its own generator (one request
    with ENSD, whose generators are re-seeded, beside two without)."""
    ink = (LoraSpec("ink", 0.6),)
    ensd = 31337 if sampler == "Euler a" else 0
    requests = [
        request(prompt="a red tower", seed=11, loras=ink, sampler_name=sampler),
        request(
            prompt="a stone bridge",
            seed=12,
            batch_size=2,
            loras=ink,
            sampler_name=sampler,
            eta_noise_seed_delta=ensd,
        ),
        request(
            prompt="a lake <lora:ink:0.6>", negative_prompt="fog", seed=13, sampler_name=sampler
        ),
    ]
    ids = submit_together(batched, requests)
    results = [batched.result(job) for job in ids]
    assert unet_rows == [2 * 4] * SMALL["steps"]
    unet_rows.clear()
    for item, got in zip(requests, results, strict=True):
        assert_close(got, alone.generate(item))
        assert not got.interrupted
    assert results[1].seeds == [12, 13]


def test_progress_and_previews_stay_per_job(batched: Service) -> None:
    """Each job reports its own steps, and its previews show only its own images."""
    seen: list[list[ProgressSnapshot]] = [[], []]
    requests = [request(seed=21), request(seed=22, batch_size=2, prompt="a hill")]
    ids = submit_together(batched, requests, [seen[0].append, seen[1].append], preview_every=1)
    for job, snapshots, item in zip(ids, seen, requests, strict=True):
        batched.result(job)
        assert {s.job_id for s in snapshots} == {job}
        steps = [s.sampling_step for s in snapshots if s.state == "running"]
        assert max(steps) == SMALL["steps"]
        previews = [s.preview for s in snapshots if s.preview]
        assert previews and all(len(p) == item.batch_size for p in previews)


def interrupt_at_step_one(service: Service) -> Callable[[ProgressSnapshot], None]:
    def on_progress(snapshot: ProgressSnapshot) -> None:
        running = snapshot.state == "running" and not snapshot.interrupted
        if running and snapshot.sampling_step == 1:
            service.interrupt(snapshot.job_id)

    return on_progress


def test_interrupting_one_job_drops_only_its_rows(
    batched: Service, alone: Service, unet_rows: list[int]
) -> None:
    """The middle job is interrupted after step 1: its image is what its own run gives
    when interrupted there, it is done at once (its submitter does not wait for the
    others), its rows leave the UNet, and the others run to the end."""
    requests = [request(seed=31), request(seed=32, prompt="a ship"), request(seed=33)]
    listed_at_step_two: list[str] = []

    def first_job(snapshot: ProgressSnapshot) -> None:
        if snapshot.state == "running" and snapshot.sampling_step == 2:
            listed_at_step_two.extend(info.job_id for info in batched.jobs())

    progress = [first_job, interrupt_at_step_one(batched), None]
    ids = submit_together(batched, requests, progress)
    first, stopped, third = (batched.result(job) for job in ids)
    assert unet_rows == [2 * 3, 2 * 2, 2 * 2]
    unet_rows.clear()
    assert sorted(listed_at_step_two) == sorted([ids[0], ids[2]])
    assert stopped.interrupted and not first.interrupted and not third.interrupted
    assert stopped.request.checkpoint == "tiny-sd1"  # as asked, in the early result too
    own = alone.result(alone.submit(requests[1], on_progress=interrupt_at_step_one(alone)))
    assert own.interrupted
    assert_close(stopped, own)
    assert_close(first, alone.generate(requests[0]))
    assert_close(third, alone.generate(requests[2]))


def test_incompatible_requests_run_alone(
    batched: Service, alone: Service, unet_rows: list[int]
) -> None:
    """Other steps, a hires fix, and a prompt of two chunks (known only after encoding)
    each make the UNet calls they make alone; the two compatible ones share theirs."""
    long_prompt = "a tower, " * 40  # more than 75 tokens: two chunks
    requests = [
        request(seed=41),
        request(seed=42, steps=2),
        request(seed=43, prompt=long_prompt),
        request(seed=44, prompt="a wall"),
        request(seed=45, hires=HiresFix(scale=1.0, second_pass_steps=2)),
    ]
    ids = submit_together(batched, requests)
    results = [batched.result(job) for job in ids]
    together = sorted(unet_rows)
    unet_rows.clear()
    own_rows = []
    for item, got in zip(requests, results, strict=True):
        assert_close(got, alone.generate(item))
        own_rows.append(list(unet_rows))
        unet_rows.clear()
    assert own_rows[0] == own_rows[3] == [2] * SMALL["steps"]
    shared = [2 * 2] * SMALL["steps"]
    assert together == sorted(shared + own_rows[1] + own_rows[2] + own_rows[4])


def test_off_by_default_every_request_runs_alone(alone: Service, unet_rows: list[int]) -> None:
    ids = submit_together(alone, [request(seed=51), request(seed=52)])
    for job in ids:
        alone.result(job)
    assert unet_rows == [2] * (2 * SMALL["steps"])
