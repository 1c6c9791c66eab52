"""While a page job waits for its turn: its place in the one queue and the expected wait,
shown in the progress text as the Extras tab shows its place.

The job queue tells a job's submitter about steps, not about the queue moving, so a job
that hears nothing for a while asks the service where it stands."""

from __future__ import annotations

import queue
from collections.abc import Callable

from pipelines.interface import ProgressSnapshot

POLL_SECONDS = 1.0
FINAL_STATES = ("done", "failed", "cancelled")
"""A job in one of these states has ended: its result (or error) is ready."""


def next_snapshot(
    updates: queue.Queue[ProgressSnapshot],
    job: str,
    progress: Callable[[str], ProgressSnapshot],
    timeout: float = POLL_SECONDS,
) -> ProgressSnapshot:
    """The job's next update, or its state now (`progress`, the service's) when none
    came within `timeout` seconds."""
    try:
        return updates.get(timeout=timeout)
    except queue.Empty:
        return progress(job)


def waiting_text(snapshot: ProgressSnapshot) -> str:
    """`waiting in the queue, position 2, about 40s` (the wait once the service can tell).

    Example:
        >>> from pipelines.interface import ProgressSnapshot
        >>> waiting_text(ProgressSnapshot(state="queued", queue_position=1))
        'waiting in the queue, position 1'
    """
    wait = snapshot.estimated_wait
    about = f", about {wait:.0f}s" if wait is not None else ""
    return f"waiting in the queue, position {snapshot.queue_position}{about}"
