"""A ZeroGPU stand-in for tests, modelled on `spaces.zero.wrappers` (spaces 0.51.3).

What it keeps of the real thing: the decorated function runs in a worker made with
`multiprocessing.get_context("fork")`; arguments go in and the result comes back through
queues, so both must pickle; a worker is kept and reused for the next call when the
scheduler says the GPU stayed idle (`reuse`), so it holds the memory of its fork, not of
the main process now; inside the worker a decorated function calls straight through
(`forked`); a dynamic `duration` is called with the call's arguments before the fork; a
call that outlives its duration is killed (on ZeroGPU the scheduler kills the process and
the wrapper raises "GPU task aborted"), and an exception in the worker comes back as an
error naming its class. What it leaves out: the scheduler's queue and quotas, CUDA, and
the tensor packing (`spaces.zero.torch`), since tests run on the CPU.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import signal
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

CONTEXT = multiprocessing.get_context("fork")
forked = False  # True in a worker, as `spaces.zero.wrappers.forked`


class GpuTaskAborted(RuntimeError):
    """The worker died or outlived its duration ("ZeroGPU worker error: GPU task aborted")."""


class GpuWorkerError(RuntimeError):
    """The task raised in the worker; like `spaces`, only the class name comes back."""


@dataclass
class _Worker:
    process: Any
    args: Any
    results: Any


def _serve(task: Callable[..., Any], args: Any, results: Any) -> None:
    """The worker's loop (spaces' `thread_wrapper`): take arguments, run, put the result."""
    global forked
    forked = True
    while True:
        call_args, call_kwargs = args.get()
        try:
            results.put(("ok", task(*call_args, **call_kwargs)))
        except Exception as error:  # sent back by class name, as spaces does
            results.put(("error", type(error).__name__, traceback.format_exc()))


@dataclass
class ZeroGpuStandIn:
    """`GPU(duration=...)` like `spaces.GPU`; records what each call asked for.

    Attributes:
        reuse: keep the worker for the next call (the scheduler reported the GPU idle).
        durations: the seconds each call requested, in order.
        pids: the worker process of each call.
    """

    reuse: bool = False
    durations: list[float] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    _workers: dict[int, _Worker] = field(default_factory=dict)

    def GPU(  # noqa: N802 - the name of the decorator it stands in for
        self, task: Callable[..., Any] | None = None, *, duration: Any = 60
    ) -> Any:
        if task is None:
            return lambda function: self._wrap(function, duration)
        return self._wrap(task, duration)

    def _wrap(self, task: Callable[..., Any], duration: Any) -> Callable[..., Any]:
        @wraps(task)
        def handler(*args: Any, **kwargs: Any) -> Any:
            if forked:
                return task(*args, **kwargs)
            seconds = float(duration(*args, **kwargs) if callable(duration) else duration)
            self.durations.append(seconds)
            worker = self._workers.pop(id(task), None)
            if worker is None or not self.reuse or not worker.process.is_alive():
                worker = self._start(task)
            self.pids.append(worker.process.pid)
            worker.args.put((args, kwargs))
            try:
                outcome = worker.results.get(timeout=seconds)
            except queue.Empty:
                self._kill(worker)
                raise GpuTaskAborted(
                    f"GPU task aborted: it ran past its requested {seconds:g} s"
                ) from None
            if outcome[0] == "error":
                self._kill(worker)
                raise GpuWorkerError(f"ZeroGPU worker error: {outcome[1]}\n{outcome[2]}")
            if self.reuse:
                self._workers[id(task)] = worker
            else:
                self._kill(worker)
            return outcome[1]

        return handler

    @staticmethod
    def _start(task: Callable[..., Any]) -> _Worker:
        args, results = CONTEXT.SimpleQueue(), CONTEXT.Queue()
        process = CONTEXT.Process(target=_serve, args=(task, args, results), daemon=True)
        process.start()
        return _Worker(process, args, results)

    @staticmethod
    def _kill(worker: _Worker) -> None:
        if worker.process.is_alive() and worker.process.pid is not None:
            os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.join(timeout=10)

    def close(self) -> None:
        """Stop kept workers."""
        for worker in self._workers.values():
            self._kill(worker)
        self._workers.clear()
