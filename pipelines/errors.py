"""Engine errors: each carries the HTTP status the contract assigns to its case.

Front ends map these to their own surfaces (HTTP body, UI message, CLI exit code); the
engine never raises a bare exception for anything a client or a file can cause.
"""

from __future__ import annotations


class LorastackError(Exception):
    """Base of every error a user can cause; `status` is the contract's HTTP status."""

    status: int = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequestError(LorastackError):
    """Malformed value, wrong type, out of bounds, unknown sampler or scheduler."""

    status = 422


class NotFoundError(LorastackError):
    """Unknown checkpoint or LoRA name; the message lists close matches."""

    status = 404


class UnusableFileError(LorastackError):
    """A file that cannot be used: corrupt, unsafe, incompatible or ambiguous."""

    status = 400


class UnsafeCheckpointError(UnusableFileError):
    """A pickle checkpoint that needs arbitrary code to unpickle; nothing in it was run."""


class BusyError(LorastackError):
    """Queue full or model still loading; the client should retry later."""

    status = 503

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class DeviceOutOfMemoryError(LorastackError):
    """The device ran out of memory; the message suggests a smaller size or --medvram."""

    status = 507
