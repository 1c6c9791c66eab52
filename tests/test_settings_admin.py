"""Admin controls for public deployments: flags, LORASTACK_* variables, validation, and the
per-user limiter front ends call."""

from __future__ import annotations

import threading

import pytest

from pipelines.errors import BusyError
from pipelines.limits import QueueSlots, RateLimiter, UserLimits
from pipelines.schema import Bounds
from pipelines.settings import DEFAULT_MAX_UPLOAD_MB, Settings, parse_settings


def test_defaults_are_open_but_bounded() -> None:
    settings = parse_settings([], {})
    assert not settings.disable_uploads and not settings.disable_downloads
    assert not settings.allow_checkpoint_uploads and not settings.hide_paths
    assert settings.max_upload_mb == DEFAULT_MAX_UPLOAD_MB
    assert settings.max_upload_bytes == DEFAULT_MAX_UPLOAD_MB * 1024 * 1024
    assert settings.rate_limit == 0 and settings.queue_slots == 0
    assert settings.bounds == Bounds()


def test_flags() -> None:
    settings = parse_settings(
        ["--disable-uploads", "--disable-downloads", "--allow-checkpoint-uploads",
         "--max-upload-mb", "64", "--max-steps", "30", "--max-size", "1024",
         "--rate-limit", "12", "--queue-slots", "2", "--hide-paths"],
        {},
    )  # fmt: skip
    assert settings.disable_uploads and settings.disable_downloads
    assert settings.allow_checkpoint_uploads and settings.hide_paths
    assert settings.max_upload_bytes == 64 * 1024 * 1024
    assert settings.bounds.max_steps == 30 and settings.bounds.max_size == 1024
    assert settings.bounds.max_batch_size == Bounds().max_batch_size
    assert settings.rate_limit == 12 and settings.queue_slots == 2


def test_environment_and_flags_win() -> None:
    env = {
        "LORASTACK_DISABLE_UPLOADS": "true",
        "LORASTACK_ALLOW_CHECKPOINT_UPLOADS": "1",
        "LORASTACK_MAX_UPLOAD_MB": "100",
        "LORASTACK_MAX_STEPS": "40",
        "LORASTACK_MAX_SIZE": "768",
        "LORASTACK_RATE_LIMIT": "6",
        "LORASTACK_QUEUE_SLOTS": "1",
    }
    settings = parse_settings([], env)
    assert settings.disable_uploads and settings.allow_checkpoint_uploads
    assert settings.max_upload_mb == 100 and settings.rate_limit == 6 and settings.queue_slots == 1
    assert (settings.bounds.max_steps, settings.bounds.max_size) == (40, 768)
    flagged = parse_settings(["--max-steps", "20", "--rate-limit", "0"], env)
    assert flagged.bounds.max_steps == 20 and flagged.rate_limit == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--max-upload-mb", "0"],
        ["--max-steps", "0"],
        ["--max-size", "32"],
        ["--rate-limit", "-1"],
        ["--queue-slots", "-2"],
        ["--max-steps", "many"],
    ],
)
def test_bad_admin_values_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings(argv, {})


def test_bad_environment_value_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_settings([], {"LORASTACK_MAX_UPLOAD_MB": "0"})
    assert "--max-upload-mb" in capsys.readouterr().err


def test_settings_stay_frozen_and_validated() -> None:
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.rate_limit = 5  # type: ignore[misc]
    with pytest.raises(ValueError, match="--queue-slots"):
        Settings(queue_slots=-1)


# ---------------------------------------------------------------------------- limiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(6, clock=clock)  # one token every 10 s, bursts of 6
    assert [limiter.acquire("ann") for _ in range(6)] == [0.0] * 6
    assert limiter.acquire("ann") == pytest.approx(10.0)
    assert limiter.acquire("bob") == 0.0  # per user
    clock.now += 5
    assert limiter.acquire("ann") == pytest.approx(5.0)
    clock.now += 5
    assert limiter.acquire("ann") == 0.0
    clock.now += 3600  # idle: back to a full burst, never more
    assert [limiter.acquire("ann") for _ in range(7)][-2:] == [0.0, pytest.approx(10.0)]


def test_rate_limit_error_carries_retry_after() -> None:
    clock = Clock()
    limiter = RateLimiter(2, burst=1, clock=clock)
    limiter.check("ann")
    with pytest.raises(BusyError, match="at most 2 requests a minute") as caught:
        limiter.check("ann")
    assert caught.value.status == 503 and caught.value.retry_after == 30


def test_zero_means_unlimited() -> None:
    limits = UserLimits(0, 0, clock=Clock())
    for _ in range(1000):
        with limits.admit("ann"):
            pass
    assert limits.slots.in_use("ann") == 0


def test_queue_slots_per_user_and_given_back_on_error() -> None:
    slots = QueueSlots(2)
    with slots.hold("ann"), slots.hold("ann"):
        with pytest.raises(BusyError, match="at most 2 queued or running jobs"):
            slots.take("ann")
        with slots.hold("bob"):
            assert slots.in_use("bob") == 1
    with pytest.raises(RuntimeError), slots.hold("ann"):
        raise RuntimeError("generation failed")
    assert slots.in_use("ann") == 0


def test_limiter_is_thread_safe() -> None:
    clock = Clock()
    limiter = RateLimiter(50, clock=clock)
    granted: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(20):
            wait = limiter.acquire("ann")
            with lock:
                granted.append(wait)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sum(1 for wait in granted if wait == 0.0) == 50


def test_admit_counts_the_rate_then_holds_a_slot() -> None:
    limits = UserLimits(rate_limit=60, queue_slots=1, clock=Clock())
    with limits.admit("ann"):
        assert limits.slots.in_use("ann") == 1
        with pytest.raises(BusyError, match="queue limit"), limits.admit("ann"):
            pass
    assert limits.slots.in_use("ann") == 0
