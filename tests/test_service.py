"""The local service: the contract suite, the job queue (order, interrupt and cancel by id,
queue positions), and hashing that never holds a generation up."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from frontends.api.routes import A1111Api
from frontends.page.ui import follow_job
from pipelines.folders.hashing import HashCache, sha256_of_file
from pipelines.interface import ProgressSnapshot
from pipelines.jobs import JobService
from pipelines.loading import LoadedModel
from pipelines.schema import GenerationRequest
from pipelines.service import Service, build_folders, build_service
from pipelines.settings import Settings
from tests import service_contract as contract
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write
from tests.upscaler_files import write_esrgan


@pytest.fixture(scope="module")
def settings(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Settings:
    data = tmp_path_factory.mktemp("service")
    loras = data / "loras"
    keys = sd1_keys(SD1_MODULES)
    write(loras / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    upscalers = write_esrgan(data / "upscalers" / "2x_tiny.safetensors", scale=2).parent
    return Settings(
        data_dir=data,
        ckpt_dirs=(models_dir,),
        lora_dirs=(loras,),
        upscaler_dirs=(upscalers,),
        threads=2,
    )


@pytest.fixture(scope="module")
def service(settings: Settings) -> Service:
    return build_service(settings)


def test_contract_plain_data(service: Service) -> None:
    contract.check_plain_data_crosses(service)


def test_contract_determinism(service: Service) -> None:
    contract.check_same_request_same_pixels(service)


def test_contract_validation_first(service: Service) -> None:
    contract.check_bad_requests_fail_before_queueing(service)


def test_contract_interrupt_by_id(service: Service) -> None:
    contract.check_interrupt_by_id_from_anywhere(service)


def test_contract_img2img(service: Service) -> None:
    contract.check_img2img_same_pixels_and_kept_outside(service)


def test_contract_series(service: Service) -> None:
    contract.check_series_runs_in_order_and_stops_with_what_is_done(service)


def test_contract_extras(service: Service) -> None:
    contract.check_extras_with_a_model_upscaler(service)


def test_contract_styles(service: Service) -> None:
    contract.check_styles_are_applied_before_queueing(service)


def test_queued_job_is_cancelled_and_others_keep_their_order() -> None:
    """The queue serves in arrival order; interrupting a queued job takes it out (its
    result says so) without disturbing the others; positions count from the running job."""
    gate = threading.Event()
    finished: list[str] = []

    def execute(work: str, control: object) -> str:
        if work == "first":
            gate.wait(10)
        finished.append(work)
        return work

    jobs = JobService(execute)
    ids = {name: jobs.submit(name, kind="test", user="u") for name in ("first", "a", "b", "c")}
    time.sleep(0.1)
    listed = {info.label or info.job_id: info.queue_position for info in jobs.jobs()}
    assert sorted(listed.values()) == [0, 1, 2, 3]
    assert jobs.snapshot(ids["b"]).queue_position == 2
    assert jobs.interrupt(ids["b"])
    gate.set()
    assert [jobs.result(ids[n]) for n in ("first", "a", "c")] == ["first", "a", "c"]
    assert jobs.result(ids["b"]) is None and jobs.snapshot(ids["b"]).state == "cancelled"
    assert finished == ["first", "a", "c"]


def test_page_and_api_jobs_finish_in_arrival_order(service: Service, settings: Settings) -> None:
    """Jobs from the page (its `follow_job`) and from the A1111 API, sent alternately while
    a long job runs, finish in the order they arrived: one queue serves every front end."""
    api = A1111Api(service, settings)
    blocker = service.submit(contract.request(seed=1, steps=12))
    order: list[str] = []
    lock = threading.Lock()

    def page(seed: int) -> None:
        request = contract.request(seed=seed)
        for item in follow_job(service, request, "address:10.0.0.1", 0):
            if not isinstance(item, str | ProgressSnapshot) and item is not None:
                with lock:
                    order.append(f"page-{seed}")

    def through_api(seed: int) -> None:
        api.txt2img({**contract.SMALL, "seed": seed, "override_settings": {}}, "address:x")
        with lock:
            order.append(f"api-{seed}")

    arrivals = []
    threads = []
    for index, (kind, target) in enumerate([("page", page), ("api", through_api)] * 2):
        seed = 100 + index
        thread = threading.Thread(target=target, args=(seed,))
        thread.start()
        threads.append(thread)
        arrivals.append(f"{kind}-{seed}")
        deadline = time.monotonic() + 30
        while len(service.jobs()) < index + 2:  # wait until it is queued
            assert time.monotonic() < deadline
            time.sleep(0.01)
    service.result(blocker)
    for thread in threads:
        thread.join(120)
    assert order == arrivals


def test_a_generation_finishes_while_a_slow_hash_runs(settings: Settings, tmp_path: Path) -> None:
    """Hashing a big checkpoint (here: a hash that waits for a gate) never holds up
    loading or generating; the infotext says the hash is still coming."""
    gate = threading.Event()

    def slow(path: Path) -> str:
        gate.wait(60)
        return sha256_of_file(path)

    fresh = Settings(
        data_dir=tmp_path,
        ckpt_dirs=settings.ckpt_dirs,
        lora_dirs=settings.lora_dirs,
        threads=2,
    )
    folders = build_folders(fresh, HashCache(None, {"sha256": slow, "addnet": slow}))
    service = build_service(fresh, folders=folders)
    try:
        started = time.monotonic()
        result = service.generate(contract.request(seed=3))
        assert time.monotonic() - started < 50 and not gate.is_set()
        assert "Model hash" not in result.infotexts[0]
        assert any("hash is still being computed" in note for note in result.notes)
    finally:
        gate.set()
    deadline = time.monotonic() + 30
    while service.resolve_checkpoint("tiny-sd1").sha256 is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    later = service.generate(contract.request(seed=3))
    short = service.resolve_checkpoint("tiny-sd1").short_hash
    assert f"Model hash: {short}" in later.infotexts[0]
    assert np.array_equal(np.asarray(later.images[0]), np.asarray(result.images[0]))


def test_model_still_loading_is_a_503(settings: Settings, tmp_path: Path) -> None:
    from pipelines.errors import BusyError

    fresh = Settings(
        data_dir=tmp_path, ckpt_dirs=settings.ckpt_dirs, lora_dirs=settings.lora_dirs, threads=2
    )
    service = build_service(fresh)
    job = service.preload("tiny-sd1")
    refused = 0
    try:
        service.submit(GenerationRequest(prompt="x", width=64, height=64, steps=1))
    except BusyError as error:
        refused += 1
        assert error.status == 503 and "still loading" in error.message
    status = service._jobs.result(job)
    assert status.title.startswith("tiny-sd1") and service.current_model() == status
    assert refused <= 1  # the load may already be over on a fast machine
