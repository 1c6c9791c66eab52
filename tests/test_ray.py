"""Scale-out through Ray Serve: one local cluster on 127.0.0.1 for the whole module, two
replicas of the tiny model, compared bit for bit with an in-process Engine."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from pipelines.engine import Engine, Progress
from pipelines.loading import LoadedModel
from pipelines.lora_registry import LoraLibrary
from pipelines.registry import CheckpointRegistry, HashCache
from pipelines.schema import GenerationRequest, GenerationResult, LoraSpec
from pipelines.settings import Settings
from tests.test_lora import SD1_MODULES, make_kohya, sd1_keys, write

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
    return Settings(data_dir=data, ckpt_dirs=(models_dir,), lora_dirs=(loras,), threads=THREADS)


@pytest.fixture(scope="module")
def local(folders: Settings) -> Engine:
    """The in-process reference, with the same settings and thread count."""
    hashes = HashCache(None)
    checkpoints = CheckpointRegistry(folders.models_dirs, hashes)
    checkpoints.scan()
    loras = LoraLibrary(folders.loras_dirs, hashes)
    loras.scan()
    loras.hash_all()
    return Engine(folders, checkpoints, loras)


@pytest.fixture(scope="module")
def remote(folders: Settings) -> Iterator[object]:
    from ray import serve

    from pipelines.scaleout import ScaleOptions, connect

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
    )
    try:
        engine = connect(folders, "local", ScaleOptions(replicas=2, num_cpus=1))
        engine.load_checkpoint("tiny-sd1")
        yield engine
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


def test_replicas_use_the_engine_thread_count(remote) -> None:
    states = remote.states()
    assert len(states) == 2
    assert {s.threads for s in states} == {THREADS}


def test_concurrent_stacks_equal_in_process(remote, local: Engine) -> None:
    with ThreadPoolExecutor(3) as pool:
        results = dict(zip(STACKS, pool.map(remote.generate, STACKS.values()), strict=True))
    for name, req in STACKS.items():
        assert same(results[name], local.generate(req)), name
    assert len({r.replica for r in results.values()}) == 2  # spread over both


def test_routing_prefers_the_warm_replica(remote) -> None:
    first = {name: remote.generate(STACKS[name]).replica for name in ("ink", "glow")}
    hits = remote.stats.hits
    for _ in range(2):
        for name in ("ink", "glow"):
            result = remote.generate(STACKS[name])
            assert result.replica == first[name]
    assert first["ink"] != first["glow"]
    assert remote.stats.hits - hits == 4


def test_interrupt_reaches_only_its_job(remote) -> None:
    long = request(seed=7, steps=6, n_iter=4)

    def stop_early(progress: Progress) -> None:
        if progress.sampling_step == 2:
            remote.interrupt()  # inside on_step: this job only (the UI's Interrupt)

    with ThreadPoolExecutor(2) as pool:
        stopped = pool.submit(remote.generate, long, stop_early)
        other = pool.submit(remote.generate, request(seed=8, steps=3, n_iter=3))
        stopped_result, other_result = stopped.result(), other.result()
    assert stopped_result.interrupted and len(stopped_result.images) < 4
    assert not other_result.interrupted and len(other_result.images) == 3


def test_new_lora_is_visible_through_both_replicas(
    remote, local: Engine, folders: Settings, tiny_sd1: LoadedModel
) -> None:
    keys = sd1_keys(SD1_MODULES)
    write(
        folders.loras_dirs[0] / "fresh.safetensors",
        make_kohya(tiny_sd1.pipe, SD1_MODULES, keys, seed=11),
    )
    remote.rescan()
    local.rescan()
    local.loras.hash_all()
    states = remote.states()
    assert len(states) == 2 and all("fresh" in s.loras for s in states)
    assert "fresh" in [e.name for e in remote.loras.entries()]
    fresh = request(seed=12, loras=(LoraSpec("fresh", 0.7),))
    assert same(remote.generate(fresh), local.generate(fresh))


def wait_for_replicas(remote, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while len(remote.replica_ids()) < count:
        assert time.monotonic() < deadline, "Serve did not restart the killed replica"
        time.sleep(0.5)


def kill_running_replica(remote) -> callable:
    """An on_step that SIGKILLs the replica process running this job at step 2."""
    killed: list[str] = []

    def on_step(progress: Progress) -> None:
        if progress.sampling_step == 2 and not killed:
            replica = remote.current_replica()
            pid = next(s.pid for s in remote.states() if s.replica == replica)
            killed.append(replica)
            os.kill(pid, signal.SIGKILL)

    on_step.killed = killed  # type: ignore[attr-defined]
    return on_step


def test_killed_replica_is_retried_on_the_other(remote, local: Engine) -> None:
    job = request(seed=21, steps=8, loras=(LoraSpec("glow", 0.5),))
    on_step = kill_running_replica(remote)
    result = remote.generate(job, on_step)
    assert on_step.killed and result.replica != on_step.killed[0]
    assert same(result, local.generate(job))  # the whole image, never a partial one
    wait_for_replicas(remote, 2)


def test_killed_replica_without_retry_fails_clearly(remote, local: Engine) -> None:
    from pipelines.scaleout import ReplicaLostError

    job = request(seed=22, steps=8)
    on_step = kill_running_replica(remote)
    remote.retries = 0
    try:
        with pytest.raises(ReplicaLostError, match="stopped; no image was made") as error:
            remote.generate(job, on_step)
    finally:
        remote.retries = 1
    assert error.value.status == 503
    # the front end keeps serving
    assert same(remote.generate(job), local.generate(job))
    wait_for_replicas(remote, 2)
