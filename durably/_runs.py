"""The run service: triggering, waiting and the run API, apart from the instance's lifecycle.

``Durably`` is a façade over this; job handles depend on it only through
``durably._job.RunStarter``. It knows nothing of the worker: it tells the instance
that new work may be claimable, or that a run was cancelled, through two callbacks, and
asks it through a third for slots a worker serving here promises to the runs a trigger
creates (``SlotPromise``): those runs are created leased to it and start without a claim.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import msgspec

from durably import _clock, _codec, _ids, _otel
from durably._events import (
    EventBus,
    RunCancelEvent,
    RunDeleteEvent,
    RunRetryEvent,
    RunSignalEvent,
    RunTriggerEvent,
)
from durably._job import JobDefinition
from durably._models import ClaimedRun, LogEntry, NewRun, Progress, Run, RunResult, Step
from durably._storage._protocol import LeaseOffer, RunFilter, Storage
from durably._triggering import check_labels, check_text, new_runs
from durably._waiters import Outcome, Waiters, check_timeout
from durably.errors import (
    NotFoundError,
    RunCancelledError,
    RunFailedError,
    ValidationError,
)

_STATUSES = ("pending", "leased", "waiting", "completed", "failed", "cancelled")


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
        check_text(name, item)
        if allowed is not None and item not in allowed:
            raise ValidationError(f"{name} must be one of {', '.join(allowed)}, got {item!r}")
    return values


def _check_run_id(run_id: Any) -> str:
    return check_text("run_id", run_id)


_INT64_MAX = 2**63 - 1


def _check_count(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= _INT64_MAX:
        kind = "positive" if minimum > 0 else "non-negative"
        raise ValidationError(f"{name} must be a {kind} int of at most 2**63 - 1, got {value!r}")
    return value


def _cutoff(older_than: Any) -> datetime:
    """``purge_runs``' bound as an aware datetime; a timedelta counts back from now."""
    if isinstance(older_than, timedelta):
        try:
            cutoff = _clock.to_datetime(_clock.now() - older_than.total_seconds())
        except (OverflowError, ValueError, OSError):
            raise ValidationError(f"older_than={older_than!r} reaches outside the calendar") from None
        assert cutoff is not None
        return cutoff
    if isinstance(older_than, datetime):
        if older_than.tzinfo is None or older_than.utcoffset() is None:
            raise ValidationError("older_than must be a timezone-aware datetime (or a timedelta)")
        return older_than
    raise ValidationError(f"older_than must be a timedelta or datetime, got {older_than!r}")


def _first_due(runs: Iterable[Run]) -> float | None:
    """When the first delayed run just created becomes claimable (epoch s, this host's clock),
    counted from its creation on the database clock so the clocks need not agree."""
    delays = [
        (run.wake_at - run.created_at).total_seconds()
        for run in runs
        if run.disposition == "created" and run.wake_at is not None
    ]
    return _clock.now() + min(delays) if delays else None


class SlotPromise(Protocol):
    """Free slots a worker serving in this process holds for the runs of one trigger."""

    @property
    def offer(self) -> LeaseOffer: ...

    def give_back(self) -> None:
        """The trigger failed: the slots are free again."""

    async def settle(self, claimed: Sequence[ClaimedRun]) -> None:
        """Start the runs created leased to the offer; give back the other slots."""


