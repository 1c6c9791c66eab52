"""Scale-out: the same Engine as N Ray Serve replicas behind one runner.

`RayRunner` is a `pipelines.service.Runner`: the front-end process keeps one `Service`
(listings, request checks, the job queue, per-user limits) and hands each job to a replica,
so the UI, the A1111 API and the CLI run unchanged on top of it. Each `EngineReplica` wraps
a real Engine built from the same Settings, so a request gives the same bytes wherever it
runs.

Routing is LoRA-aware: merging a stack into the weights (or switching checkpoints) costs
time, so a request goes to a replica that already holds its checkpoint and stack unless
another replica has less work in flight. The choice is made by a Serve request router that
also lets the client address one replica (per-request interrupt, state, rescan).

Ray is imported only inside functions: importing this module pulls in no Ray.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from pipelines.errors import BusyError, LorastackError
from pipelines.extras import ExtrasRequest, ExtrasResult
from pipelines.folders.loras import LoraEntry
from pipelines.generation.run import RunControl
from pipelines.interface import DeviceInfo, ModelStatus
from pipelines.lora.coverage import LoraCoverage
from pipelines.lora.weights import weight_text
from pipelines.prompt import combine_stacks, extract_lora_tags, strip_comments
from pipelines.schema import GenerationRequest, GenerationResult
from pipelines.settings import PROJECT_DIR, Settings

log = logging.getLogger(__name__)

APP_NAME = "lorastack"
DEPLOYMENT_NAME = "EngineReplica"
# Generations queue on each replica's engine lock; the slack lets state/interrupt calls in.
MAX_ONGOING_REQUESTS = 16
# Environment the replicas inherit from the front end (offline Hub, no telemetry).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "HF_HOME")


class ReplicaLostError(BusyError):
    """The replica running a request died (and the one retry failed too); nothing of the
    request is returned, so a client never sees a partial or wrong image."""


def stack_key(request: GenerationRequest) -> str:
    """The LoRA stack a request applies (UI rows + prompt tags), weight-0 entries dropped,
    as a string: equal keys mean equal merged weights."""
    _, tags = extract_lora_tags(strip_comments(request.prompt))
    stack, _ = combine_stacks(request.loras, tags)
    parts = [
        f"{spec.name.lower()}:{weight_text(spec.weight)}:{weight_text(spec.text_encoder_weight)}"
        + ("" if spec.plain else f":{spec.blocks}:{spec.hr_weight}:{spec.hr_te_weight}")
        for spec in stack
        if spec.weight or spec.text_encoder_weight  # a schedule is never 0
    ]
    return ",".join(parts)


def route_key(checkpoint: str, request: GenerationRequest) -> str:
    """What a replica must hold to run `request` without merging or loading anything."""
    return f"{checkpoint}|{stack_key(request)}"


def checkpoint_of(key: str) -> str:
    return key.split("|", 1)[0]


# ------------------------------------------------------------------- what crosses the wire


@dataclass(frozen=True)
class StepEvent:
    """Progress of a remote job: a new batch (`step` 0) or a finished step, with the live
    preview as 8-bit arrays (rendered on the replica: no tensor crosses the wire)."""

    job_no: int
    job_count: int
    step: int
    steps: int
    preview: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class WireResult:
    """A GenerationResult with images as uint8 arrays, so it pickles losslessly."""

    arrays: list[np.ndarray]
    modes: list[str]
    seeds: list[int]
    infotexts: list[str]
    request: GenerationRequest
    model_name: str
    model_hash: str | None
    interrupted: bool
    notes: list[str]
    replica: str
    hit: bool
    seconds: float
    lora_coverage: list[LoraCoverage] = field(default_factory=list)

    @classmethod
    def of(cls, result: GenerationResult, replica: str, hit: bool, seconds: float) -> WireResult:
        return cls(
            [np.asarray(image) for image in result.images],
            [image.mode for image in result.images],
            result.seeds,
            result.infotexts,
            result.request,
            result.model_name,
            result.model_hash,
            result.interrupted,
            result.notes,
            replica,
            hit,
            seconds,
            result.lora_coverage,
        )

    def to_result(self, request: GenerationRequest) -> GenerationResult:
        images = [Image.fromarray(a, mode) for a, mode in zip(self.arrays, self.modes, strict=True)]
        return GenerationResult(
            images=images,
            seeds=self.seeds,
            infotexts=self.infotexts,
            request=replace(self.request, checkpoint=request.checkpoint),
            model_name=self.model_name,
            model_hash=self.model_hash,
            interrupted=self.interrupted,
            notes=self.notes,
            replica=self.replica,
            lora_coverage=self.lora_coverage,
        )


@dataclass(frozen=True)
class RemoteError:
    """A LorastackError raised on a replica, rebuilt as the same class on the client
    (exception pickling would drop keyword-only fields such as `retry_after`)."""

    kind: type[LorastackError]
    message: str
    state: dict[str, Any]

    def rebuild(self) -> LorastackError:
        error = self.kind.__new__(self.kind)
        Exception.__init__(error, self.message)
        error.__dict__.update(self.state)
        return error


@dataclass(frozen=True)
class ReplicaState:
    """A replica's own report: what it holds merged and whether it is working."""

    replica: str
    pid: int
    checkpoint: str | None
    held: str
    busy: bool
    job: str
    threads: int
    loras: list[str]
    checkpoints: list[str]


