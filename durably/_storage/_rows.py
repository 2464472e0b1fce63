"""Rows as durably reads them: runs, claimed runs and what resumed runs have stored.

A column that does not decode is named in an ``UndecodableError`` (a ``StorageError``),
so one bad row fails its own run and never the rest of a claim.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec

from durably import _codec
from durably._clock import to_datetime
from durably._models import ClaimedRun, Progress, Run
from durably._storage import _queries as q
from durably._storage._driver import Row, Value
from durably.errors import StorageError

RUN_WIDTH = len(q.RUN_COLUMNS.split(","))


def as_text(value: Value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def as_int(value: Value) -> int:
    return int(value or 0)


def as_float(value: Value) -> float | None:
    return None if value is None else float(value)


def as_json(value: Value) -> Any:
    return None if value is None else _codec.decode(as_text(value))


class UndecodableError(StorageError):
    """A stored column that cannot be read back (corrupt, or edited by hand); names it and the run."""


# What reading a corrupt or hand-edited row can raise.
_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, TypeError, OverflowError, OSError)


def _column(name: str, row: Row, read: Callable[[Value], Any], value: Value) -> Any:
    try:
        return read(value)
    except _DECODE_ERRORS as exc:
        raise UndecodableError(f"column {name} of run {as_text(row[0])!r} cannot be decoded: {exc}") from exc


def _progress(value: Value) -> Progress | None:
    return None if value is None else _codec.decode_as(as_text(value), Progress)


def as_time(value: Value) -> datetime | None:
    return to_datetime(as_float(value))


def run_from_row(row: Row, disposition: str | None = None) -> Run:
    """A run from its columns; ``UndecodableError`` naming the column that does not decode."""
    return Run(
        id=as_text(row[0]),
        job_name=as_text(row[1]),
        status=as_text(row[2]),  # type: ignore[arg-type]
        input=_column("input", row, as_json, row[3]),
        output=_column("output", row, as_json, row[4]),
        error=None if row[5] is None else as_text(row[5]),
        progress=_column("progress", row, _progress, row[6]),
        labels=_column("labels", row, as_json, row[7]) or {},
        idempotency_key=None if row[8] is None else as_text(row[8]),
        concurrency_key=None if row[9] is None else as_text(row[9]),
        attempt=_column("attempt", row, as_int, row[10]) or 1,
        created_at=_column("created_at", row, as_time, row[11]),
        started_at=_column("started_at", row, as_time, row[12]),
        completed_at=_column("completed_at", row, as_time, row[13]),
        priority=_column("priority", row, as_int, row[14]),
        wake_at=_column("wake_at", row, as_time, row[15]),
        waiting_for=None if row[16] is None else as_text(row[16]),
        parent_run_id=None if row[17] is None else as_text(row[17]),
        disposition=disposition,  # type: ignore[arg-type]
    )


def claimed_run(row: Row, resumed: Resumed) -> ClaimedRun:
    """A claimed run; one whose row does not decode carries the error it is to be failed with."""
    generation = as_int(row[RUN_WIDTH])
    run_id = as_text(row[0])
    try:
        run = run_from_row(row[:RUN_WIDTH])
    except UndecodableError as exc:
        # The run is leased to this worker now: it fails, the rest of the claim goes on.
        bare = Run(
            id=run_id,
            job_name=as_text(row[1]),
            status="leased",
            input=None,
            created_at=to_datetime(0.0),  # type: ignore[arg-type]
        )
        return ClaimedRun(run=bare, lease_generation=generation, steps={}, error=str(exc))
    return ClaimedRun(
        run=run,
        lease_generation=generation,
        steps=resumed.steps.get(run_id, {}),
        log_counts=resumed.log_counts.get(run_id, {}),
        step_attempts=resumed.step_attempts.get(run_id, {}),
        error=resumed.errors.get(run_id),
        trace_context=None if row[RUN_WIDTH + 1] is None else as_text(row[RUN_WIDTH + 1]),
    )


class Resumed:
    """What resumed runs have stored: completed steps, log lines per step, decoding errors."""

    def __init__(self) -> None:
        self.steps: dict[str, dict[str, tuple[int, bytes]]] = {}
        self.log_counts: dict[str, dict[str | None, int]] = {}
        self.errors: dict[str, str] = {}
        self.step_attempts: dict[str, dict[str, int]] = {}

    def add_steps(self, rows: list[Row]) -> None:
        for run_id, name, index, output in rows:
            try:
                stored = (int(index), as_text(output).encode())  # type: ignore[arg-type]
                self.steps.setdefault(as_text(run_id), {})[as_text(name)] = stored
            except _DECODE_ERRORS as exc:
                self.errors[as_text(run_id)] = (
                    f"stored step {as_text(name)!r} of run {as_text(run_id)!r} cannot be decoded: {exc}"
                )

    def add_step_attempts(self, rows: list[Row]) -> None:
        for run_id, name, attempts in rows:
            self.step_attempts.setdefault(as_text(run_id), {})[as_text(name)] = as_int(attempts)

    def add_log_counts(self, rows: list[Row]) -> None:
        for run_id, step_name, count in rows:
            step = None if step_name is None else as_text(step_name)
            self.log_counts.setdefault(as_text(run_id), {})[step] = as_int(count)
