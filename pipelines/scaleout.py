"""Scale-out: the same Engine as N Ray Serve replicas behind one engine-shaped client.

`RemoteEngine` has the public surface the front ends use from `Engine` (generate, progress,
interrupt, skip, load_checkpoint, registries, rescan, bounds, plan), so the UI, the A1111
API and the CLI run unchanged on top of it. Each `EngineReplica` wraps a real Engine built
from the same Settings, so a request gives the same bytes wherever it runs.

Routing is LoRA-aware: merging a stack into the weights (or switching checkpoints) costs
time, so a request goes to a replica that already holds its checkpoint and stack unless
another replica has less work in flight. The choice is made by a Serve request router that
also lets the client address one replica (per-request interrupt, state, rescan).

Ray is imported only inside functions: `import pipelines.scaleout` pulls in no Ray.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from pipelines.architecture import Architecture
from pipelines.devices import DevicePlan
from pipelines.engine import (
    CPU_MAX_PIXELS,
    GPU_MAX_PIXELS,
    Progress,
    StepCallback,
    build_engine,
    combine_stacks,
)
from pipelines.errors import BusyError, LorastackError
from pipelines.lora_registry import LoraLibrary
from pipelines.prompt import extract_lora_tags, strip_comments
from pipelines.registry import CheckpointEntry, CheckpointRegistry, HashCache
from pipelines.samplers import resolve_sampler
from pipelines.schema import SEED_MAX, GenerationRequest, GenerationResult
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
        f"{spec.name.lower()}:{spec.weight:g}:{spec.text_encoder_weight:g}"
        for spec in stack
        if spec.weight or spec.text_encoder_weight
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
    """One sampling step of a remote job (latents for live previews)."""

    job_no: int
    job_count: int
    sampling_step: int
    sampling_steps: int
    latents: Any = None


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
class RemoteModel:
    """What the front ends read from `engine.model`; the pipeline stays on the replicas."""

    title: str
    name: str
    architecture: Architecture
    entry: CheckpointEntry | None
    notes: list[str] = field(default_factory=list)

    @property
    def model_hash(self) -> str | None:
        return self.entry.short_hash if self.entry else None


@dataclass(frozen=True)
class ReplicaState:
    """A replica's own report: what it holds merged and whether it is working."""

    replica: str
    pid: int
    checkpoint: str | None
    held: str
    busy: bool
    job: str
    step: int
    steps: int
    threads: int
    loras: list[str]
    checkpoints: list[str]


# ------------------------------------------------------------------- the replica


