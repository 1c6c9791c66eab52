"""Running one page session's generation: progress and previews out, Interrupt in.

The engine's `interrupt()` stops whatever job runs, whoever started it. The page must stop
only the job of the session that pressed Interrupt, so the request is recorded here by
session and acted on from inside that session's own step callback; a job still waiting
in the queue is dropped when it starts.
"""

from __future__ import annotations

import contextvars
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipelines.preview import latents_to_images
from pipelines.schema import GenerationRequest, GenerationResult

PREVIEW_EVERY = 3
"""Steps between two live previews."""


@dataclass(frozen=True)
class StepUpdate:
    """A snapshot of the running job, made in the engine's step callback."""

    fraction: float
    eta_seconds: float
    sampling_step: int
    sampling_steps: int
    job_no: int
    job_count: int
    preview: list[Image.Image] | None


class JobControl:
    """Which sessions run, wait or asked to stop; shared by every session of one page."""

    def __init__(
        self,
        engine: Any,
        preview_every: int = PREVIEW_EVERY,
        *,
        gpu_generate: Callable[[GenerationRequest], GenerationResult] | None = None,
    ) -> None:
        """`gpu_generate`: on ZeroGPU, the `spaces.GPU`-wrapped stateless engine call. It
        runs in a forked worker, so it reports no steps and Interrupt only drops queued jobs."""
        self.engine = engine
        self.preview_every = preview_every
        self.gpu_generate = gpu_generate
        self._lock = threading.Lock()
        self._running: set[str] = set()
        self._submitted: set[str] = set()
        self._stop: set[str] = set()

    def submitted(self, session: str) -> None:
        """The session pressed Generate: its job is queued (clears an old Interrupt)."""
        with self._lock:
            self._stop.discard(session)
            self._submitted.add(session)

    def interrupt(self, session: str) -> str:
        """Stop this session's running job after the current step, or drop its queued one."""
        with self._lock:
            if session in self._running or session in self._submitted:
                self._stop.add(session)
                return "Interrupting after the current step"
        return "Nothing of yours is running"

    def run(
        self, session: str, request: GenerationRequest, family: str | None
    ) -> Iterator[StepUpdate | GenerationResult | None]:
        """Run `request` for `session`; yield StepUpdates, then the result (None when the
        job was interrupted before it started). Engine errors are raised here."""
        with self._lock:
            self._submitted.discard(session)
            if session in self._stop:
                self._stop.discard(session)
                yield None
                return
            self._running.add(session)
        updates: queue.Queue[StepUpdate | tuple[str, Any]] = queue.Queue()

        def on_step(progress: Any) -> None:
            if session in self._stop:
                self.engine.interrupt()
            preview = None
            step = progress.sampling_step
            if (
                family
                and progress.latents is not None
                and (step % self.preview_every == 0 and step < progress.sampling_steps)
            ):
                preview = latents_to_images(progress.latents, family)
            updates.put(
                StepUpdate(
                    progress.fraction,
                    progress.eta_seconds,
                    step,
                    progress.sampling_steps,
                    progress.job_no,
                    progress.job_count,
                    preview,
                )
            )

        def work() -> None:
            try:
                if self.gpu_generate is not None:  # no engine lock is held here
                    updates.put(("done", self.gpu_generate(request)))
                else:
                    updates.put(("done", self.engine.generate(request, on_step=on_step)))
            except BaseException as error:  # re-raised in the page's thread below
                updates.put(("error", error))

        # The event's context goes along: `spaces.GPU` reads the visitor's request (for
        # the ZeroGPU quota) from Gradio's context variables.
        worker = threading.Thread(
            target=contextvars.copy_context().run,
            args=(work,),
            name=f"generate-{session[:8]}",
            daemon=True,
        )
        worker.start()
        try:
            while True:
                item = updates.get()
                if isinstance(item, StepUpdate):
                    yield item
                    continue
                kind, value = item
                if kind == "error":
                    raise value
                yield value
                return
        finally:
            with self._lock:
                self._running.discard(session)
                self._stop.discard(session)
