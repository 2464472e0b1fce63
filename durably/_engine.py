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
from typing import Any, Self, overload

import anyio
import structlog

from durably import _clock, _otel
from durably._events import EventBus, Handler
from durably._job import InputT, JobDefinition, JobHandle, Jobs, OutputT
from durably._models import LogEntry, Run, Step
from durably._runs import Runs
from durably._schedules import Scheduler
from durably._storage._protocol import Storage
from durably._worker import Promise, Worker
from durably.adapters import open_storage
from durably.errors import ConfigurationError, NotFoundError

_logger = structlog.get_logger("durably")

# The ceiling of an idle worker's polling backoff when none is given (or polling_interval,
# if longer): an idle worker then costs ~30 claims a minute instead of ~600 (Turso bills them).
DEFAULT_MAX_POLLING_INTERVAL = 2.0


def _positive(name: str, value: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigurationError(f"{name} must be a non-negative number of seconds, got {value!r}")
    return min(float(value), 1e9)  # math.inf means "as long as it takes"


async def _ended(task: asyncio.Task[None], timeout: float) -> bool:
    """Whether ``task`` ends within ``timeout``; waiting is cancellable, the task is untouched."""
    done, _ = await asyncio.wait({task}, timeout=timeout)
    return bool(done)


def _log_worker_end(task: asyncio.Task[None]) -> None:
    """The worker task's result is always checked: an error that ended it is logged."""
    if not task.cancelled() and task.exception() is not None:
        _logger.error("worker ended with an error", exc_info=task.exception())


def _ceiling(value: float | None, polling_interval: float) -> float:
    if value is None:
        return max(DEFAULT_MAX_POLLING_INTERVAL, polling_interval)
    ceiling = _positive("max_polling_interval", value)
    if ceiling < polling_interval:
        raise ConfigurationError(
            f"max_polling_interval ({value}) must be at least polling_interval ({polling_interval})"
        )
    return ceiling


def _concurrency(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"max_concurrent_runs must be an int >= 1, got {value!r}")
    return value


class Durably:
    """A durably instance: jobs, a storage, and a worker that executes runs.

    Constructing one does no I/O. ``await init()`` (or ``async with``) migrates the
    schema and starts the worker in the background. An idle worker waits
    ``polling_interval`` between claims, twice as long after each empty one, up to
    ``max_polling_interval`` (default 2 s); work known in this process wakes it at once.
    """

    def __init__(
        self,
        storage: Storage | str,
        *,
        polling_interval: float = 0.1,
        heartbeat_interval: float = 0.5,
        stale_threshold: float = 3.0,
        max_concurrent_runs: int = 1,
        max_polling_interval: float | None = None,
    ) -> None:
        if isinstance(storage, str):
            storage = open_storage(storage)
        elif not isinstance(storage, Storage):
            raise ConfigurationError(
                f"storage must be a Storage or a URL string, got {type(storage).__name__}"
            )
        self.storage: Storage = storage
        self._polling_interval = _positive("polling_interval", polling_interval)
        self._max_polling_interval = _ceiling(max_polling_interval, self._polling_interval)
        self._heartbeat_interval = _positive("heartbeat_interval", heartbeat_interval)
        self._stale_threshold = _positive("stale_threshold", stale_threshold)
        if self._heartbeat_interval >= self._stale_threshold:
            raise ConfigurationError(
                f"heartbeat_interval ({heartbeat_interval}) must be shorter than stale_threshold"
                f" ({stale_threshold}), or leases expire between renewals"
            )
        self._max_concurrent_runs = _concurrency(max_concurrent_runs)
        self._definitions: dict[str, JobDefinition[Any, Any]] = {}
        self._handles: dict[str, JobHandle[Any, Any]] = {}
        self.jobs = Jobs(self._handles)
        self._bus = EventBus()
        self.worker_id = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(4)}"
        self._worker: Worker | None = None
        self._serving: asyncio.Task[None] | None = None
        self._stopping = False
        self._otel = _otel.Otel()
        self._runs = Runs(
            self.storage,
            self._bus,
            self._definitions,
            polling_interval=self._polling_interval,
            ready=self._ready,
            on_new_work=self._wake_worker,
            on_cancelled=self._cancel_locally,
            promise_slots=self._promise_slots,
            otel=self._otel,
        )
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
            self._handles[key] = JobHandle(self._runs, definition)
        return self

    @overload
    def job(self, job: JobDefinition[InputT, OutputT], /) -> JobHandle[InputT, OutputT]: ...

    @overload
    def job(self, job: str, /) -> JobHandle[Any, Any]: ...

    def job(self, job: JobDefinition[Any, Any] | str, /) -> JobHandle[Any, Any]:
        """The handle of a registered job: by its definition, types intact, or by name.

        A name is a job name or a registered handle name; the handle of a name is
        untyped (``JobHandle[Any, Any]``), as ``durably.jobs.<name>`` is.
        """
        if isinstance(job, JobDefinition):
            for handle in self._handles.values():
                if handle.definition is job:
                    return handle
            raise NotFoundError(
                f"job definition {job.name!r} is not registered on this instance;"
                f" registered: {sorted(self._definitions)}"
            )
        if job in self.jobs:
            return self.jobs[job]
        for handle in self._handles.values():
            if handle.name == job:
                return handle
        raise NotFoundError(f"no job named {job!r} is registered; registered: {sorted(self._definitions)}")

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

    def _new_worker(self) -> Worker:
        return Worker(
            storage=self.storage,
            bus=self._bus,
            jobs=self._definitions,
            worker_id=self.worker_id,
            polling_interval=self._polling_interval,
            max_polling_interval=self._max_polling_interval,
            heartbeat_interval=self._heartbeat_interval,
            stale_threshold=self._stale_threshold,
            max_concurrent_runs=self._max_concurrent_runs,
            on_finished=self._runs.finished,
            otel=self._otel,
        )

    def _get_worker(self) -> Worker:
        if self._worker is None:
            self._worker = self._new_worker()
        return self._worker

    def start(self) -> None:
        """Start the worker in the background (call ``migrate()`` first).

        Each start gets a fresh worker, so an instance can be started again after
        ``stop()``, in the same event loop or another one, even while a worker whose
        stop was cancelled is still winding down.
        """
        if self._serving is not None and not self._serving.done() and not self._stopping:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigurationError("start() must be called from a running event loop") from None
        worker = self._worker = self._new_worker()
        self._stopping = False
        self._serving = loop.create_task(self._serve(worker), name="durably-worker")
        self._serving.add_done_callback(_log_worker_end)

    async def _serve(self, worker: Worker) -> None:
        async with anyio.create_task_group() as task_group:
            schedules = anyio.CancelScope()
            task_group.start_soon(self._serve_schedules, worker, schedules)
            await worker.serve()
            schedules.cancel()

    async def _serve_schedules(self, worker: Worker, scope: anyio.CancelScope) -> None:
        """Trigger each due tick; every host does this, the tick's idempotency key dedupes.

        The first pass runs at once, so the latest tick missed while no worker ran fires.
        """
        with scope:
            while True:
                wait: float | None = None
                if self._scheduler:
                    try:
                        await self.trigger_due_schedules()
                    except Exception as exc:  # reported; the next tick is tried all the same
                        worker.report(exc, "triggering due schedules")
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
        return await self._scheduler.trigger_due(now, self.storage.register_schedules)

    async def init(self) -> None:
        """``migrate()`` then ``start()``."""
        await self.migrate()
        self.start()

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming; let in-flight runs finish within ``timeout``, then release their leases.

        Idempotent. Returns within ``timeout`` plus one bounded storage call; if the
        caller is cancelled meanwhile, the runs are stopped at once and the worker
        winds down on its own (its leases are released, or expire).
        """
        timeout = _non_negative("timeout", timeout)
        serving, worker = self._serving, self._worker
        if serving is None or worker is None:
            return
        self._stopping = True
        worker.request_stop()
        try:
            if not await _ended(serving, timeout):
                worker.shut_down_runs()  # each releases its lease, a bounded storage call
                if not await _ended(serving, worker.storage_timeout):
                    serving.cancel()
            await self._bus.drain(timeout=worker.storage_timeout)
        except BaseException:  # the caller's cancellation: stop now, do not wait
            worker.shut_down_runs()
            serving.cancel()
            raise
        finally:
            if serving.done() and self._serving is serving:
                self._serving = None

    async def close(self) -> None:
        """Stop the worker and release the storage; idempotent."""
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
        claimed, _ = await self._get_worker().process(1)
        return claimed > 0

    async def process_until_idle(self, max_runs: int | None = None, *, deadline: float | None = None) -> int:
        """Execute runs (up to ``max_concurrent_runs`` at once) until none is claimable; how
        many reached completed, failed or waiting.

        ``deadline`` (seconds from now) bounds the call, for serverless invocations: no
        claim starts after it, and a run still executing then is stopped and its lease
        released at once, so the next invocation resumes it after its last completed step.
        """
        if max_runs is not None and (not isinstance(max_runs, int) or max_runs < 0):
            raise ConfigurationError(f"max_runs must be a non-negative int or None, got {max_runs!r}")
        until = None if deadline is None else anyio.current_time() + _positive("deadline", deadline)
        await self._ready()
        worker = self._get_worker()
        done = claimed = 0
        while max_runs is None or claimed < max_runs:
            if until is not None and anyio.current_time() >= until:
                break
            limit = (
                self._max_concurrent_runs
                if max_runs is None
                else min(self._max_concurrent_runs, max_runs - claimed)
            )
            taken, ended = await worker.process(limit, deadline=until)
            if not taken:
                break
            claimed += taken
            done += ended
        return done

    def _wake_worker(self, at: float | None = None) -> None:
        if self._worker is not None:
            self._worker.wake(at)

    def _promise_slots(self, job_name: str, count: int) -> Promise | None:
        return None if self._worker is None else self._worker.offer(job_name, count)

    def _cancel_locally(self, run_id: str) -> None:
        if self._worker is not None:
            self._worker.cancel_local(run_id)

    # --- the run API (``Runs`` does the work) ------------------------------------------------

    async def wait_for_run(self, run_id: str, timeout: float | None = None) -> Run:
        """The run once it is completed, failed or cancelled; ``TimeoutError`` after ``timeout``."""
        return await self._runs.wait_for_run(run_id, timeout)

    async def get_run(self, run_id: str) -> Run | None:
        """The run with ``run_id``, or ``None``."""
        return await self._runs.get_run(run_id)

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
        return await self._runs.get_runs(
            status=status, job_name=job_name, labels=labels, limit=limit, offset=offset
        )

    async def get_steps(self, run_id: str) -> list[Step]:
        """The persisted steps of a run, in execution order."""
        return await self._runs.get_steps(run_id)

    async def get_logs(self, run_id: str) -> list[LogEntry]:
        """The log lines a run wrote with ``step.log``, oldest first."""
        return await self._runs.get_logs(run_id)

    async def retry(self, run_id: str) -> Run:
        """Put a failed or cancelled run back to pending; it resumes after its last completed step."""
        return await self._runs.retry(run_id)

    async def retrigger(self, run_id: str) -> Run:
        """A new run of the same job with the same input, labels and concurrency key."""
        return await self._runs.retrigger(run_id)

    async def cancel(self, run_id: str) -> Run:
        """Cancel a pending, leased or waiting run (and its unfinished children); a worker
        executing it stops within a heartbeat."""
        return await self._runs.cancel(run_id)

    async def signal(self, run_id: str, name: str, payload: Any = None) -> None:
        """Deliver a signal to a run's ``step.wait_for_signal(name)``; kept until one consumes it.

        ``NotFoundError`` for an unknown run, ``ConflictError`` for an ended one.
        """
        await self._runs.signal(run_id, name, payload)

    async def next_wake_at(self) -> datetime | None:
        """The earliest moment a run of a registered job (or a schedule) is due; now if one is
        claimable; ``None`` if nothing ever becomes due by time."""
        runs = await self._runs.next_wake_at()
        now = _clock.to_datetime(_clock.now())
        assert now is not None
        until_tick = self._scheduler.seconds_until_next(now)
        tick = None if until_tick is None else now + timedelta(seconds=until_tick)
        candidates = [when for when in (runs, tick) if when is not None]
        return min(candidates) if candidates else None

    async def delete_run(self, run_id: str) -> None:
        """Delete an ended run with its steps and logs."""
        await self._runs.delete_run(run_id)

    async def purge_runs(self, older_than: timedelta | datetime, limit: int = 500) -> int:
        """Delete up to ``limit`` ended runs that ended before ``older_than``; how many."""
        return await self._runs.purge_runs(older_than, limit)


def create_durably(
    storage: Storage | str,
    *,
    polling_interval: float = 0.1,
    heartbeat_interval: float = 0.5,
    stale_threshold: float = 3.0,
    max_concurrent_runs: int = 1,
    max_polling_interval: float | None = None,
) -> Durably:
    """The same as ``Durably(...)``."""
    return Durably(
        storage,
        polling_interval=polling_interval,
        heartbeat_interval=heartbeat_interval,
        stale_threshold=stale_threshold,
        max_concurrent_runs=max_concurrent_runs,
        max_polling_interval=max_polling_interval,
    )
