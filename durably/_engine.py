"""``Durably``: the job registry, the run API, the worker's lifecycle."""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Self

import anyio
import msgspec
import structlog

from durably import _clock, _codec, _ids
from durably._events import (
    EventBus,
    Handler,
    RunCancelEvent,
    RunDeleteEvent,
    RunRetryEvent,
    RunTriggerEvent,
)
from durably._job import JobDefinition, JobHandle, Jobs
from durably._models import LogEntry, NewRun, Progress, Run, RunResult, Step
from durably._schedules import Scheduler
from durably._storage._protocol import RunFilter, Storage
from durably._waiting import Outcome, Waiters
from durably._worker import Worker
from durably.adapters import open_storage
from durably.errors import (
    ConfigurationError,
    DurablyError,
    NotFoundError,
    RunCancelledError,
    RunFailedError,
    ValidationError,
)

_logger = structlog.get_logger("durably")
_STATUSES = ("pending", "leased", "completed", "failed", "cancelled")


def _positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _as_tuple(
    name: str, value: str | Sequence[str] | None, allowed: Sequence[str] | None = None
) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        values: tuple[Any, ...] = (value,)
    elif isinstance(value, (list, tuple, set, frozenset)):
        values = tuple(value)
    else:
        raise ValidationError(f"{name} must be a string or a list of strings, got {value!r}")
    for item in values:
        if not isinstance(item, str) or (allowed is not None and item not in allowed):
            expected = f"one of {', '.join(allowed)}" if allowed else "a string"
            raise ValidationError(f"{name} must be {expected}, got {item!r}")
    return values


def _concurrency(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"max_concurrent_runs must be an int >= 1, got {value!r}")
    return value


def _check_labels(labels: Any) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise ValidationError(f"labels must be a dict of str to str, got {labels!r}")
    return labels


def _check_key(name: str, key: Any) -> str | None:
    if key is not None and (not isinstance(key, str) or not key):
        raise ValidationError(f"{name} must be a non-empty string or None, got {key!r}")
    return key