class EngineReplica:
    """A Serve deployment class: one real Engine per replica (one GPU, or a CPU share).

    Args:
        settings: the front end's settings; folders must be the same paths on every node.
    """

    def __init__(self, settings: Settings) -> None:
        from ray import serve

        # Ray starts workers with OMP_NUM_THREADS=1; the Engine sets torch's threads from
        # the settings explicitly, so images match the in-process ones bit for bit.
        self.engine = build_engine(settings)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._held = ""
        self._job = ""
        self._stop: dict[str, str] = {}
        self._stop_lock = threading.Lock()

    def describe(self) -> DevicePlan:
        return self.engine.plan

    def load_checkpoint(self, name: str | None, route: str = "", target: str = "") -> Any:
        """Load a checkpoint (warming this replica); returns what the front end shows."""
        try:
            model = self.engine.load_checkpoint(name)
        except LorastackError as error:
            return RemoteError(type(error), error.message, dict(error.__dict__))
        self._held = self._key_of_loaded("")
        return RemoteModel(model.title, model.name, model.architecture, model.entry, model.notes)

    def _key_of_loaded(self, stack: str) -> str:
        model = self.engine.model
        checkpoint = model.entry.relpath if model is not None and model.entry else ""
        return f"{checkpoint}|{stack}"

    def generate(
        self,
        job: str,
        request: GenerationRequest,
        stateless: bool = False,
        route: str = "",
        avoid: str = "",
        loads: dict[str, int] | None = None,
    ) -> Iterator[str | StepEvent | WireResult | RemoteError]:
        """Stream: this replica's id, then one StepEvent per step, then the result (or the
        error). The engine runs in a thread so events flow while it samples."""
        yield self.replica
        events: queue.Queue[Any] = queue.Queue()

        def on_step(progress: Progress) -> None:
            action = self._stop.get(job)
            if action == "interrupt":
                self.engine.interrupt()
            elif action == "skip":
                self.engine.skip()
                self._stop.pop(job, None)
            latents = progress.latents
            events.put(
                StepEvent(
                    progress.job_no,
                    progress.job_count,
                    progress.sampling_step,
                    progress.sampling_steps,
                    None if latents is None else latents.detach().cpu().clone(),
                )
            )

        def run() -> None:
            started = time.monotonic()
            try:
                self._job = job
                result = self.engine.generate(request, on_step, stateless=stateless)
                hit = self._held == route
                self._held = self._key_of_loaded("" if stateless else stack_key(request))
                events.put(WireResult.of(result, self.replica, hit, time.monotonic() - started))
            except LorastackError as error:
                events.put(RemoteError(type(error), error.message, dict(error.__dict__)))
            except Exception as error:  # anything else: reported, not swallowed
                events.put(error)
            finally:
                self._job = ""
                with self._stop_lock:
                    self._stop.pop(job, None)

        with self._stop_lock:
            if self._stop.get(job) == "interrupt":  # cancelled while queued
                self._stop.pop(job)
                yield RemoteError(BusyError, "interrupted before it started", {})
                return
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
        """Interrupt or skip `job` if this replica runs or queues it; False otherwise."""
        with self._stop_lock:
            self._stop[job] = action
        return self._job == job

    def state(self, target: str = "") -> ReplicaState:
        import torch

        progress = self.engine.progress
        return ReplicaState(
            self.replica,
            os.getpid(),
            self.engine.current_title(),
            self._held,
            self.engine.busy,
            self._job,
            progress.sampling_step,
            progress.sampling_steps,
            torch.get_num_threads(),
            sorted(entry.name for entry in self.engine.loras.entries()),
            sorted(entry.title for entry in self.engine.checkpoints.entries()),
        )

    def rescan(self, target: str = "") -> str:
        """Rescan, and hash new LoRAs before answering: every replica then writes the same
        `Lora hashes` into its infotexts from the next request on."""
        self.engine.rescan()
        self.engine.loras.hash_all()
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
    """`pipelines.scaleout.LoraAwareRouter`, built on first use (PEP 562), so Serve can
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


def connect(settings: Settings, address: str, options: ScaleOptions) -> RemoteEngine:
    """Join (or, with "local", start) a Ray cluster, deploy, and return the client engine.

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
    handle = deploy(settings, options)
    hashes = HashCache(settings.cache_dir / "hashes.json")
    checkpoints = CheckpointRegistry(settings.models_dirs, hashes)
    checkpoints.scan()
    loras = LoraLibrary(settings.loras_dirs, hashes)
    loras.scan()
    for job in (checkpoints.hash_all, loras.hash_all):
        threading.Thread(target=job, daemon=True).start()
    return RemoteEngine(settings, handle, checkpoints, loras)


# ------------------------------------------------------------------- the client


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


@dataclass
class _Job:
    progress: Progress
    replica: str = ""


