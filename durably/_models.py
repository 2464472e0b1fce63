"""The records durably stores and returns: runs, steps, logs, progress."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Generic, Literal, TypeAlias, TypeVar

import msgspec

__all__ = [
    "ClaimedRun",
    "Disposition",
    "Finished",
    "LogEntry",
    "LogLevel",
    "NewRun",
    "Progress",
    "Run",
    "RunResult",
    "RunStatus",
    "Step",
    "StepStatus",
]

RunStatus = Literal["pending", "leased", "waiting", "completed", "failed", "cancelled"]
StepStatus = Literal["completed", "failed"]
LogLevel = Literal["info", "warn", "error"]
Disposition = Literal["created", "idempotent"]

# Told when a run executed or cancelled here ends: (run id, status, output JSON, error).
Finished: TypeAlias = Callable[[str, str, bytes | None, str | None], None]

TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

OutputT = TypeVar("OutputT")


class Progress(msgspec.Struct, frozen=True):
    """How far a run has come, as reported by ``step.progress()``: ints stay ints (``1/3``)."""

    current: int | float
    total: int | float | None = None
    message: str | None = None


class Run(msgspec.Struct, kw_only=True):
    """One execution request of a job and everything known about it.

    ``id`` sorts by creation time. Timestamps are timezone-aware UTC datetimes
    taken from the database clock. ``disposition`` is set on the runs that
    ``trigger()`` returns: ``"created"``, or ``"idempotent"`` when an existing run
    with the same idempotency key was returned instead.
    """

    id: str
    job_name: str
    status: RunStatus
    input: Any
    output: Any = None
    error: str | None = None
    progress: Progress | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    idempotency_key: str | None = None
    concurrency_key: str | None = None
    attempt: int = 1
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    priority: int = 0
    wake_at: datetime | None = None
    waiting_for: str | None = None
    parent_run_id: str | None = None
    disposition: Disposition | None = None

    @property
    def is_terminal(self) -> bool:
        """Whether the run has ended (completed, failed or cancelled)."""
        return self.status in TERMINAL_STATUSES


class Step(msgspec.Struct, kw_only=True):
    """A persisted step of a run: its stored result, or the error that failed it."""

    name: str
    index: int
    status: StepStatus
    output: Any = None
    error: str | None = None
    started_at: datetime | None = None
    completed_at: datetime | None = None


class LogEntry(msgspec.Struct, kw_only=True):
    """A message a job wrote with ``step.log``."""

    level: LogLevel
    message: str
    data: dict[str, Any] = msgspec.field(default_factory=dict)
    step_name: str | None = None
    created_at: datetime | None = None


class RunResult(msgspec.Struct, Generic[OutputT], kw_only=True):
    """What ``trigger_and_wait()`` returns: the run id and its typed output."""

    id: str
    output: OutputT
    disposition: Disposition


class NewRun(msgspec.Struct, kw_only=True):
    """A run about to be written by ``trigger()``; ``input`` is canonical JSON."""

    id: str
    job_name: str
    input: bytes
    labels: dict[str, str]
    idempotency_key: str | None
    concurrency_key: str | None
    priority: int = 0
    # Not claimable before: ``delay`` seconds from now on the database clock, or ``run_at``
    # (epoch seconds); neither means at once.
    delay: float | None = None
    run_at: float | None = None
    parent_run_id: str | None = None
    trace_context: str | None = None


class ClaimedRun(msgspec.Struct, kw_only=True):
    """A run leased to a worker, with the fencing token and its completed steps.

    ``lease_generation`` guards every write the worker makes for the run.
    ``steps`` maps a completed step's name to ``(index, stored JSON)``;
    ``log_counts`` the number of log lines stored per step name (``None``: the
    job body), so a replayed body does not store them again. ``error``
    says what of the stored run could not be decoded: such a run is failed with it,
    never executed (its ``run`` then holds only the id and job name).
    ``trace_context`` is the W3C context (JSON) of the span that triggered it, if any.
    """

    run: Run
    lease_generation: int
    steps: dict[str, tuple[int, bytes]]
    log_counts: dict[str | None, int] = msgspec.field(default_factory=dict)
    #: Attempts made so far by steps backing off between them (SPEC §12).
    step_attempts: dict[str, int] = msgspec.field(default_factory=dict)
    error: str | None = None
    trace_context: str | None = None