# ------------------------------------------------------------------- the replica


class _ReplicaControl:
    """A job's run control on a replica: stop flags set by `EngineReplica.control`, and
    progress forwarded to the job's event stream."""

    def __init__(
        self, events: queue.Queue[Any], preview_every: int, preview_method: str = "Approx cheap"
    ) -> None:
        self.events = events
        self.preview_every = preview_every
        self.preview_method = preview_method
        self.interrupted = False
        self.skipped = False
        self._batch = (0, 0, 0)

    def batch(self, job_no: int, job_count: int, steps: int) -> None:
        self.skipped = False
        self._batch = (job_no, job_count, steps)
        self.events.put(StepEvent(job_no, job_count, 0, steps))

    def step(self, step: int, preview: Any = None) -> None:
        job_no, job_count, steps = self._batch
        wanted = preview is not None and self.preview_every and step % self.preview_every == 0
        arrays = tuple(np.asarray(image) for image in preview()) if wanted else ()
        self.events.put(StepEvent(job_no, job_count, step, steps, arrays))

    def batch_finished(self, result: Any) -> None:
        """Not relayed from a replica: every batch comes with the job's result."""


class EngineReplica:
    """A Serve deployment class: one real Engine per replica (one GPU, or a CPU share).

    Args:
        settings: the front end's settings; folders must be the same paths on every node.
    """

    def __init__(self, settings: Settings) -> None:
        from ray import serve

        from pipelines.engine import Engine
        from pipelines.service import build_folders
        from pipelines.settings import apply_threads

        # Ray starts workers with OMP_NUM_THREADS=1; the threads come from the settings
        # explicitly, so images match the in-process ones bit for bit.
        apply_threads(settings)
        self.folders = build_folders(settings)
        self.engine = Engine(settings, self.folders)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._held = ""
        self._job = ""
        self._controls: dict[str, _ReplicaControl] = {}
        self._early: dict[str, str] = {}  # actions for jobs not started here yet
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()  # one job at a time on this replica's pipeline

    def describe(self) -> DeviceInfo:
        return self.engine.device()

    def postprocess(self, request: ExtrasRequest, target: str = "") -> Any:
        """Extras on this replica's device; returns the result or a RemoteError."""
        try:
            with self._run_lock:
                return self.engine.postprocess(request, _ReplicaControl(queue.Queue(), 0))
        except LorastackError as error:
            return RemoteError(type(error), error.message, dict(error.__dict__))

    def load_checkpoint(self, name: str | None, route: str = "", target: str = "") -> Any:
        """Load a checkpoint (warming this replica); returns its status."""
        try:
            with self._run_lock:
                status = self.engine.load(name)
        except LorastackError as error:
            return RemoteError(type(error), error.message, dict(error.__dict__))
        self._held = f"{name or ''}|"
        return status

    def generate(
        self,
        job: str,
        request: GenerationRequest,
        route: str = "",
        avoid: str = "",
        loads: dict[str, int] | None = None,
        preview_every: int = 0,
        preview_method: str = "Approx cheap",
    ) -> Iterator[str | StepEvent | WireResult | RemoteError]:
        """Stream: this replica's id, then StepEvents, then the result (or the error).
        The engine runs in a thread so events flow while it samples."""
        yield self.replica
        events: queue.Queue[Any] = queue.Queue()
        control = _ReplicaControl(events, preview_every, preview_method)
        with self._lock:
            early = self._early.pop(job, None)
            if early == "interrupt":  # cancelled before it reached this replica
                yield RemoteError(BusyError, "interrupted before it started", {})
                return
            self._controls[job] = control

        def run() -> None:
            started = time.monotonic()
            try:
                with self._run_lock:
                    self._job = job
                    result = self.engine.generate(request, control)
                    hit = self._held == route
                    self._held = f"{request.checkpoint or ''}|{stack_key(request)}"
                events.put(WireResult.of(result, self.replica, hit, time.monotonic() - started))
            except LorastackError as error:
                events.put(RemoteError(type(error), error.message, dict(error.__dict__)))
            except Exception as error:  # anything else: reported, not swallowed
                events.put(error)
            finally:
                self._job = ""
                with self._lock:
                    self._controls.pop(job, None)

        worker = threading.Thread(target=run, name=f"job-{job}", daemon=True)
        worker.start()
        while True:
            event = events.get()
            if isinstance(event, Exception):
                raise event
            yield event
            if not isinstance(event, StepEvent):
                break
        worker.join()

    def control(self, job: str, action: str, target: str = "") -> bool:
        """Interrupt or skip `job` if this replica runs it (else remember it for when it
        arrives); True when it was running here."""
        with self._lock:
            control = self._controls.get(job)
            if control is None:
                self._early[job] = action
                return False
        if action == "interrupt":
            control.interrupted = True
        else:
            control.skipped = True
        return True

    def state(self, target: str = "") -> ReplicaState:
        import torch

        current = self.engine.loaded()
        return ReplicaState(
            self.replica,
            os.getpid(),
            current.title if current else None,
            self._held,
            self._run_lock.locked(),
            self._job,
            torch.get_num_threads(),
            sorted(entry.name for entry in self.folders.entries("lora")),
            sorted(entry.title for entry in self.folders.entries("checkpoint")),
        )

    def rescan(self, target: str = "") -> str:
        """Rescan, and hash new LoRAs before answering: every replica then writes the same
        `Lora hashes` into its infotexts from the next request on."""
        self.folders.scan()
        self.folders.hash_missing()
        return self.replica


