"""The exceptions durably raises; all of them derive from :class:`DurablyError`."""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "ConflictError",
    "DurablyError",
    "LeaseLostError",
    "NonRetryableError",
    "NotFoundError",
    "RunCancelledError",
    "RunFailedError",
    "StorageError",
    "ValidationError",
]


class DurablyError(Exception):
    """Base class of every error durably raises on purpose."""


class ConfigurationError(DurablyError):
    """The library was set up wrongly: a bad URL, option or job registration."""


class ValidationError(DurablyError, ValueError):
    """A payload or a job's output does not match its declared type."""


class NotFoundError(DurablyError, LookupError):
    """No run has the given id."""


class ConflictError(DurablyError):
    """The run is in a status that does not allow the operation."""


class StorageError(DurablyError):
    """The database failed or could not be reached.

    ``transient`` is true when the same operation may succeed if tried again
    (a dropped connection, a busy database); false for errors that will repeat.
    """

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class LeaseLostError(DurablyError):
    """This worker's lease on a run was taken over; it may write nothing more for it."""


class RunFailedError(DurablyError):
    """The awaited run failed; ``error`` is its stored ``"ExcType: message"``."""

    def __init__(self, run_id: str, error: str | None) -> None:
        super().__init__(f"run {run_id} failed: {error}")
        self.run_id = run_id
        self.error = error


class RunCancelledError(DurablyError):
    """The awaited run was cancelled."""

    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id} was cancelled")
        self.run_id = run_id


class NonRetryableError(DurablyError):
    """Raise it in a job or a step to fail at once, whatever the retry policy says."""
