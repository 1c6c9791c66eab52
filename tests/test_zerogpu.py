"""ZeroGPU: the duration estimate and its calibration, the no-op wrapper off ZeroGPU, and the
runner under a forking stand-in for `spaces.GPU` (tests/zerogpu_standin.py): checkpoint
loads and merges in the main process (a hires checkpoint and a refiner included), the
duration requested and enforced, locks free at the fork."""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deployments.zerogpu import (
    MAX_SECONDS,
    MIN_SECONDS,
    STEP_SECONDS_PER_MEGAPIXEL,
    DurationModel,
    ForkGuard,
    ZeroGpuRunner,
    duration_of_call,
    estimate_duration,
    gpu_wrapper,
    prepare,
    work_units,
    zero_gpu_active,
)
from frontends.page.gpu_time import gpu_time_text
from pipelines.engine import Engine
from pipelines.loading import LoadedModel, random_pipeline
from pipelines.schema import GenerationRequest, GenerationResult, HiresFix, LoraSpec
from pipelines.service import Service, build_folders
from pipelines.settings import Settings
from tests.conftest import DEMO_YAML, FIXTURES, copy_yaml_with_clip
from tests.ldm_export import save_single_file
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, sdxl_ldm_modules, write
from tests.zerogpu_standin import GpuTaskAborted, ZeroGpuStandIn


@pytest.mark.parametrize(
    ("fields", "seconds"),
    [
        ({"steps": 20, "width": 512, "height": 512}, 18),  # 1.5 * (10 + 0.25 * 6)
        ({"steps": 30, "width": 1024, "height": 1024}, 28),  # 1.5 * (10 + 8.5)
        ({"steps": 30, "width": 1024, "height": 1024, "batch_size": 4}, 66),  # 1.5 * (10 + 34)
        ({"steps": 1, "width": 64, "height": 64}, 16),  # the overhead, nearly all of it
        ({"steps": 150, "width": 2048, "height": 2048, "batch_size": 8}, MAX_SECONDS),
    ],
)
def test_estimate_duration(fields: dict[str, int], seconds: int) -> None:
    assert estimate_duration(GenerationRequest(**fields)) == seconds


def test_estimate_grows_with_the_work() -> None:
    base = GenerationRequest(steps=20, width=768, height=768)
    more = [
        GenerationRequest(steps=40, width=768, height=768),
        GenerationRequest(steps=20, width=1024, height=1024),
        GenerationRequest(steps=20, width=768, height=768, batch_size=2),
        GenerationRequest(steps=20, width=768, height=768, n_iter=2),
    ]
    assert all(estimate_duration(r) > estimate_duration(base) for r in more)
    assert estimate_duration(GenerationRequest(steps=1, width=64, height=64)) >= MIN_SECONDS


def test_a_hires_pass_adds_its_size_and_steps() -> None:
    """A hires fix's second pass runs at its target size for its own steps (or the first
    pass's): the request asks for that time too, not only the first pass's."""
    base = GenerationRequest(steps=20, width=512, height=512)
    doubled = replace(base, hires=HiresFix(scale=2.0))  # 1024x1024, 20 more steps
    assert work_units(doubled) == pytest.approx(0.25 * 24 + 1.0 * 24)
    assert estimate_duration(doubled) == math.ceil(1.5 * (10 + 0.25 * (0.25 * 24 + 24)))
    fewer = replace(base, hires=HiresFix(scale=2.0, second_pass_steps=6))
    assert work_units(fewer) == pytest.approx(0.25 * 24 + 1.0 * 10)
    sized = replace(base, hires=HiresFix(resize_x=768, resize_y=768))
    assert work_units(sized) == pytest.approx(0.25 * 24 + 0.5625 * 24)


def test_duration_of_call_finds_the_request() -> None:
    request = GenerationRequest(steps=30, width=1024, height=1024)
    assert duration_of_call("user", request=request) == estimate_duration(request)
    assert duration_of_call(1, 2) == 60