class Runs:
    """Creates runs, waits for them, and reads and changes them on request."""

    def __init__(
        self,
        storage: Storage,
        bus: EventBus,
        definitions: Mapping[str, JobDefinition[Any, Any]],
        *,
        polling_interval: float,
        ready: Callable[[], Awaitable[None]],
        on_new_work: Callable[[float | None], None],
        on_cancelled: Callable[[str], None],
        promise_slots: Callable[[str, int], SlotPromise | None],
        otel: _otel.Otel | None = None,
    ) -> None:
        self._storage = storage
        self._bus = bus
        self._definitions = definitions
        self._ready = ready
        self._on_new_work = on_new_work
        self._on_cancelled = on_cancelled
        self._promise_slots = promise_slots
        self._otel = otel or _otel.Otel()
        self._waiters = Waiters(storage, bus, polling_interval=polling_interval)

    # --- triggering and waiting --------------------------------------------------------

    async def trigger(
        self,
        definition: JobDefinition[Any, Any],
        payloads: Sequence[Any],
        *,
        idempotency_key: str | None = None,
        concurrency_key: str | None = None,
        labels: dict[str, str] | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: int = 0,
    ) -> list[Run]:
        """Validate every payload and option, then write the runs atomically; announce the new ones."""
        rows = new_runs(
            definition,
            payloads,
            idempotency_keys=[idempotency_key] * len(payloads),
            concurrency_key=concurrency_key,
            labels=labels,
            delay=delay,
            run_at=run_at,
            priority=priority,
        )
        if not rows:
            return []
        await self._ready()
        # A delayed run is never created leased: no slot is asked for.
        promise = (
            self._promise_slots(definition.name, len(rows)) if delay is None and run_at is None else None
        )
        with self._otel.trigger(definition.name, rows):
            runs, claimed = await self._create(rows, promise)
        # run:trigger before run:start; the worker is woken only for runs it has yet to claim.
        self._announce(runs, wake=len(claimed) < len(runs))
        if promise is not None:
            await promise.settle(claimed)
        return runs

    async def _create(
        self, rows: list[NewRun], promise: SlotPromise | None
    ) -> tuple[list[Run], list[ClaimedRun]]:
        """Write ``rows``; with a promise, those with nothing ahead of them are created leased to it."""
        if promise is None:
            return await self._storage.create_runs(rows), []
        try:
            return await self._storage.create_leased_runs(rows, promise.offer)
        except BaseException:
            # Nothing to start (had the write landed, its leases expire and any worker resumes them).
            promise.give_back()
            raise

    def _announce(self, runs: Sequence[Run], *, wake: bool = True) -> None:
        for run in runs:
            if run.disposition == "created" and self._bus.wants("run:trigger"):
                self._bus.emit(
                    RunTriggerEvent, run_id=run.id, job_name=run.job_name, input=run.input, labels=run.labels
                )
        if wake and any(run.job_name in self._definitions for run in runs):
            self._on_new_work(_first_due(run for run in runs if run.job_name in self._definitions))

    async def result(
        self,
        definition: JobDefinition[Any, Any],
        run: Run,
        *,
        timeout: float | None,
        on_progress: Callable[[Progress], Any] | None,
        on_log: Callable[[LogEntry], Any] | None,
    ) -> RunResult[Any]:
        """The output of ``run`` once it completed; raises if it failed or was cancelled."""
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
        check_timeout(timeout)
        run = await self._require(run_id)
        await self._waiters.wait(run, timeout=timeout)
        return await self._require(run_id)

    def finished(self, run_id: str, status: str, output: bytes | None, error: str | None) -> None:
        """A run executed or cancelled by this process ended: wake whoever waits for it."""
        self._waiters.finished(run_id, Outcome(status, output, error))

    # --- reading ---------------------------------------------------------------------------

    async def _require(self, run_id: str) -> Run:
        _check_run_id(run_id)
        await self._ready()
        run = await self._storage.get_run(run_id)
        if run is None:
            raise NotFoundError(f"no run with id {run_id!r}")
        return run

    async def get_run(self, run_id: str) -> Run | None:
        _check_run_id(run_id)
        await self._ready()
        return await self._storage.get_run(run_id)

    async def get_runs(
        self,
        *,
        status: str | Sequence[str] | None = None,
        job_name: str | Sequence[str] | None = None,
        labels: dict[str, str] | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Run]:
        run_filter = RunFilter(
            statuses=_as_tuple("status", status, _STATUSES),
            job_names=_as_tuple("job_name", job_name),
            labels=check_labels(labels),
            limit=_check_count("limit", limit, minimum=1),
            offset=_check_count("offset", offset, minimum=0),
        )
        await self._ready()
        return await self._storage.get_runs(run_filter)

    async def get_steps(self, run_id: str) -> list[Step]:
        _check_run_id(run_id)
        await self._ready()
        return await self._storage.get_steps(run_id)

    async def get_logs(self, run_id: str) -> list[LogEntry]:
        _check_run_id(run_id)
        await self._ready()
        return await self._storage.get_logs(run_id)

    # --- changing ----------------------------------------------------------------------------

    async def retry(self, run_id: str) -> Run:
        _check_run_id(run_id)
        await self._ready()
        run = await self._storage.retry_run(run_id)
        self._bus.emit(
            RunRetryEvent, run_id=run.id, job_name=run.job_name, attempt=run.attempt, labels=run.labels
        )
        if run.job_name in self._definitions:
            self._on_new_work(None)
        return run

    async def retrigger(self, run_id: str) -> Run:
        old = await self._require(run_id)
        [run] = await self._storage.create_runs(
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
        _check_run_id(run_id)
        await self._ready()
        run, changed = await self._storage.cancel_run(run_id)
        if changed:
            self._on_cancelled(run_id)
            self._bus.emit(RunCancelEvent, run_id=run.id, job_name=run.job_name, labels=run.labels)
            self.finished(run_id, "cancelled", None, None)
        return run

    async def signal(self, run_id: str, name: str, payload: Any = None) -> None:
        """Deliver a signal: kept until a ``wait_for_signal(name)`` of the run consumes it."""
        _check_run_id(run_id)
        check_text("signal name", name, empty=False)
        data = _codec.canonical(payload, Any, what=f"the payload of signal {name!r}")
        await self._ready()
        run = await self._storage.send_signal(run_id, name, data)
        self._bus.emit(RunSignalEvent, run_id=run.id, job_name=run.job_name, name=name)
        if run.status == "waiting" and run.job_name in self._definitions:
            self._on_new_work(None)

    async def next_wake_at(self) -> datetime | None:
        """When a run of the registered jobs is next claimable (now if one is), by the database clock."""
        await self._ready()
        when = await self._storage.next_wake_at(list(self._definitions))
        return _clock.to_datetime(when)

    async def delete_run(self, run_id: str) -> None:
        _check_run_id(run_id)
        await self._ready()
        run = await self._storage.delete_run(run_id)
        self._bus.emit(RunDeleteEvent, run_id=run.id, job_name=run.job_name, labels=run.labels)

    async def purge_runs(self, older_than: timedelta | datetime, limit: int = 500) -> int:
        cutoff = _cutoff(older_than)
        _check_count("limit", limit, minimum=1)
        await self._ready()
        return await self._storage.purge_runs(completed_before=cutoff, limit=limit)
