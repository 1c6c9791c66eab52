"""Scale-out through Ray Serve: one local cluster on 127.0.0.1 for the whole module, two
replicas of the tiny model behind the same Service as the local engine, compared bit for bit
with the in-process service, and held to the same service contract."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pipelines.interface import ProgressSnapshot
from pipelines.loading import LoadedModel
from pipelines.schema import GenerationRequest, GenerationResult, LoraSpec
from pipelines.service import Service, build_service
from pipelines.settings import Settings
from tests import service_contract as contract
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write
from tests.upscaler_files import write_esrgan

ray = pytest.importorskip("ray")

pytestmark = [
    # Ray's bundled opencensus/grpc and its pydantic v1 shims warn at import and start-up.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:google.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:opencensus.*"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
]

THREADS = 2
SMALL = {"width": 64, "height": 64, "steps": 2, "checkpoint": "tiny-sd1", "prompt": "a tower"}


@pytest.fixture(scope="module")
def folders(
    tmp_path_factory: pytest.TempPathFactory, models_dir: Path, tiny_sd1: LoadedModel
) -> Settings:
    data = tmp_path_factory.mktemp("ray-data")
    loras = data / "loras"
    keys = sd1_keys(SD1_MODULES)
    write(loras / "ink.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=1))
    write(loras / "glow.safetensors", make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=2))
    upscalers = write_esrgan(data / "upscalers" / "2x_tiny.safetensors", scale=2).parent
    return Settings(
        data_dir=data,
        ckpt_dirs=(models_dir,),
        lora_dirs=(loras,),
        upscaler_dirs=(upscalers,),
        threads=THREADS,
    )


@pytest.fixture(scope="module")
def local(folders: Settings) -> Service:
    """The in-process reference, with the same settings and thread count."""
    service = build_service(folders)
    service.folders.hash_missing()
    return service


@pytest.fixture(scope="module")
def remote(folders: Settings) -> Iterator[Service]:
    from ray import serve

    from deployments.ray.scaleout import ScaleOptions, connect

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        options = ScaleOptions(replicas=2, num_cpus=1)
        service = build_service(folders, lambda s, _: connect(s, "local", options))
        service.folders.hash_missing()
        service.select_checkpoint("tiny-sd1")
        yield service
    finally:
        serve.shutdown()
        ray.shutdown()


def request(**fields: object) -> GenerationRequest:
    return GenerationRequest(**{**SMALL, **fields})  # type: ignore[arg-type]


def same(a: GenerationResult, b: GenerationResult) -> bool:
    assert a.infotexts == b.infotexts
    assert a.seeds == b.seeds
    assert len(a.images) == len(b.images)
    for x, y in zip(a.images, b.images, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert np.array_equal(x, y), f"max diff {np.abs(x.astype(int) - y).max()}"
    return True


STACKS = {
    "ink": request(seed=3, loras=(LoraSpec("ink", 0.8),)),
    "glow": request(seed=4, prompt="a tower <lora:glow:0.6>"),
    "base": request(seed=5, sampler_name="Euler a"),
}


def test_contract_plain_data(remote: Service) -> None:
    contract.check_plain_data_crosses(remote)


def test_contract_determinism(remote: Service) -> None:
    contract.check_same_request_same_pixels(remote)


def test_contract_validation_first(remote: Service) -> None:
    contract.check_bad_requests_fail_before_queueing(remote)


def test_contract_interrupt_by_id(remote: Service) -> None:
    contract.check_interrupt_by_id_from_anywhere(remote)


def test_contract_img2img(remote: Service) -> None:
    contract.check_img2img_same_pixels_and_kept_outside(remote)


def test_contract_series(remote: Service) -> None:
    contract.check_series_runs_in_order_and_stops_with_what_is_done(remote)


def test_contract_extras(remote: Service) -> None:
    contract.check_extras_with_a_model_upscaler(remote)


def test_contract_styles(remote: Service) -> None:
    contract.check_styles_are_applied_before_queueing(remote)


def test_img2img_gives_the_local_pixels(remote: Service, local: Service) -> None:
    wanted = contract.inpainting_request(seed=11)
    assert same(remote.generate(wanted), local.generate(wanted))


def test_replicas_use_the_engine_thread_count(remote: Service) -> None:
    states = remote.runner.states()
    assert len(states) == 2
    assert {s.threads for s in states} == {THREADS}


def test_concurrent_stacks_equal_in_process(remote: Service, local: Service) -> None:
    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(STACKS, pool.map(remote.generate, STACKS.values()), strict=True))
    for name, req in STACKS.items():
        assert same(results[name], local.generate(req)), name
    assert len({r.replica for r in results.values()}) == 2  # spread over both


def test_routing_prefers_the_warm_replica(remote: Service) -> None:
    first = {name: remote.generate(STACKS[name]).replica for name in ("ink", "glow")}
    hits = remote.runner.stats.hits
    for _ in range(2):
        for name in ("ink", "glow"):
            result = remote.generate(STACKS[name])
            assert result.replica == first[name]
    assert first["ink"] != first["glow"]
    assert remote.runner.stats.hits - hits == 4


def test_interrupt_reaches_only_its_job(remote: Service) -> None:
    long = request(seed=7, steps=6, n_iter=4)

    def stop_early(progress: ProgressSnapshot) -> None:
        if progress.sampling_step == 2:
            remote.interrupt(progress.job_id)  # this job only (the page's Interrupt)

    stopped = remote.submit(long, on_progress=stop_early)
    other = remote.submit(request(seed=8, steps=3, n_iter=3))
    stopped_result, other_result = remote.result(stopped), remote.result(other)
    assert stopped_result.interrupted and len(stopped_result.images) < 4
    assert not other_result.interrupted and len(other_result.images) == 3


def test_new_lora_is_visible_through_both_replicas(
    remote: Service, local: Service, folders: Settings, tiny_sd1: LoadedModel
) -> None:
    keys = sd1_keys(SD1_MODULES)
    write(
        folders.loras_dirs[0] / "fresh.safetensors",
        make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=11),
    )
    remote.rescan()
    local.rescan()
    local.folders.hash_missing()
    remote.folders.hash_missing()
    states = remote.runner.states()
    assert len(states) == 2 and all("fresh" in s.loras for s in states)
    assert "fresh" in [e.name for e in remote.loras()]
    fresh = request(seed=12, loras=(LoraSpec("fresh", 0.7),))
    assert same(remote.generate(fresh), local.generate(fresh))


def wait_for_replicas(remote: Service, count: int, timeout: float = 240) -> None:
    """Serve restarts a killed replica in seconds on a quiet machine; the suite runs beside
    other workers, so the wait is generous (a hung restart still fails)."""
    deadline = time.monotonic() + timeout
    while len(remote.runner.replica_ids()) < count:
        assert time.monotonic() < deadline, "Serve did not restart the killed replica"
        time.sleep(0.5)


def kill_running_replica(remote: Service) -> Callable[[ProgressSnapshot], None]:
    """An on_progress that SIGKILLs the replica process running this job at step 2."""
    killed: list[str] = []

    def on_step(progress: ProgressSnapshot) -> None:
        if progress.sampling_step == 2 and not killed:
            replica = remote.runner.current_replica()
            pid = next(s.pid for s in remote.runner.states() if s.replica == replica)
            killed.append(replica)
            os.kill(pid, signal.SIGKILL)

    on_step.killed = killed  # type: ignore[attr-defined]
    return on_step


def test_killed_replica_is_retried_on_the_other(remote: Service, local: Service) -> None:
    job = request(seed=21, steps=8, loras=(LoraSpec("glow", 0.5),))
    on_step = kill_running_replica(remote)
    result = remote.generate(job, on_progress=on_step)
    assert on_step.killed and result.replica != on_step.killed[0]
    assert same(result, local.generate(job))  # the whole image, never a partial one
    wait_for_replicas(remote, 2)


def test_killed_replica_without_retry_fails_clearly(remote: Service, local: Service) -> None:
    from deployments.ray.scaleout import ReplicaLostError

    job = request(seed=22, steps=8)
    on_step = kill_running_replica(remote)
    remote.runner.retries = 0
    try:
        with pytest.raises(ReplicaLostError, match="stopped; no image was made") as error:
            remote.generate(job, on_progress=on_step)
    finally:
        remote.runner.retries = 1
    assert error.value.status == 503
    # the front end keeps serving
    assert same(remote.generate(job), local.generate(job))
    wait_for_replicas(remote, 2)