def test_wrapper_is_a_no_op_off_zerogpu(caplog: pytest.LogCaptureFixture) -> None:
    def run(request: GenerationRequest) -> int:
        return request.steps

    assert not zero_gpu_active({}) and zero_gpu_active({"SPACES_ZERO_GPU": "true"})
    assert gpu_wrapper(run, env={}) is run
    assert gpu_wrapper(run, env={"SPACES_ZERO_GPU": "false"}) is run
    if "spaces" not in sys.modules:
        try:
            import spaces  # noqa: F401
        except ImportError:
            with caplog.at_level(logging.WARNING):
                assert gpu_wrapper(run, env={"SPACES_ZERO_GPU": "1"}) is run
                assert not prepare({"SPACES_ZERO_GPU": "1"})
            assert "spaces package is missing" in caplog.text


# ---------------------------------------------------------------------------- stateless


@pytest.fixture(scope="module")
def engine(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Engine:
    data = tmp_path_factory.mktemp("stateless")
    keys = sd1_keys(SD1_MODULES)
    write(data / "loras" / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    write(data / "loras" / "glow.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=2))
    settings = Settings(
        data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(data / "loras",), threads=2
    )
    engine = Engine(settings, build_folders(settings))
    engine.load("tiny-sd1")
    return engine


class Unobserved:
    """A run control nobody watches."""

    interrupted = skipped = False

    def batch(self, job_no: int, job_count: int, steps: int) -> None:
        """Not watched."""

    def step(self, step: int, preview: object = None) -> None:
        """Not watched."""

    def batch_finished(self, result: object) -> None:
        """Not watched."""


def weights(engine: Engine) -> dict[str, torch.Tensor]:
    assert engine.manager.current is not None
    pipe = engine.manager.current.pipe
    return {
        f"{part}.{key}": value.detach().clone()
        for part in ("unet", "text_encoder")
        for key, value in getattr(pipe, part).state_dict().items()
    }


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def pixels(result: GenerationResult) -> bytes:
    return result.images[0].tobytes()


def request(*loras: LoraSpec) -> GenerationRequest:
    return GenerationRequest(prompt="a tower", seed=3, steps=2, width=64, height=64,
                             checkpoint="tiny-sd1", loras=loras)  # fmt: skip


def test_stateless_call_leaves_the_base_weights(engine: Engine) -> None:
    """`Engine.generate(stateless=True)` leaves the base weights; the default keeps the
    stack applied for the next request."""
    base = weights(engine)
    kept = engine.generate(request(LoraSpec("ink", 0.8)), Unobserved())
    assert not same(weights(engine), base)
    glow = engine.generate(request(LoraSpec("glow", 0.7)), Unobserved(), stateless=True)
    assert same(weights(engine), base)  # bit for bit
    again = engine.generate(request(LoraSpec("ink", 0.8)), Unobserved(), stateless=True)
    assert same(weights(engine), base)
    assert pixels(again) == pixels(kept) and pixels(glow) != pixels(kept)


# ---------------------------------------------------------------------------- forked calls


@pytest.fixture
def fresh_engine(engine: Engine) -> Engine:
    """An engine of its own (same folders) with nothing loaded: every switch counts."""
    return Engine(engine.settings, engine.folders)


@contextmanager
def one_thread() -> Iterator[None]:
    """Like a forked worker (one CPU thread), for bit-identical images to compare with."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sd1(*loras: LoraSpec, seed: int = 3, prompt: str = "a tower") -> GenerationRequest:
    return GenerationRequest(prompt=prompt, seed=seed, steps=2, width=64, height=64,
                             checkpoint="tiny-sd1-diffusers", loras=loras)  # fmt: skip


def test_switch_and_merge_happen_once_outside_the_forked_gpu_call(
    fresh_engine: Engine,
) -> None:
    """Several requests on one checkpoint and stack: one switch and one merge, both in this
    process; each forked worker only samples and decodes, and its images are the plain
    engine's."""
    standin = ZeroGpuStandIn()
    runner = ZeroGpuRunner(fresh_engine, gpu=standin.GPU)
    requests = [
        sd1(LoraSpec("ink", 0.8)),
        sd1(LoraSpec("ink", 0.8), seed=4),
        sd1(LoraSpec("ink", 0.8), prompt="a bridge"),
    ]
    results = [runner.generate(r, Unobserved()) for r in requests]
    manager = fresh_engine.manager
    assert (manager.loads, manager.switches, manager.merges) == (1, 1, 1)
    assert runner.inside == [(0, 0)] * 3
    assert len(set(standin.pids)) == 3 and os.getpid() not in standin.pids
    with one_thread():
        here = [fresh_engine.generate(r, Unobserved()) for r in (requests[0], requests[2])]
    assert (manager.switches, manager.merges) == (1, 1)  # still in place here, too
    assert [pixels(r) for r in here] == [pixels(results[0]), pixels(results[2])]
    assert pixels(results[0]) != pixels(results[1])


def test_a_kept_worker_forked_before_a_merge_redoes_it_correctly(fresh_engine: Engine) -> None:
    """ZeroGPU keeps an idle worker: it holds the weights of its fork, so a later stack is
    merged again inside it (counted and logged), and the images stay right."""
    standin = ZeroGpuStandIn(reuse=True)
    runner = ZeroGpuRunner(fresh_engine, gpu=standin.GPU)
    try:
        runner.generate(sd1(LoraSpec("ink", 0.8)), Unobserved())
        glow = runner.generate(sd1(LoraSpec("glow", 0.7)), Unobserved())
    finally:
        standin.close()
    assert standin.pids[0] == standin.pids[1]
    assert runner.inside == [(0, 0), (0, 1)]
    with one_thread():
        here = fresh_engine.generate(sd1(LoraSpec("glow", 0.7)), Unobserved())
    assert pixels(glow) == pixels(here)


@pytest.fixture(scope="module")
def two_pass_settings(
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    tiny_sd1: LoadedModel,
    tiny_sdxl: LoadedModel,
    cache_root: Path,
) -> Settings:
    """`hrbase` and `hrother` (the tiny SD1, the second with another UNet output layer),
    the tiny SDXL and a tiny SDXL refiner; an SD1 LoRA and a CLIP-G LoRA (fits the SDXL
    and its refiner)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path_factory.mktemp("two-pass-models")
    state = load_file(models_dir / "tiny-sd1.safetensors")
    save_file(state, folder / "hrbase.safetensors")
    out = "model.diffusion_model.out."
    save_file({k: v * 1.3 if k.startswith(out) else v for k, v in state.items()},
              folder / "hrother.safetensors")  # fmt: skip
    for name in ("hrbase", "hrother"):
        copy_yaml_with_clip(DEMO_YAML, folder / f"{name}.yaml")
    refiner_yaml = FIXTURES / "tiny-sdxl-refiner.yaml"
    save_single_file(random_pipeline(refiner_yaml, 1, cache_root).pipe,
                     folder / "tiny-refiner.safetensors")  # fmt: skip
    copy_yaml_with_clip(refiner_yaml, folder / "tiny-refiner.yaml")
    data = tmp_path_factory.mktemp("two-pass-data")
    loras = data / "loras"
    write(loras / "ink.safetensors",
          make_kohya(tiny_sd1.pipe, SD1_MODULES, sd1_keys(SD1_MODULES), seed=1))  # fmt: skip
    modules, keys = sdxl_ldm_modules()
    clip_g = [m for m in modules if m[0] == "text_encoder_2"]
    write(loras / "xl-clipg.safetensors", make_kohya(tiny_sdxl.pipe, clip_g, keys, seed=3))
    return Settings(data_dir=data, ckpt_dirs=(folder, models_dir), lora_dirs=(loras,), threads=2)


def two_pass(seed: int, refiner: bool) -> GenerationRequest:
    """An SD1 request with its hires pass on `hrother`, or an SDXL one with a refiner."""
    if refiner:
        return GenerationRequest(prompt="a house", seed=seed, steps=2, width=64, height=64,
                                 checkpoint="xl/tiny-sdxl", loras=(LoraSpec("xl-clipg", 1.0),),
                                 refiner_checkpoint="tiny-refiner",
                                 refiner_switch_at=0.5)  # fmt: skip
    return GenerationRequest(prompt="a tower", seed=seed, steps=2, width=64, height=64,
                             checkpoint="hrbase", loras=(LoraSpec("ink", 0.8),),
                             hires=HiresFix(scale=1.5, checkpoint="hrother"),
                             denoising_strength=0.6)  # fmt: skip


def test_hires_and_refiner_checkpoints_load_and_merge_outside_the_gpu_call(
    two_pass_settings: Settings,
) -> None:
    """A hires pass on another checkpoint and a refiner: the main process loads each of the
    four checkpoints once and merges each stack once (SD1 LoRA on `hrbase` and on
    `hrother`, the CLIP-G LoRA on the SDXL and on its refiner); the forked GPU calls only
    make them current in turn, and their images are those of a plain engine."""
    engine = Engine(two_pass_settings, build_folders(two_pass_settings))
    standin = ZeroGpuStandIn()
    runner = ZeroGpuRunner(engine, gpu=standin.GPU)
    requests = [two_pass(3, False), two_pass(4, False), two_pass(3, True), two_pass(4, True)]
    manager = engine.manager
    results = [runner.generate(r, Unobserved()) for r in requests[:2]]
    engine.prepare(replace(requests[2], refiner_switch_at=1.0), Unobserved())  # never switches
    assert manager.loads == 3 and manager.limit == 2  # so its refiner is not loaded yet
    results += [runner.generate(r, Unobserved()) for r in requests[2:]]
    assert (manager.loads, manager.merges, manager.limit) == (4, 4, 2)
    assert runner.inside == [(0, 0)] * 4
    assert len(set(standin.pids)) == 4 and os.getpid() not in standin.pids
    assert all("Hires checkpoint: hrother" in r.infotexts[0] for r in results[:2])
    assert all("Refiner: tiny-refiner" in r.infotexts[0] for r in results[2:])
    roomy = replace(two_pass_settings, checkpoints_limit=4)  # no reloads: a quicker reference
    plain = Engine(roomy, build_folders(roomy))
    with one_thread():
        here = [plain.generate(r, Unobserved()) for r in requests]
    assert [pixels(r) for r in here] == [pixels(r) for r in results]
    assert results[0].images[0].size == (96, 96) and pixels(results[0]) != pixels(results[1])


class StubManager:
    loads = merges = 0


class StubEngine:
    """An engine whose generation only sleeps (`prompt` = seconds): durations and
    enforcement without sampling."""

    manager = StubManager()

    def fork_locks(self) -> list[object]:
        return []

    def prepare(self, request: GenerationRequest, control: object) -> None:
        """Nothing to switch."""

    def generate(self, request: GenerationRequest, control: object) -> str:
        time.sleep(float(request.prompt or 0))
        return "done"


def test_requested_duration_grows_with_steps_pixels_and_batch() -> None:
    standin = ZeroGpuStandIn()
    base = GenerationRequest(steps=20, width=768, height=768)
    recorded = DurationModel(records=[(work_units(base), 12.0)])  # a run on "this hardware"
    runner = ZeroGpuRunner(StubEngine(), gpu=standin.GPU, durations=recorded)  # type: ignore[arg-type]
    more = [
        GenerationRequest(steps=40, width=768, height=768),
        GenerationRequest(steps=20, width=1024, height=1024),
        GenerationRequest(steps=20, width=768, height=768, batch_size=2),
    ]
    for request in (base, *more):
        assert runner.generate(request, Unobserved()) == "done"
    first, *rest = standin.durations
    assert all(seconds > first for seconds in rest)
    assert standin.durations == [runner.duration(r) for r in (base, *more)]
    assert first == math.ceil(1.5 * (10 + 12.0))  # the recorded run's rate, not the default


def test_a_call_past_its_duration_is_aborted() -> None:
    standin = ZeroGpuStandIn()
    quick = DurationModel(overhead=0, minimum=1, maximum=1)
    runner = ZeroGpuRunner(StubEngine(), gpu=standin.GPU, durations=quick)  # type: ignore[arg-type]
    started = time.monotonic()
    with pytest.raises(GpuTaskAborted, match="ran past its requested 1 s"):
        runner.generate(GenerationRequest(prompt="30"), Unobserved())
    assert time.monotonic() - started < 10
    assert runner.generate(GenerationRequest(prompt="0"), Unobserved()) == "done"  # lock freed


def test_durations_are_calibrated_from_recorded_runs(tmp_path: Path) -> None:
    path = tmp_path / "durations.json"
    request = GenerationRequest(steps=20, width=1024, height=1024)
    model = DurationModel(hardware="gpu-a", path=path)
    built_in = model.estimate(request)
    model.record(request, 3 * STEP_SECONDS_PER_MEGAPIXEL * work_units(request))  # slower here
    slower = model.estimate(request)
    assert slower > built_in
    assert DurationModel(hardware="gpu-a", path=path).estimate(request) == slower  # kept
    assert DurationModel(hardware="gpu-b", path=path).estimate(request) == built_in
    path.write_text("not json")
    assert DurationModel(hardware="gpu-a", path=path).estimate(request) == built_in


SHARED = threading.Lock()  # a lock of the main process that the worker needs (locks do not pickle)


def take_shared() -> str:
    """In the worker: take the lock a background thread of the main process may hold."""
    with SHARED:
        return "took it"


def test_no_background_thread_holds_a_lock_across_the_fork() -> None:
    lock = SHARED
    guard = ForkGuard([lock])
    standin = ZeroGpuStandIn()
    call = standin.GPU(duration=2)(take_shared)
    held, release = threading.Event(), threading.Event()

    def background() -> None:
        with lock:
            held.set()
            release.wait(5)

    # Unguarded, a fork while the thread holds the lock leaves the worker waiting forever.
    thread = threading.Thread(target=background)
    thread.start()
    held.wait(5)
    with pytest.raises(GpuTaskAborted):
        call()
    release.set()
    thread.join()
    # Guarded, the fork waits until the lock is free, so the worker can take it.
    held.clear()
    release.clear()
    thread = threading.Thread(target=background)
    thread.start()
    held.wait(5)
    threading.Timer(0.3, release.set).start()
    with guard.armed():
        assert call() == "took it"
    thread.join()
    assert not lock.locked()


def test_the_page_shows_the_gpu_time_before_the_click(engine: Engine) -> None:
    standin = ZeroGpuStandIn()
    zero = Service(engine.settings, engine.folders, ZeroGpuRunner(engine, gpu=standin.GPU))
    local = Service(engine.settings, engine.folders, ZeroGpuRunner(engine, env={}))
    small = GenerationRequest(steps=20, width=512, height=512)
    big = GenerationRequest(steps=40, width=1024, height=1024, batch_size=2)
    assert gpu_time_text(zero, 20, 512, 512, 1, 1) == (
        f"ZeroGPU: this request asks for **{zero.gpu_seconds(small)} s** of GPU time."
    )
    assert zero.gpu_seconds(big) > zero.gpu_seconds(small) == estimate_duration(small)
    assert local.gpu_seconds(small) is None and gpu_time_text(local, 20, 512, 512, 1, 1) == ""
    assert standin.durations == []  # showing the time asks for no GPU