class Durably:
    """A durably instance: jobs, a storage, and a worker that executes runs.

    Constructing one does no I/O. ``await init()`` (or ``async with``) migrates the
    schema and starts the worker in the background.
    """

    def __init__(
        self,
        storage: Storage | str,
        *,
        polling_interval: float = 0.1,
        heartbeat_interval: float = 0.5,
        stale_threshold: float = 3.0,
        max_concurrent_runs: int = 1,
    ) -> None:
        if isinstance(storage, str):
            storage = open_storage(storage)
        elif not isinstance(storage, Storage):
            raise ConfigurationError(
                f"storage must be a Storage or a URL string, got {type(storage).__name__}"
            )
        self.storage: Storage = storage
        self._polling_interval = _positive("polling_interval", polling_interval)
        self._heartbeat_interval = _positive("heartbeat_interval", heartbeat_interval)
        self._stale_threshold = _positive("stale_threshold", stale_threshold)
        if self._heartbeat_interval >= self._stale_threshold:
            raise ConfigurationError(
                f"heartbeat_interval ({heartbeat_interval}) must be shorter than stale_threshold"
                f" ({stale_threshold}), or leases expire between renewals"
            )
        self._max_concurrent_runs = _concurrency(max_concurrent_runs)
        self.jobs = Jobs()
        self._definitions: dict[str, JobDefinition[Any, Any]] = {}
        self._bus = EventBus()
        self.worker_id = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self._worker: Worker | None = None
        self._serving: asyncio.Task[None] | None = None
        self._waiters = Waiters(self.storage, self._bus, polling_interval=self._polling_interval)
        self._migrated = False
        self._scheduler = Scheduler()

    def __repr__(self) -> str:
        return f"Durably(storage={self.storage.url!r}, jobs={sorted(self._definitions)})"

    @property
    def max_concurrent_runs(self) -> int:
        """Runs this instance's worker executes at once; may be changed, even while it runs."""
        return self._max_concurrent_runs

    @max_concurrent_runs.setter
    def max_concurrent_runs(self, value: int) -> None:
        self._max_concurrent_runs = _concurrency(value)
        if self._worker is not None:
            self._worker.max_concurrent_runs = self._max_concurrent_runs

    # --- registry -------------------------------------------------------------------

    def register(self, **jobs: JobDefinition[Any, Any]) -> Self:
        """Register job definitions under handle names; returns this instance."""
        names: dict[str, JobDefinition[Any, Any]] = {}
        for key, definition in jobs.items():
            if not isinstance(definition, JobDefinition):
                raise ConfigurationError(
                    f"register({key}=...) takes a JobDefinition from define_job(),"
                    f" got {type(definition).__name__}"
                )
            existing = self._definitions.get(definition.name) or names.setdefault(definition.name, definition)
            if existing is not definition:
                raise ConfigurationError(
                    f"two different jobs are registered with the name {definition.name!r}"
                )
            if key in self.jobs and self.jobs[key].definition is not definition:
                raise ConfigurationError(f"a job is already registered as {key!r}")
        for key, definition in jobs.items():
            self._definitions[definition.name] = definition
            self.jobs._handles[key] = JobHandle(self, definition)
        return self

    def job(self, name: str) -> JobHandle[Any, Any]:
        """The handle of a job by its job name or its registered handle name."""
        if name in self.jobs:
            return self.jobs[name]
        for key in self.jobs:
            if self.jobs[key].name == name:
                return self.jobs[key]
        raise NotFoundError(f"no job named {name!r} is registered; registered: {sorted(self._definitions)}")

    def on(self, event_type: str, handler: Handler) -> Callable[[], None]:
        """Call ``handler`` (sync or async) for each event of ``event_type`` or ``"*"``."""
        return self._bus.on(event_type, handler)

    # --- lifecycle ----------------------------------------------------------------------

    async def migrate(self) -> None:
        """Create or upgrade the schema; idempotent and safe across processes."""
        await self.storage.migrate()
        self._migrated = True

    async def _ready(self) -> None:
        if not self._migrated:
            await self.migrate()

    def _get_worker(self) -> Worker:
        if self._worker is None:
            self._worker = Worker(
                storage=self.storage,
                bus=self._bus,
                jobs=self._definitions,
                worker_id=self.worker_id,
                polling_interval=self._polling_interval,
                heartbeat_interval=self._heartbeat_interval,
                stale_threshold=self._stale_threshold,
                max_concurrent_runs=self._max_concurrent_runs,
                on_finished=self._run_finished,
            )
        return self._worker

    def start(self) -> None:
        """Start the worker in the background (call ``migrate()`` first)."""
        if self._serving is not None and not self._serving.done():
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError("start() must be called from a running event loop") from None
        self._serving = loop.create_task(self._serve(), name="durably-worker")

    async def _serve(self) -> None:
        async with anyio.create_task_group() as task_group:
            schedules = anyio.CancelScope()
            task_group.start_soon(self._serve_schedules, schedules)
            await self._get_worker().serve()
            schedules.cancel()

    async def _serve_schedules(self, scope: anyio.CancelScope) -> None:
        """Trigger each due tick; every host does this, the tick's idempotency key dedupes.

        The first pass runs at once, so the latest tick missed while no worker ran fires.
        """
        with scope:
            while True:
                wait: float | None = None
                if self._scheduler:
                    try:
                        await self.trigger_due_schedules()
                    except DurablyError as exc:
                        self._get_worker().report(exc, "triggering due schedules")
                    now = _clock.to_datetime(_clock.now())
                    assert now is not None
                    wait = self._scheduler.seconds_until_next(now)
                await anyio.sleep(min(wait if wait is not None else self._polling_interval * 10, 60.0))

    def schedule(
        self,
        cron: str,
        job_handle: JobHandle[Any, Any],
        payload: Any,
        *,
        name: str | None = None,
        timezone: str = "UTC",
    ) -> None:
        """Trigger ``job_handle`` with ``payload`` on every tick of a 5-field ``cron`` expression.

        Running workers trigger each due tick exactly once across all hosts (the
        tick is the run's idempotency key). Missed ticks are not replayed, except
        the latest one.
        """
        self._scheduler.add(cron, job_handle, payload, name=name, timezone=timezone)

    async def trigger_due_schedules(self) -> int:
        """One pass over the schedules (for serverless cron endpoints); runs created."""
        await self._ready()
        now = _clock.to_datetime(_clock.now())
        assert now is not None
        return await self._scheduler.trigger_due(now)

    async def init(self) -> None:
        """``migrate()`` then ``start()``."""
        await self.migrate()
        self.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; let in-flight runs finish within ``timeout``, then release their leases."""
        serving, self._serving = self._serving, None
        if serving is None or self._worker is None:
            return
        worker = self._worker
        worker.request_stop()
        with anyio.CancelScope(shield=True):
            done, _ = await asyncio.wait({serving}, timeout=timeout)
            if not done:
                worker.shut_down_runs()
                await asyncio.wait({serving})
            await self._bus.drain()
        if not serving.cancelled() and serving.exception() is not None:
            _logger.error("worker ended with an error", exc_info=serving.exception())

    async def close(self) -> None:
        """Stop the worker and release the storage."""
        await self.stop()
        await self.storage.close()

    async def __aenter__(self) -> Self:
        await self.init()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def process_one(self) -> bool:
        """Claim and execute at most one run; whether there was one."""
        await self._ready()
        return await self._get_worker().process(1) > 0

    async def process_until_idle(self, max_runs: int | None = None) -> int:
        """Execute runs (up to ``max_concurrent_runs`` at once) until none is claimable."""
        if max_runs is not None and (not isinstance(max_runs, int) or max_runs < 0):
            raise ConfigurationError(f"max_runs must be a non-negative int or None, got {max_runs!r}")
        await self._ready()
        worker = self._get_worker()
        done = 0
        while max_runs is None or done < max_runs:
            limit = (
                self._max_concurrent_runs
                if max_runs is None
                else min(self._max_concurrent_runs, max_runs - done)
            )
            processed = await worker.process(limit)
            if not processed:
                break
            done += processed
        return done

    # --- triggering -----------------------------------------------------------------------

    async def _trigger(
        self,
        definition: JobDefinition[Any, Any],
        payloads: list[Any],
        *,
        idempotency_key: str | None = None,
        concurrency_key: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> list[Run]:
        labels = _check_labels(labels)
        new_runs = [
            NewRun(
                id=_ids.new_run_id(),
                job_name=definition.name,
                input=_codec.canonical(
                    payload, definition.input_type, what=f"input of job {definition.name!r}"
                ),
                labels=labels,
                idempotency_key=_check_key("idempotency_key", idempotency_key),
                concurrency_key=_check_key("concurrency_key", concurrency_key),
            )
            for payload in payloads
        ]
        if not new_runs:
            return []
        await self._ready()
        runs = await self.storage.create_runs(new_runs)
        self._announce(runs)
        return runs

    def _announce(self, runs: Sequence[Run]) -> None:
        for run in runs:
            if run.disposition == "created" and self._bus.wants("run:trigger"):
                self._bus.emit(
                    RunTriggerEvent, run_id=run.id, job_name=run.job_name, input=run.input, labels=run.labels
                )
        if self._worker is not None and any(run.job_name in self._definitions for run in runs):
            self._worker.wake()

    async def _await_result(
        self,
        definition: JobDefinition[Any, Any],
        run: Run,
        *,
        timeout: float | None,
        on_progress: Callable[[Progress], Any] | None,
        on_log: Callable[[LogEntry], Any] | None,
    ) -> RunResult[Any]:
        outcome = await self._waiters.wait(run, timeout=timeout, on_progress=on_progress, on_log=on_log)
        if outcome.status == "failed":
            raise RunFailedError(run.id, outcome.error)
        if outcome.status == "cancelled":
            raise RunCancelledError(run.id)
        data = outcome.output if outcome.output is not None else b"null"
        try:
            output = _codec.decode_as(data, definition.output_type)
        except msgspec.ValidationError as exc:
            raise ValidationError(
                f"output of run {run.id} does not fit {definition.output_type!r}: {exc}"
            ) from exc
        return RunResult(id=run.id, output=output, disposition=run.disposition or "created")

    async def wait_for_run(self, run_id: str, timeout: float | None = None) -> Run:
        """The run once it is completed, failed or cancelled; ``TimeoutError`` after ``timeout``."""
        run = await self._require(run_id)
        await self._waiters.wait(run, timeout=timeout)
        return await self._require(run_id)

    def _run_finished(self, run_id: str, status: str, output: bytes | None, error: str | None) -> None:
        self._waiters.finished(run_id, Outcome(status, output, error))

    # --- the run API ----------------------------------------------------------------------

    async def _require(self, run_id: str) -> Run:
        await self._ready()
        run = await self.storage.get_run(run_id)
        if run is None:
            raise NotFoundError(f"no run with id {run_id!r}")
        return run

    async def get_run(self, run_id: str) -> Run | None:
        """The run with ``run_id``, or ``None``."""
        await self._ready()
        return await self.storage.get_run(run_id)

    async def get_runs(
        self,
        *,
        status: str | Sequence[str] | None = None,
        job_name: str | Sequence[str] | None = None,
        labels: dict[str, str] | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Run]:
        """Runs newest first; every given filter must match (all labels included)."""
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValidationError(f"limit must be a positive int, got {limit!r}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValidationError(f"offset must be a non-negative int, got {offset!r}")
        run_filter = RunFilter(
            statuses=_as_tuple("status", status, _STATUSES),
            job_names=_as_tuple("job_name", job_name),
            labels=_check_labels(labels),
            limit=limit,
            offset=offset,
        )
        await self._ready()
        return await self.storage.get_runs(run_filter)

    async def get_steps(self, run_id: str) -> list[Step]:
        """The persisted steps of a run, in execution order."""
        await self._ready()
        return await self.storage.get_steps(run_id)

    async def get_logs(self, run_id: str) -> list[LogEntry]:
        """The log lines a run wrote with ``step.log``, oldest first."""
        await self._ready()
        return await self.storage.get_logs(run_id)

    async def retry(self, run_id: str) -> Run:
        """Put a failed or cancelled run back to pending; it resumes after its last completed step."""
        await self._ready()
        run = await self.storage.retry_run(run_id)
        self._bus.emit(
            RunRetryEvent, run_id=run.id, job_name=run.job_name, attempt=run.attempt, labels=run.labels
        )
        if self._worker is not None and run.job_name in self._definitions:
            self._worker.wake()
        return run

    async def retrigger(self, run_id: str) -> Run:
        """A new run of the same job with the same input, labels and concurrency key."""
        old = await self._require(run_id)
        [run] = await self.storage.create_runs(
            [
                NewRun(
                    id=_ids.new_run_id(),
                    job_name=old.job_name,
                    input=_codec.encode(old.input),
                    labels=old.labels,
                    idempotency_key=None,
                    concurrency_key=old.concurrency_key,
                )
            ]
        )
        self._announce([run])
        return run

    async def cancel(self, run_id: str) -> Run:
        """Cancel a pending or leased run; the worker executing it stops within a heartbeat."""
        await self._ready()
        run, changed = await self.storage.cancel_run(run_id)
        if changed:
            if self._worker is not None:
                self._worker.cancel_local(run_id)
            self._bus.emit(RunCancelEvent, run_id=run.id, job_name=run.job_name, labels=run.labels)
            self._run_finished(run_id, "cancelled", None, None)
        return run

    async def delete_run(self, run_id: str) -> None:
        """Delete an ended run with its steps and logs."""
        await self._ready()
        run = await self.storage.delete_run(run_id)
        self._bus.emit(RunDeleteEvent, run_id=run.id, job_name=run.job_name, labels=run.labels)

    async def purge_runs(self, older_than: timedelta | datetime, limit: int = 500) -> int:
        """Delete up to ``limit`` ended runs that ended before ``older_than``; how many."""
        if isinstance(older_than, timedelta):
            cutoff = _clock.to_datetime(_clock.now() - older_than.total_seconds())
        elif isinstance(older_than, datetime):
            if older_than.tzinfo is None:
                raise ValidationError("older_than must be a timezone-aware datetime (or a timedelta)")
            cutoff = older_than
        else:
            raise ValidationError(f"older_than must be a timedelta or datetime, got {older_than!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValidationError(f"limit must be a positive int, got {limit!r}")
        await self._ready()
        assert cutoff is not None
        return await self.storage.purge_runs(completed_before=cutoff, limit=limit)


def create_durably(
    storage: Storage | str,
    *,
    polling_interval: float = 0.1,
    heartbeat_interval: float = 0.5,
    stale_threshold: float = 3.0,
    max_concurrent_runs: int = 1,
) -> Durably:
    """The same as ``Durably(...)``."""
    return Durably(
        storage,
        polling_interval=polling_interval,
        heartbeat_interval=heartbeat_interval,
        stale_threshold=stale_threshold,
        max_concurrent_runs=max_concurrent_runs,
    )