# ------------------------------------------------------------------- routing


@functools.cache
def _router_class() -> type:
    """The Serve request router, made at run time so this module imports no Ray.

    Ranks replicas by work in flight, a replica holding the request's checkpoint and stack
    counting half a request less (and one with only the checkpoint a quarter less): a warm
    replica wins among equally loaded ones, an idle cold one beats a busy warm one.
    Calls naming a `target` replica go there (when it is gone, to any replica).
    """
    from ray.serve.request_router import RequestRouter

    class LoraAwareRouter(RequestRouter):  # type: ignore[misc]
        def initialize_state(self, lora_aware: bool = True, **kwargs: Any) -> None:
            self.lora_aware = lora_aware
            self.held: dict[str, str] = {}
            # On a tie the least recently used replica wins, so different stacks settle on
            # different replicas instead of evicting each other on one.
            self.used: dict[str, float] = {}
            # Choices not yet confirmed by on_request_routed: requests routed at the same
            # moment must see each other, or they all pick the same idle replica.
            self.tentative: dict[str, str] = {}

        async def choose_replicas(
            self, candidate_replicas: list[Any], pending_request: Any = None
        ) -> list[list[Any]]:
            kwargs = pending_request.kwargs if pending_request is not None else {}
            target = kwargs.get("target")
            if target:
                chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
                return [chosen or candidate_replicas]
            route = kwargs.get("route", "")
            avoid = kwargs.get("avoid", "")
            pool = [r for r in candidate_replicas if r.replica_id.unique_id != avoid]
            request_id = pending_request.metadata.internal_request_id if kwargs else ""
            self.tentative.pop(request_id, None)
            loads = kwargs.get("loads", {})
            ranked = sorted(
                pool or candidate_replicas,
                key=lambda r: (
                    self.score(r, route, loads),
                    self.used.get(r.replica_id.unique_id, 0.0),
                ),
            )
            if request_id and ranked:
                self.tentative[request_id] = ranked[0].replica_id.unique_id
            return [[r] for r in ranked]

        def score(self, replica: Any, route: str, loads: dict[str, int]) -> float:
            uid = replica.replica_id.unique_id
            load = loads.get(uid, 0) + sum(1 for u in self.tentative.values() if u == uid)
            held = self.held.get(uid)
            if self.lora_aware and route and held is not None:
                if held == route:
                    load -= 0.5
                elif checkpoint_of(held) == checkpoint_of(route):
                    load -= 0.25
            return load

        def on_request_routed(self, pending_request: Any, replica_id: Any, result: Any) -> None:
            request_id = pending_request.metadata.internal_request_id
            self.tentative.pop(request_id, None)
            route = pending_request.kwargs.get("route")
            if route is None:
                return
            self.held[replica_id.unique_id] = route
            self.used[replica_id.unique_id] = time.monotonic()

        def on_request_completed(self, replica_id: Any, internal_request_id: str) -> None:
            self.tentative.pop(internal_request_id, None)

        def on_replica_actor_died(self, replica_id: Any) -> None:
            super().on_replica_actor_died(replica_id)
            self.held.pop(replica_id.unique_id, None)

    LoraAwareRouter.__qualname__ = "LoraAwareRouter"  # Serve imports it by this path
    return LoraAwareRouter


