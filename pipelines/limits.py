"""Per-user limits for public deployments: requests per minute and queued jobs per user.

Pure and thread-safe, with an injectable clock, so every front end (UI, API) shares one
implementation and tests never sleep. A user key is whatever identifies a user to the
front end (the logged-in name, else the client address). Refusals are BusyError (the
contract's 503 with Retry-After), so the client knows when to try again.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pipelines.errors import BusyError

Clock = Callable[[], float]
MAX_TRACKED_USERS = 10_000
"""Above this many buckets, full (idle) ones are forgotten: they carry no information."""


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per user: `per_minute` requests a minute, bursts up to `burst`.

    Args:
        per_minute: sustained requests per minute per user; 0 means unlimited.
        burst: how many requests may come at once (default: `per_minute`).
        clock: seconds, monotonic (injectable for tests).
    Example:
        >>> limiter = RateLimiter(2, clock=lambda: 0.0)
        >>> limiter.acquire("ann"), limiter.acquire("ann"), limiter.acquire("ann") > 0
        (0.0, 0.0, True)
    """

    def __init__(self, per_minute: int, *, burst: int | None = None, clock: Clock = time.monotonic):
        if per_minute < 0 or (burst is not None and burst < 1):
            raise ValueError("per_minute must be >= 0 and burst >= 1")
        self.per_minute = per_minute
        self.capacity = float(burst if burst is not None else max(per_minute, 1))
        self._rate = per_minute / 60.0  # tokens per second
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()

    def acquire(self, key: str) -> float:
        """Take one token for `key`. Returns 0.0 when allowed, else seconds until it would be."""
        if self.per_minute == 0:
            return 0.0
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= MAX_TRACKED_USERS:
                    self._forget_idle(now)
                bucket = self._buckets[key] = _Bucket(self.capacity, now)
            bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self._rate)
            bucket.updated = now
            if bucket.tokens >= 1.0:
                bucket.tokens -= 1.0
                return 0.0
            return (1.0 - bucket.tokens) / self._rate

    def check(self, key: str) -> None:
        """`acquire`, raising BusyError (with Retry-After) when the user is over the limit."""
        wait = self.acquire(key)
        if wait > 0:
            raise BusyError(
                f"rate limit: at most {self.per_minute} requests a minute per user; "
                f"try again in {math.ceil(wait)} s",
                retry_after=math.ceil(wait),
            )

    def _forget_idle(self, now: float) -> None:
        for key, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.updated) * self._rate >= self.capacity:
                del self._buckets[key]


class QueueSlots:
    """At most `per_user` queued or running jobs per user; 0 means unlimited.

    Example:
        >>> slots = QueueSlots(1)
        >>> with slots.hold("ann"):
        ...     slots.in_use("ann")
        1
    """

    def __init__(self, per_user: int) -> None:
        if per_user < 0:
            raise ValueError("per_user must be >= 0")
        self.per_user = per_user
        self._held: dict[str, int] = {}
        self._lock = threading.Lock()

    def take(self, key: str) -> None:
        """Take a slot for `key`, or raise BusyError when all of the user's slots are taken."""
        with self._lock:
            held = self._held.get(key, 0)
            if self.per_user and held >= self.per_user:
                raise BusyError(
                    f"queue limit: at most {self.per_user} queued or running jobs per user; "
                    "wait for one to finish",
                    retry_after=5,
                )
            self._held[key] = held + 1

    def give_back(self, key: str) -> None:
        """Return a slot taken with `take`."""
        with self._lock:
            held = self._held.get(key, 0) - 1
            if held > 0:
                self._held[key] = held
            else:
                self._held.pop(key, None)

    def in_use(self, key: str) -> int:
        with self._lock:
            return self._held.get(key, 0)

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        """A slot for the duration of the block (given back on error too)."""
        self.take(key)
        try:
            yield
        finally:
            self.give_back(key)


def user_key(username: str | None, address: str | None) -> str:
    """The key limits count under: the logged-in user when the front end checked a login,
    else the client address (so a made-up name cannot dodge the limits).

    Example:
        >>> user_key("ann", "10.0.0.2"), user_key(None, "10.0.0.2")
        ('user:ann', 'address:10.0.0.2')
    """
    if username:
        return f"user:{username}"
    return f"address:{address or 'unknown'}"


class UserLimits:
    """Both limits together: what a front end wraps around each generation request.

    Example:
        >>> limits = UserLimits(rate_limit=30, queue_slots=2)
        >>> with limits.admit("ann"):  # doctest: +SKIP
        ...     engine.generate(request)
    """

    def __init__(self, rate_limit: int = 0, queue_slots: int = 0, *, clock: Clock = time.monotonic):
        self.rate = RateLimiter(rate_limit, clock=clock)
        self.slots = QueueSlots(queue_slots)

    @contextmanager
    def admit(self, key: str) -> Iterator[None]:
        """Count the request against the rate, then hold a queue slot until the block ends.
        A request refused for its queue slot still counts against the rate."""
        self.rate.check(key)
        with self.slots.hold(key):
            yield
