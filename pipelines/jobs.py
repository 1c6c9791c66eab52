"""The job service: one queue, in arrival order, for every front end.

Jobs get ids; each is run by `workers` threads (one for a local engine: a pipeline runs one
job at a time), and its progress is kept under one lock, so any front end can read a
snapshot, interrupt, skip or cancel it by id, also after the tab that started it closed.
Per-user limits are checked here (requests per minute, queued or running jobs per user),
so the page, the API and the CLI share them.

With a batch window (`--batch-requests`), the worker that takes a job also takes the queued
jobs with the same batch key (up to a capacity), waiting until the window after the first
one's submission for more to arrive, and hands them to the batch executor together; each
keeps its own record, control, progress and result, and its own per-user slot.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Any

from pipelines.errors import BusyError, LorastackError, NotFoundError
from pipelines.interface import JobInfo, ProgressCallback, ProgressSnapshot
from pipelines.limits import UserLimits

log = logging.getLogger(__name__)

FINISHED_KEPT = 200
"""Finished jobs whose result and last snapshot stay readable by id."""
DEFAULT_MAX_QUEUED = 64
"""Jobs queued or running at once, all users together; more get 503 + Retry-After."""


PreviewSource = Callable[[], list[Any]]
"""Renders the current preview images on demand (cheap, so only when someone asks)."""


class JobControl:
    """What a running job sees of its own record: report progress, read stop requests.

    Handed to the executor; every method is thread-safe and cheap.
    """

    def __init__(self, service: JobService, job: _Job) -> None:
        self._service = service
        self._job = job

    @property
    def job_id(self) -> str:
        return self._job.job_id

    @property
    def interrupted(self) -> bool:
        return self._job.interrupted

    @property
    def preview_every(self) -> int:
        """Steps between the previews the submitter asked for (0: none)."""
        return self._job.preview_every

    @property
    def skipped(self) -> bool:
        return self._job.skipped

    @property
    def preview_method(self) -> str:
        """How previews are made (A1111's `show_progress_type`), as the server is set now."""
        return self._service.preview_method

    def batch(self, job_no: int, job_count: int, steps: int) -> None:
        """A new batch starts (clears a skip of the previous one)."""
        self._service._update(
            self._job,
            job_no=job_no,
            job_count=job_count,
            sampling_step=0,
            sampling_steps=steps,
            skipped=False,
        )

    def step(self, step: int, preview: PreviewSource | None = None) -> None:
        """`step` sampling steps of the current batch are done."""
        self._service._step(self._job, step, preview)

    def batch_finished(self, result: Any) -> None:
        """One batch of the job's batch count is done: its submitter gets it now (in a
        progress snapshot's `finished`) to show and save before the job ends."""
        self._service._notify(self._job, finished=result)

    def finish(self, result: Any) -> None:
        """The job's result before the run it shares ends (a job of a batch that was
        interrupted): its submitter gets it now, and the run's later result for it is
        ignored."""
        self._service._finish_early(self._job, result)


@dataclass(frozen=True)
class Batchable:
    """A job that may share a run with queued jobs of the same `key`; `size` is its share
    of the batch's capacity (for generation: pixels x batch size)."""

    key: Hashable
    size: float


@dataclass
class _Job:
    job_id: str
    kind: str
    label: str
    user: str
    work: Any
    cost: float
    on_progress: ProgressCallback | None
    preview_every: int
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    batchable: Batchable | None = None
    submitted: float = field(default_factory=time.time)
    submitted_monotonic: float = field(default_factory=time.monotonic)
    state: str = "queued"
    started: float = 0.0
    started_monotonic: float = 0.0
    job_no: int = 0
    job_count: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    preview: PreviewSource | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    @property
    def fraction(self) -> float:
        if self.state != "running" or not self.job_count or not self.sampling_steps:
            return 0.0
        done = self.job_no * self.sampling_steps + self.sampling_step
        return min(1.0, done / (self.job_count * self.sampling_steps))

    @property
    def eta(self) -> float:
        fraction = self.fraction
        if fraction <= 0:
            return 0.0
        elapsed = time.monotonic() - self.started_monotonic
        return elapsed / fraction - elapsed


Executor = Callable[[Any, JobControl], Any]
BatchExecutor = Callable[[list[Any], list[JobControl]], list[Any]]
"""Runs several jobs' `work` together; returns one result per job, in order."""


class JobService:
    """A FIFO of jobs run by worker threads.

    Args:
        execute: runs one job's `work` with its JobControl and returns the result.
        workers: how many jobs run at once (1 for one pipeline; replicas for Ray).
        limits: per-user limits (rate and queued-or-running jobs per user).
        max_queued: jobs queued or running at once for everybody together.
        execute_batch: runs compatible jobs together (None: every job runs alone).
        batch_window: seconds after a batchable job's submission that its worker waits
            for compatible jobs (0: no batching).
        batch_capacity: the most `Batchable.size` one batch holds.
    Example:
        >>> jobs = JobService(lambda work, control: work * 2)
        >>> jobs.result(jobs.submit(21, kind="double", user="ann"))
        42
    """

    def __init__(
        self,
        execute: Executor,
        *,
        workers: int = 1,
        limits: UserLimits | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
        execute_batch: BatchExecutor | None = None,
        batch_window: float = 0.0,
        batch_capacity: float = float("inf"),
    ) -> None:
        self._execute = execute
        self._execute_batch = execute_batch if batch_window > 0 else None
        self._batch_window = batch_window
        self._batch_capacity = batch_capacity
        self._limits = limits or UserLimits()
        self._max_queued = max_queued
        self._lock = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._last: _Job | None = None
        self._seconds_per_cost: float | None = None
        self.preview_method = "Approx cheap"  # set through the service's options
        for index in range(max(1, workers)):
            threading.Thread(target=self._work, name=f"job-worker-{index}", daemon=True).start()

    # -- submitting and waiting

    def submit(
        self,
        work: Any,
        *,
        kind: str,
        user: str,
        label: str = "",
        cost: float = 1.0,
        on_progress: ProgressCallback | None = None,
        preview_every: int = 0,
        batchable: Batchable | None = None,
    ) -> str:
        """Queue `work` for `user`; returns its job id. Raises BusyError (503) when the
        user is over a limit or the queue is full. A `batchable` job may run together with
        compatible ones (when the service batches)."""
        with self._lock:
            if len(self._queue) + len(self._running) >= self._max_queued:
                raise BusyError("too many jobs are queued; retry later", retry_after=10)
        self._limits.rate.check(user)
        self._limits.slots.take(user)
        job = _Job(
            job_id=uuid.uuid4().hex[:16],
            kind=kind,
            label=label,
            user=user,
            work=work,
            cost=cost,
            on_progress=on_progress,
            preview_every=preview_every,
            batchable=batchable,
        )
        with self._lock:
            self._jobs[job.job_id] = job
            self._queue.append(job)
            self._forget_old()
            self._lock.notify()
        return job.job_id

    def result(self, job_id: str, timeout: float | None = None) -> Any:
        """Wait for the job; return its result or raise its error."""
        job = self._get(job_id)
        if not job.done.wait(timeout):
            raise BusyError(f"job {job_id} is still running", retry_after=5)
        if job.error is not None:
            raise job.error
        return job.result

    def run(self, work: Any, **submit: Any) -> Any:
        """`submit` then `result`."""
        return self.result(self.submit(work, **submit))

    # -- control

    def interrupt(self, job_id: str | None = None) -> bool:
        """Stop a running job after its current step, or take a queued one out of the
        queue (None: every running job, as A1111's `interrupt`)."""
        with self._lock:
            targets = self._targets(job_id)
            for job in targets:
                if job.state == "queued":
                    self._queue.remove(job)
                    self._finish(job, "cancelled", None, None)
                else:
                    job.interrupted = True
        for job in targets:
            self._notify(job)
        return bool(targets)

    def skip(self, job_id: str | None = None) -> bool:
        """End the current batch of a running job (None: every running job)."""
        with self._lock:
            targets = [job for job in self._targets(job_id) if job.state == "running"]
            for job in targets:
                job.skipped = True
        return bool(targets)

    def _targets(self, job_id: str | None) -> list[_Job]:
        if job_id is None:
            return list(self._running)
        job = self._jobs.get(job_id)
        return [job] if job is not None and job.state in ("queued", "running") else []

    # -- reading

    def snapshot(self, job_id: str | None = None, *, preview: bool = False) -> ProgressSnapshot:
        """A job's progress; None: the newest running job, else the last one that ran."""
        with self._lock:
            if job_id is None:
                job = self._running[-1] if self._running else self._last
            else:
                job = self._jobs.get(job_id)
            if job is None:
                return ProgressSnapshot()
            snapshot = self._snapshot(job)
            source = job.preview if preview and job.state == "running" else None
        if source is not None:
            snapshot = replace(snapshot, preview=tuple(source()))
        return snapshot

    def jobs(self, user: str | None = None) -> list[JobInfo]:
        """Running then queued jobs (of `user`, or all), in the order they run."""
        with self._lock:
            listed = [*self._running, *self._queue]
            infos = []
            for job in listed:
                if user is None or job.user == user:
                    position, wait = self._position(job)
                    infos.append(
                        JobInfo(
                            job.job_id,
                            job.kind,
                            job.state,
                            job.user,
                            job.label,
                            position,
                            wait,
                            job.submitted,
                        )
                    )
            return infos

    @property
    def busy(self) -> bool:
        with self._lock:
            return bool(self._running or self._queue)

    # -- internals

    def _get(self, job_id: str) -> _Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFoundError(f"unknown job '{job_id}'", field="job")
        return job

    def _work(self) -> None:
        while True:
            group = self._take()
            for job in group:
                self._notify(job)
            alone = len(group) == 1
            outcomes = [self._run_one(group[0])] if alone else self._run_batch(group)
            with self._lock:
                elapsed = time.monotonic() - group[0].started_monotonic
                cost = sum(job.cost for job in group)
                failed = any(isinstance(outcome, BaseException) for outcome in outcomes)
                if not failed and cost > 0 and not any(job.interrupted for job in group):
                    rate = elapsed / cost
                    old = self._seconds_per_cost
                    self._seconds_per_cost = rate if old is None else 0.7 * old + 0.3 * rate
                ended = []
                for job, outcome in zip(group, outcomes, strict=True):
                    if job.done.is_set():  # finished early (`JobControl.finish`)
                        continue
                    self._running.remove(job)
                    if isinstance(outcome, BaseException):
                        self._finish(job, "failed", None, outcome)
                    else:
                        self._finish(job, "done", outcome, None)
                    ended.append(job)
            for job in ended:
                self._notify(job)

    def _take(self) -> list[_Job]:
        """The next job and, when batching, the queued jobs that run with it (in queue
        order, within the capacity), marked running. A batchable job waits until the
        window after its submission has passed or the batch is full."""
        with self._lock:
            while True:
                while not self._queue:
                    self._lock.wait()
                head = self._queue[0]
                group = [head]
                if self._execute_batch is not None and head.batchable is not None:
                    group, full = self._compatible(head.batchable)
                    wait = head.submitted_monotonic + self._batch_window - time.monotonic()
                    if wait > 0 and not full:
                        self._lock.wait(wait)  # a new job or the window's end
                        continue  # the queue may have changed (cancelled, new jobs)
                now, clock = time.time(), time.monotonic()
                for job in group:
                    self._queue.remove(job)
                    job.state = "running"
                    job.started = now
                    job.started_monotonic = clock
                    self._running.append(job)
                return group

    def _compatible(self, batchable: Batchable) -> tuple[list[_Job], bool]:
        """Queued jobs with `batchable`'s key, in order, within the capacity (the first
        always); and whether the batch is full (another like the first would not fit).
        Called with the lock held."""
        group: list[_Job] = []
        total = 0.0
        full = False
        for job in self._queue:
            if job.batchable is None or job.batchable.key != batchable.key:
                continue
            if group and total + job.batchable.size > self._batch_capacity:
                full = True
                continue
            group.append(job)
            total += job.batchable.size
        return group, full or total + batchable.size > self._batch_capacity

    def _run_one(self, job: _Job) -> Any:
        """The job's result, or the error it raised."""
        try:
            # In the submitter's context: ZeroGPU's `spaces.GPU` reads the visitor's
            # request (for its quota) from Gradio's context variables.
            return job.context.run(self._execute, job.work, JobControl(self, job))
        except LorastackError as caught:
            return caught
        except Exception as caught:  # reported to the caller, logged once here
            log.exception("job %s (%s) failed", job.job_id, job.kind)
            return caught

    def _run_batch(self, group: list[_Job]) -> list[Any]:
        """The jobs' results (or one error for all), from one batch run."""
        assert self._execute_batch is not None
        controls = [JobControl(self, job) for job in group]
        works = [job.work for job in group]
        ids = ", ".join(job.job_id for job in group)
        try:
            results = group[0].context.run(self._execute_batch, works, controls)
        except LorastackError as caught:
            return [caught] * len(group)
        except Exception as caught:
            log.exception("batch of jobs %s failed", ids)
            return [caught] * len(group)
        if len(results) != len(group):
            error = RuntimeError(f"the batch of jobs {ids} returned {len(results)} results")
            return [error] * len(group)
        return results

    def _finish_early(self, job: _Job, result: Any) -> None:
        with self._lock:
            if job.state != "running":
                return
            self._running.remove(job)
            self._finish(job, "done", result, None)
        self._notify(job)

    def _finish(self, job: _Job, state: str, result: Any, error: BaseException | None) -> None:
        """Called with the lock held."""
        job.state = state
        job.result = result
        job.error = error
        job.preview = None
        job.work = None if state == "cancelled" else job.work
        self._limits.slots.give_back(job.user)
        if state != "cancelled":
            self._last = job
        job.done.set()

    def _forget_old(self) -> None:
        finished = [j for j in self._jobs.values() if j.done.is_set()]
        for job in finished[: max(0, len(finished) - FINISHED_KEPT)]:
            del self._jobs[job.job_id]

    def _update(self, job: _Job, **values: Any) -> None:
        with self._lock:
            for name, value in values.items():
                setattr(job, name, value)
        self._notify(job)

    def _step(self, job: _Job, step: int, preview: PreviewSource | None) -> None:
        with self._lock:
            job.sampling_step = step
            job.preview = preview
            every = job.preview_every
        wants_preview = bool(every) and step % every == 0 and step < job.sampling_steps
        self._notify(job, preview if wants_preview else None)

    def _notify(
        self, job: _Job, preview: PreviewSource | None = None, finished: Any = None
    ) -> None:
        """Tell the job's submitter (outside the lock: callbacks may be slow)."""
        if job.on_progress is None:
            return
        with self._lock:
            snapshot = self._snapshot(job)
        if preview is not None:
            snapshot = replace(snapshot, preview=tuple(preview()))
        if finished is not None:
            snapshot = replace(snapshot, finished=finished)
        try:
            job.on_progress(snapshot)
        except Exception:  # a broken callback must not stop the job
            log.exception("progress callback of job %s failed", job.job_id)

    def _snapshot(self, job: _Job) -> ProgressSnapshot:
        """Called with the lock held."""
        position, wait = self._position(job)
        return ProgressSnapshot(
            job_id=job.job_id,
            kind=job.kind,
            state=job.state,
            job_no=job.job_no,
            job_count=job.job_count,
            sampling_step=job.sampling_step,
            sampling_steps=job.sampling_steps,
            fraction=job.fraction,
            eta_seconds=job.eta,
            interrupted=job.interrupted,
            skipped=job.skipped,
            queue_position=position,
            estimated_wait=wait,
            started=job.started,
        )

    def _position(self, job: _Job) -> tuple[int | None, float | None]:
        """Queue position (0 = running) and seconds until it starts, when known."""
        if job.state == "running":
            return 0, 0.0
        if job.state != "queued":
            return None, None
        ahead = list(itertools.takewhile(lambda j: j is not job, self._queue))
        rate = self._seconds_per_cost
        wait = None
        if rate is not None:
            running = sum(max(0.0, r.eta if r.fraction else r.cost * rate) for r in self._running)
            wait = running + sum(j.cost * rate for j in ahead)
        return len(ahead) + 1, wait