def __getattr__(name: str) -> Any:
    """`deployments.ray.scaleout.LoraAwareRouter`, built on first use (PEP 562), so Serve can
    import the router by path while importing this module still pulls in no Ray."""
    if name == "LoraAwareRouter":
        return _router_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class ScaleOptions:
    """How many replicas and what each one reserves."""

    replicas: int = 1
    min_replicas: int = 0
    max_replicas: int = 0  # > 0: autoscale between min and max
    num_cpus: float = 1.0
    num_gpus: float | None = None  # None: one GPU each when the cluster has GPUs
    lora_aware: bool = True


def build_application(settings: Settings, options: ScaleOptions) -> Any:
    """The Serve application: the EngineReplica deployment with the LoRA-aware router."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_DIR), os.environ.get("PYTHONPATH", "")) if p
    )
    scale: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas > 0:
        scale = {
            "autoscaling_config": {
                "min_replicas": options.min_replicas,
                "initial_replicas": max(options.min_replicas, min(options.replicas, 1)),
                "max_replicas": options.max_replicas,
                "target_ongoing_requests": 1,
            }
        }
    deployment = serve.deployment(
        EngineReplica,
        name=DEPLOYMENT_NAME,
        max_ongoing_requests=MAX_ONGOING_REQUESTS,
        ray_actor_options={
            "num_cpus": options.num_cpus,
            "num_gpus": options.num_gpus or 0,
            "runtime_env": {"env_vars": env},
        },
        request_router_config=RequestRouterConfig(
            request_router_class=_router_class(),
            request_router_kwargs={"lora_aware": options.lora_aware},
        ),
        **scale,
    )
    return deployment.bind(settings)


def deploy(settings: Settings, options: ScaleOptions) -> Any:
    """Start Serve on the connected cluster (HTTP proxy off: the front end is the only
    client) and deploy the replicas; returns the deployment handle."""
    from ray import serve

    serve.start(proxy_location="Disabled")
    return serve.run(build_application(settings, options), name=APP_NAME, route_prefix=None)


def connect(settings: Settings, address: str, options: ScaleOptions) -> RayRunner:
    """Join (or, with "local", start) a Ray cluster, deploy, and return the runner.

    Args:
        address: "auto" (a running cluster on this node), "ray://host:10001", "host:6379",
            or "local" to start a private one.
        options: replica count, autoscaling bounds, per-replica resources.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, include_dashboard=False)
    if options.num_gpus is None:
        gpus = ray.cluster_resources().get("GPU", 0) and settings.device != "cpu"
        options = replace(options, num_gpus=1.0 if gpus else 0.0)
    return RayRunner(deploy(settings, options), workers=options.max_replicas or options.replicas)


