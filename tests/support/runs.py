"""Runs written straight through a ``Storage``, for the tests of the storage layer."""

from __future__ import annotations

from typing import Any

from durably._ids import new_run_id
from durably._models import NewRun


def new_run(job_name: str = "job", **fields: Any) -> NewRun:
    """A new run of ``job_name``: a fresh id, input ``{}``, no labels or keys, unless given."""
    defaults: dict[str, Any] = {
        "input": b"{}",
        "labels": {},
        "idempotency_key": None,
        "concurrency_key": None,
    }
    return NewRun(id=new_run_id(), job_name=job_name, **(defaults | fields))
