"""durably: durable jobs on SQLite and libSQL/Turso.

A job is an async function made of steps; each ``step.run()`` is a checkpoint
stored in the database, so a run interrupted by a crash resumes after its last
completed step on whichever worker claims it next.
"""

from __future__ import annotations

from durably._engine import Durably, create_durably
from durably._job import JobDefinition, JobHandle, define_job
from durably._models import LogEntry, Progress, Run, RunResult, Step
from durably._retry import RetryPolicy
from durably._steps import StepContext
from durably._storage._protocol import Storage
from durably.adapters import open_storage
from durably.errors import (
    ConfigurationError,
    ConflictError,
    DurablyError,
    LeaseLostError,
    NonRetryableError,
    NotFoundError,
    RunCancelledError,
    RunFailedError,
    StorageError,
    ValidationError,
)

__all__ = [
    "ConfigurationError",
    "ConflictError",
    "Durably",
    "DurablyError",
    "JobDefinition",
    "JobHandle",
    "LeaseLostError",
    "LogEntry",
    "NonRetryableError",
    "NotFoundError",
    "Progress",
    "RetryPolicy",
    "Run",
    "RunCancelledError",
    "RunFailedError",
    "RunResult",
    "Step",
    "StepContext",
    "Storage",
    "StorageError",
    "ValidationError",
    "create_durably",
    "define_job",
    "open_storage",
]