def ray_runner(settings: Settings, folders: Any) -> RayRunner:
    """The runner factory `build_service` takes for `--ray` (the local folders stay the
    front end's; the replicas scan the same shared folders themselves)."""
    assert settings.ray is not None
    options = ScaleOptions(
        replicas=settings.replicas,
        min_replicas=settings.min_replicas,
        max_replicas=settings.max_replicas,
    )
    return connect(settings, settings.ray, options)


# ------------------------------------------------------------------- the runner


@dataclass
class RoutingStats:
    """Hit rate of LoRA-aware routing, from the replicas' own reports."""

    requests: int = 0
    hits: int = 0
    retries: int = 0
    per_replica: Counter[str] = field(default_factory=Counter)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


class RayRunner:
    """Runs the service's jobs on the replicas (a `pipelines.service.Runner`).

    Args:
        handle: the EngineReplica deployment handle.
        workers: jobs the front end sends out at once (one per replica).
        retries: how often a request whose replica died is tried on another one.
    Example:
        >>> service = build_service(settings, ray_runner)  # doctest: +SKIP
        >>> service.generate(GenerationRequest(prompt="a cat", seed=1)).replica
        '4x9k2m1a'
    """

    def __init__(self, handle: Any, *, workers: int = 1, retries: int = 1) -> None:
        self.handle = handle
        # One streaming handle for every generation, so they share one router (and its
        # record of what each replica holds).
        self._stream = handle.options(stream=True)
        self.workers = max(1, workers)
        self.retries = retries
        self.stats = RoutingStats()
        self._device: DeviceInfo = handle.describe.remote().result()
        self._inflight: Counter[str] = Counter()  # jobs per replica, passed to the router
        self._lock = threading.Lock()
        self._local = threading.local()

    def device(self) -> DeviceInfo:
        return self._device

    def load(self, name: str | None) -> ModelStatus:
        """Load `name` on one replica (which checks the file); the others load it when a
        request routed to them needs it."""
        answer = self.handle.load_checkpoint.remote(name, route=f"{name or ''}|").result()
        if isinstance(answer, RemoteError):
            raise answer.rebuild()
        status: ModelStatus = answer
        return status

    def loaded(self) -> ModelStatus | None:
        """Which model each replica holds differs; the service reports its selection."""
        return None

    def lora_coverage(
        self, entries: Sequence[LoraEntry], checkpoint: str
    ) -> list[LoraCoverage] | None:
        """Each replica holds its own models: no one loaded model to check against."""
        return None

    def rescanned(self) -> None:
        """Every replica rescans the (shared) folders too."""
        calls = [self.handle.rescan.remote(target=rid) for rid in self.replica_ids()]
        for call in calls:
            call.result()

    def current_replica(self) -> str | None:
        """From inside a progress callback: the replica running this job."""
        return getattr(self._local, "replica", None)

    def replica_ids(self) -> list[str]:
        """The running replicas, as Serve's controller lists them."""
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        deployment = details["applications"][APP_NAME]["deployments"][DEPLOYMENT_NAME]
        return [r["replica_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"]

    def states(self) -> list[ReplicaState]:
        """Each running replica's own report (checkpoint, merged stack, busy)."""
        calls = [self.handle.state.remote(target=rid) for rid in self.replica_ids()]
        return [call.result() for call in calls]

    def postprocess(self, request: ExtrasRequest, control: RunControl) -> ExtrasResult:
        """Extras on any replica (upscalers are small; no routing by what is loaded)."""
        answer = self.handle.postprocess.remote(request).result()
        if isinstance(answer, RemoteError):
            raise answer.rebuild()
        result: ExtrasResult = answer
        return result

    def generate(self, request: GenerationRequest, control: RunControl) -> GenerationResult:
        """Run `request` on the best replica (see the module docstring); a replica that
        dies is replaced by another once (the seed was fixed by the service, so the retry
        makes the same image)."""
        import ray.exceptions

        route = route_key(request.checkpoint or "", request)
        job_id = f"{id(control):x}-{time.monotonic_ns():x}"
        avoid = ""
        for attempt in range(self.retries + 1):
            try:
                wire = self._run(job_id, request, control, route, avoid)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                replica = getattr(self._local, "replica", None) or "?"
                log.warning("replica %s died running job %s: %s", replica, job_id, e)
                if attempt == self.retries or control.interrupted:
                    raise ReplicaLostError(
                        f"the engine replica {replica} running this request "
                        "stopped; no image was made. Retry the request.",
                        retry_after=5,
                    ) from e
                avoid = replica
                self.stats.retries += 1
            finally:
                self._local.replica = None
        self.stats.requests += 1
        self.stats.hits += wire.hit
        self.stats.per_replica[wire.replica] += 1
        return wire.to_result(request)

    def _run(
        self, job_id: str, request: GenerationRequest, control: RunControl, route: str, avoid: str
    ) -> WireResult:
        """One attempt: stream events from the chosen replica until its result."""
        with self._lock:
            loads = dict(self._inflight)
        every = getattr(control, "preview_every", 0)  # JobControl has it; others none
        method = getattr(control, "preview_method", "Approx cheap")
        stream = self._stream.generate.remote(
            job=job_id,
            request=request,
            route=route,
            avoid=avoid,
            loads=loads,
            preview_every=every,
            preview_method=method,
        )
        replica = ""
        sent: set[str] = set()
        try:
            for event in stream:
                if isinstance(event, str):
                    replica = self._local.replica = event
                    with self._lock:
                        self._inflight[event] += 1
                elif isinstance(event, StepEvent):
                    if event.step == 0:
                        control.batch(event.job_no, event.job_count, event.steps)
                    else:
                        images = [Image.fromarray(a) for a in event.preview]
                        control.step(event.step, (lambda shown=images: shown) if images else None)
                elif isinstance(event, RemoteError):
                    raise event.rebuild()
                else:
                    return event
                for action, wanted in (
                    ("interrupt", control.interrupted),
                    ("skip", control.skipped),
                ):
                    if wanted and replica and action not in sent:
                        sent.add(action)
                        self._send_control(job_id, action, replica)
                if not control.skipped:
                    sent.discard("skip")
            raise ReplicaLostError(f"replica {replica} ended job {job_id} without a result")
        finally:
            if replica:
                with self._lock:
                    self._inflight[replica] -= 1

    def _send_control(self, job_id: str, action: str, replica: str) -> None:
        import ray.exceptions

        try:
            self.handle.control.remote(job_id, action, target=replica).result(timeout_s=30)
        except (ray.exceptions.RayError, TimeoutError) as error:  # the replica is gone
            log.warning("could not %s job %s on replica %s: %s", action, job_id, replica, error)