class RemoteEngine:
    """Engine-shaped client of the replicas; the front ends take it in place of Engine.

    Args:
        settings: the same settings the replicas were built from.
        handle: the EngineReplica deployment handle.
        checkpoints, loras: local registries over the same (shared) folders, for listings
            and name checks without a round trip.
        retries: how often a request whose replica died is tried on another one.
    Example:
        >>> engine = connect(settings, "auto", ScaleOptions(replicas=2))
        >>> engine.generate(GenerationRequest(prompt="a cat", seed=1)).replica
        '4x9k2m1a'
    """

    def __init__(
        self,
        settings: Settings,
        handle: Any,
        checkpoints: CheckpointRegistry,
        loras: LoraLibrary,
        *,
        retries: int = 1,
    ) -> None:
        self.settings = settings
        self.handle = handle
        # One streaming handle for every generation, so they share one router (and its
        # record of what each replica holds).
        self._stream = handle.options(stream=True)
        self.checkpoints = checkpoints
        self.loras = loras
        self.retries = retries
        self.plan: DevicePlan = handle.describe.remote().result()
        default_pixels = GPU_MAX_PIXELS if self.plan.device.type == "cuda" else CPU_MAX_PIXELS
        self.bounds = replace(settings.bounds, max_pixels=settings.max_pixels or default_pixels)
        self.stats = RoutingStats()
        self._inflight: Counter[str] = Counter()  # jobs per replica, passed to the router
        self._model: RemoteModel | None = None
        self._jobs: dict[str, _Job] = {}
        self._last = Progress()
        self._lock = threading.Lock()
        self._local = threading.local()

    # ---------------------------------------------------------------- models

    @property
    def model(self) -> RemoteModel | None:
        return self._model

    def current_title(self) -> str | None:
        return self._model.title if self._model else None

    def load_checkpoint(self, name: str | None) -> RemoteModel:
        """Make `name` the default checkpoint, loading it on one replica (which checks the
        file); the others load it when a request routed to them needs it."""
        relpath = self.checkpoints.resolve(name).relpath if name else ""
        answer = self.handle.load_checkpoint.remote(name, route=f"{relpath}|").result()
        if isinstance(answer, RemoteError):
            raise answer.rebuild()
        self._model = answer
        return answer

    def _checkpoint_for(self, request: GenerationRequest) -> tuple[str | None, str]:
        """The name sent to the replica and the routing key's checkpoint part."""
        name = request.checkpoint
        if name is None and self._model is not None and self._model.entry is not None:
            name = self._model.entry.relpath
        return name, self.checkpoints.resolve(name).relpath if name else ""

    # ---------------------------------------------------------------- control

    @property
    def progress(self) -> Progress:
        """The newest running job's progress (A1111's /progress shows one job)."""
        with self._lock:
            active = [job.progress for job in self._jobs.values() if job.progress.active]
        return active[-1] if active else self._last

    def interrupt(self) -> None:
        """Called from a job's on_step: stop that job; otherwise stop every running job."""
        self._control("interrupt")

    def skip(self) -> None:
        self._control("skip")

    def _control(self, action: str) -> None:
        own = getattr(self._local, "job", None)
        with self._lock:
            jobs = {own: self._jobs[own]} if own in self._jobs else dict(self._jobs)
        for job_id, job in jobs.items():
            setattr(job.progress, "interrupted" if action == "interrupt" else "skipped", True)
            if job.replica:  # else _run forwards it once the job is placed
                self._send_control(job_id, action, job.replica)

    def _send_control(self, job_id: str, action: str, replica: str) -> None:
        import ray.exceptions

        try:
            self.handle.control.remote(job_id, action, target=replica).result(timeout_s=30)
        except (ray.exceptions.RayError, TimeoutError) as error:  # the replica is gone
            log.warning("could not %s job %s on replica %s: %s", action, job_id, replica, error)

    def current_replica(self) -> str | None:
        """From inside an on_step: the replica running this job (logs, fault drills)."""
        job = self._jobs.get(getattr(self._local, "job", None) or "")
        return job.replica if job is not None else None

    def replica_ids(self) -> list[str]:
        """The running replicas, as Serve's controller lists them."""
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        deployment = details["applications"][APP_NAME]["deployments"][DEPLOYMENT_NAME]
        return [r["replica_id"] for r in deployment["replicas"] if r["state"] == "RUNNING"]

    def states(self) -> list[ReplicaState]:
        """Each running replica's own report (checkpoint, merged stack, busy, progress)."""
        calls = [self.handle.state.remote(target=rid) for rid in self.replica_ids()]
        return [call.result() for call in calls]

    def rescan(self) -> None:
        """Refresh the local listings and every replica's (same shared folders)."""
        self.checkpoints.scan()
        self.loras.scan()
        for job in (self.checkpoints.hash_all, self.loras.hash_all):
            threading.Thread(target=job, daemon=True).start()
        calls = [self.handle.rescan.remote(target=rid) for rid in self.replica_ids()]
        for call in calls:
            call.result()

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._jobs)

    # ---------------------------------------------------------------- generation

    def generate(
        self,
        request: GenerationRequest,
        on_step: StepCallback | None = None,
        *,
        stateless: bool = False,
    ) -> GenerationResult:
        """Run `request` on the best replica (see the module docstring).

        Args:
            request: validated here first, so bad requests never leave the process.
            on_step: called with this request's own Progress after every step.
            stateless: passed on to the replica's Engine.generate.
        Returns:
            GenerationResult with `replica` set to the id of the replica that made it.
        Raises:
            LorastackError subclasses as Engine does; ReplicaLostError when the replica died
            and the retry failed too.
        """
        import ray.exceptions

        request.validated(self.bounds)
        resolve_sampler(request.sampler_name, request.scheduler)
        name, checkpoint = self._checkpoint_for(request)
        # Seed chosen here, so a retry on another replica makes the same image.
        seed = request.seed if request.seed != -1 else random.randint(0, SEED_MAX)
        sent = replace(request, checkpoint=name, seed=seed)
        route = route_key(checkpoint, sent)
        job_id = uuid.uuid4().hex
        job = _Job(Progress(job="txt2img", started=time.monotonic(), active=True))
        with self._lock:
            self._jobs[job_id] = job
        self._local.job = job_id
        avoid = ""
        try:
            for attempt in range(self.retries + 1):
                try:
                    wire = self._run(job_id, job, sent, stateless, route, avoid, on_step)
                    break
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    log.warning("replica %s died running job %s: %s", job.replica, job_id, e)
                    if attempt == self.retries or job.progress.interrupted:
                        raise ReplicaLostError(
                            f"the engine replica {job.replica or '?'} running this request "
                            "stopped; no image was made. Retry the request.",
                            retry_after=5,
                        ) from e
                    avoid = job.replica
                    self.stats.retries += 1
        finally:
            self._local.job = None
            with self._lock:
                self._jobs.pop(job_id, None)
            job.progress.active = False
            job.progress.latents = None
            self._last = job.progress
        self.stats.requests += 1
        self.stats.hits += wire.hit
        self.stats.per_replica[wire.replica] += 1
        return wire.to_result(request)

    def _run(
        self,
        job_id: str,
        job: _Job,
        request: GenerationRequest,
        stateless: bool,
        route: str,
        avoid: str,
        on_step: StepCallback | None,
    ) -> WireResult:
        """One attempt: stream events from the chosen replica until its result."""
        with self._lock:
            loads = dict(self._inflight)
        stream = self._stream.generate.remote(
            job=job_id, request=request, stateless=stateless, route=route, avoid=avoid, loads=loads
        )
        try:
            return self._follow(stream, job_id, job, on_step)
        finally:
            if job.replica:
                with self._lock:
                    self._inflight[job.replica] -= 1

    def _follow(
        self, stream: Any, job_id: str, job: _Job, on_step: StepCallback | None
    ) -> WireResult:
        """Turn the replica's events into progress, on_step calls and the result."""
        progress = job.progress
        job.replica = ""
        for event in stream:
            if isinstance(event, str):
                job.replica = event
                with self._lock:
                    self._inflight[event] += 1
                if progress.interrupted or progress.skipped:  # asked before it was placed
                    action = "interrupt" if progress.interrupted else "skip"
                    self._send_control(job_id, action, event)
            elif isinstance(event, StepEvent):
                progress.job_no = event.job_no
                progress.job_count = event.job_count
                progress.sampling_step = event.sampling_step
                progress.sampling_steps = event.sampling_steps
                progress.latents = event.latents
                if on_step is not None:
                    on_step(progress)
            elif isinstance(event, RemoteError):
                raise event.rebuild()
            else:
                return event
        raise ReplicaLostError(f"replica {job.replica} ended job {job_id} without a result")
