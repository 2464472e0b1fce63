"""Executes one leased run: checkpoints, fenced writes, telemetry, cancellation."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import anyio
import anyio.lowlevel
import msgspec
import structlog

from durably import _clock, _codec, _otel
from durably._events import (
    RUN_LABELLED,
    Event,
    EventBus,
    RunCancelEvent,
    RunCompleteEvent,
    RunFailEvent,
    RunRetryEvent,
    RunStartEvent,
    RunWaitEvent,
    StepCompleteEvent,
    StepFailEvent,
    StepSkipEvent,
    StepStartEvent,
    WorkerErrorEvent,
)
from durably._fencing import Fence, StopReason, describe
from durably._models import ClaimedRun, Finished, LogLevel
from durably._pipeline import CheckpointPipeline
from durably._reports import RunReports, current_step
from durably._retry import RetryPolicy, StepAttempts, next_delay
from durably._steps import StepContext, call_step_function, encode_result
from durably._storage._protocol import Lease, StepRecord, Storage, Telemetry, WaitRequest, WaitResult
from durably._telemetry import TelemetryBuffer
from durably._waits import Suspend
from durably.errors import StorageError, ValidationError

if TYPE_CHECKING:
    from durably._job import JobDefinition

T = TypeVar("T")

_logger = structlog.get_logger("durably")


# The end of a job body: (output JSON, error, failed step, the exception behind the error).
Outcome = tuple[bytes | None, str | None, str | None, Exception | None]


class Execution:
    """One worker's execution of one claimed run, fenced by its lease generation."""

    def __init__(
        self,
        claimed: ClaimedRun,
        definition: JobDefinition[Any, Any],
        *,
        storage: Storage,
        bus: EventBus,
        worker_id: str,
        lease_seconds: float,
        storage_timeout: float,
        on_finished: Finished,
        spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], object],
        on_body_done: Callable[[Execution], None],
        trace: _otel.RunTrace | None = None,
    ) -> None:
        self.run = claimed.run
        self.run_id = claimed.run.id
        self.job_name = claimed.run.job_name
        self.attempt = claimed.run.attempt
        self.lease = Lease(claimed.run.id, claimed.lease_generation)
        self._step_attempts = claimed.step_attempts
        self._stored_steps = claimed.steps
        self._undecodable = claimed.error
        self._definition = definition
        self._storage = storage
        self._bus = bus
        self._worker_id = worker_id
        self._lease_seconds = lease_seconds
        self._fence = Fence(
            storage,
            self.lease,
            lease_seconds=lease_seconds,
            storage_timeout=storage_timeout,
            report=self._report,
        )
        self._trace = trace or _otel.RunTrace()
        self._on_finished = self._trace.noting(on_finished)
        self._scope: anyio.CancelScope | None = None
        self._finishing = False
        self.stop_reason: StopReason | None = None
        self.ended: Literal["completed", "failed", "waiting"] | None = None  # what this execution stored
        self._seen_steps: set[str] = set()
        self._waiting_for: tuple[str, float | None] = ("", None)
        # When the run this execution released to wait becomes claimable (epoch s): the
        # worker's idle wait does not run past it (durably/_polling.py).
        self.wake_at: float | None = None
        self._next_index = 0
        self._step_errors: list[tuple[BaseException, str]] = []
        # Steps of a "sync" job are stored one by one, never queued: its pipeline stays empty.
        self._pipelined = definition.checkpoints == "pipelined"
        self._pipeline = CheckpointPipeline(
            write=self._save_steps, broken=self._checkpoints_failed, spawn=spawn
        )
        self._checkpoints_lost: StopReason = "lease_lost"  # why the pipeline stopped, if it did
        self._telemetry = TelemetryBuffer(
            store=self._save_telemetry,
            report=self._report,
            lease_gone=self._telemetry_refused,
            spawn=spawn,
        )
        self._on_body_done = on_body_done
        self._reports = RunReports(
            claimed, telemetry=self._telemetry, emit=self._emit, logger=lambda: self._log
        )

    @functools.cached_property
    def _log(self) -> Any:
        """The run's bound logger, made at its first line: most runs never log."""
        return _logger.bind(run_id=self.run_id, job_name=self.job_name)

    # --- lifecycle ----------------------------------------------------------------

    def stop(self, reason: StopReason) -> None:
        """Stop the running job (cancelled, lease lost, worker shutting down)."""
        if self._finishing or self.stop_reason is not None:
            return
        self.stop_reason = reason
        if self._scope is not None:
            self._scope.cancel()

    async def execute(self) -> None:
        """Run the job to its end and store the outcome, unless stopped first (traced, SPEC §14)."""
        with self._trace.span(lambda: self.stop_reason):
            await self._execute()

    async def _execute(self) -> None:
        self._emit(RunStartEvent, input=self.run.input, attempt=self.run.attempt, worker_id=self._worker_id)
        started = time.perf_counter()
        outcome: Outcome | None = None
        with anyio.CancelScope() as scope:
            self._scope = scope
            if self.stop_reason is None:
                outcome = await self._run_job()
        self._finishing = True
        self._telemetry.close()  # the outcome write below carries what is left
        self._on_body_done(self)
        with anyio.CancelScope(shield=True):
            if outcome is None or self.stop_reason is not None:
                await self._stopped()
            else:
                await self._finish(outcome, duration=time.perf_counter() - started)

    async def _run_job(self) -> Outcome | None:
        """(output JSON, None, None, None) on success; (None, error, failed step, exc) on failure;
        None when the run now waits (its state is stored already)."""
        if self._undecodable is not None:
            # A row this worker cannot read fails its run, reported; the worker goes on.
            error = ValidationError(self._undecodable)
            self._report(error, "decoding a claimed run")
            return None, describe(error), None, None  # never retried: the row stays unreadable
        try:
            payload = self._payload()
            try:
                result = await self._definition.run(StepContext(self), payload)
            finally:
                self._reports.end_replay()
            output = _codec.canonical(
                result, self._definition.output_type, what=f"output of job {self.job_name!r}"
            )
        except Suspend:
            return None
        except Exception as exc:
            return None, describe(exc), self._failed_step(exc), exc
        return output, None, None, None

    def _payload(self) -> Any:
        try:
            return msgspec.convert(self.run.input, self._definition.input_type)
        except msgspec.ValidationError as exc:
            raise ValidationError(f"stored input of job {self.job_name!r} is invalid: {exc}") from exc

    def _failed_step(self, exc: BaseException) -> str | None:
        seen: BaseException | None = exc
        while seen is not None:
            for error, step_name in self._step_errors:
                if error is seen:
                    return step_name
            seen = seen.__cause__ or seen.__context__
        return None

    async def _finish(self, outcome: Outcome, *, duration: float) -> None:
        output, error, failed_step, cause = outcome
        retry_in = None if cause is None else next_delay(self._definition.retries, cause, self.attempt)
        steps = await self._pipeline.unstored(carry=retry_in is None)
        if steps is None:
            await self._checkpoints_refused()
            return
        telemetry = self._telemetry.take()
        held: object
        try:
            if error is None:
                assert output is not None
                held = await self._fence.write(
                    lambda: self._storage.complete_run(self.lease, output, telemetry, steps=steps)
                )
            elif retry_in is not None:
                delay = retry_in
                held = await self._fence.write(
                    lambda: self._storage.retry_run_later(self.lease, error, delay, telemetry)
                )
            else:
                held = await self._fence.write(
                    lambda: self._storage.fail_run(self.lease, error, telemetry, steps=steps)
                )
        except StorageError as exc:
            # The lease will expire and another worker (or this one) resumes the run.
            self._report(exc, "storing the outcome of a run")
            if exc.transient:  # retried for a lease's length: the lease has lapsed
                self._report(self._fence.lost("storage_lost"), "run execution")
            return
        if not held:
            self.stop_reason = await self._fence.why_gone()
            await self._stopped()
            return
        self.ended = "completed" if output is not None else "failed"
        if output is not None:
            self._on_finished(self.run_id, "completed", output, None)
            if self._bus.listens(RunCompleteEvent):
                self._emit(RunCompleteEvent, output=_codec.decode(output), duration=duration)
        elif retry_in is not None:  # not an end: the run waits for its next attempt
            self.wake_at = _clock.now() + retry_in
            self._emit(RunRetryEvent, attempt=self.attempt + 1, next_attempt_at=held)
        else:
            self._on_finished(self.run_id, "failed", None, error)
            self._emit(RunFailEvent, error=error, failed_step_name=failed_step)

    async def _stopped(self) -> None:
        reason = self.stop_reason or "shutdown"
        if reason == "shutdown":
            # The queued checkpoints land before the lease is released (pipelined).
            if not await self._pipeline.drain():
                await self._checkpoints_refused()
                return
            try:
                await self._fence.bounded(self._storage.release_lease(self.lease, self._telemetry.take()))
            except StorageError as exc:
                self._report(exc, "releasing a lease on shutdown")
        elif reason in ("cancelled", "cancelled_elsewhere"):
            self._on_finished(self.run_id, "cancelled", None, None)
            if reason == "cancelled_elsewhere":
                self._emit(RunCancelEvent)
        elif reason == "waiting":
            waiting_for, wake_at = self._waiting_for
            self._emit(RunWaitEvent, waiting_for=waiting_for, wake_at=_clock.to_datetime(wake_at))
        elif reason in ("lease_lost", "finished_elsewhere", "storage_lost"):
            self._report(self._fence.lost(reason), "run execution")

    async def why_lease_gone(self) -> StopReason:
        """Why a fenced write or renewal was refused: cancelled, finished elsewhere, or taken over."""
        return await self._fence.why_gone()

    async def _drained(self) -> None:
        """Before any other fenced write: the queued checkpoints are stored (pipelined), so it
        cannot overtake them; if one was refused, the execution stops here."""
        if not await self._pipeline.drain():
            await self._lease_gone()

    async def _save_steps(self, steps: list[StepRecord]) -> bool:
        telemetry = self._telemetry.take()
        return await self._fence.write(lambda: self._storage.save_steps(self.lease, steps, telemetry))

    async def _checkpoints_failed(self, exc: Exception | None) -> None:
        """A pipelined checkpoint write failed (``exc``) or was refused (``None``): stop."""
        if exc is None:
            self._checkpoints_lost = await self._fence.why_gone()
        else:
            self._report(exc, "storing steps; the run is left to be resumed when its lease expires")
            self._checkpoints_lost = "storage_lost"
        self.stop(self._checkpoints_lost)

    async def _checkpoints_refused(self) -> None:
        """A queued checkpoint could not be stored: nothing more is written, the reason reported."""
        self.stop_reason = self._checkpoints_lost
        await self._stopped()

    async def _save_telemetry(self, telemetry: Telemetry) -> bool:
        """A flush of progress and logs; while checkpoints are queued or in flight (pipelined)
        it may not overtake them, so the next of those writes carries it instead."""
        if self._pipeline.failed:
            return False
        if self._pipeline.unacknowledged:
            self._telemetry.defer(telemetry)
            return True
        return await self._fence.write(lambda: self._storage.save_telemetry(self.lease, telemetry))

    async def _telemetry_refused(self) -> None:
        self.stop(await self._fence.why_gone())

    async def _lease_gone(self) -> None:
        """Stop this execution because a fenced write was refused."""
        self.stop(await self._fence.why_gone())
        await anyio.lowlevel.checkpoint()  # raises the cancellation just requested

    async def _store(self, operation: Callable[[], Awaitable[T]]) -> T:
        """A step's fenced write. If the database stays unreachable for a lease's length,
        the run is abandoned, not failed: its lease expires and a worker resumes it."""
        try:
            return await self._fence.write(operation)
        except StorageError as exc:
            self._report(exc, "storing a step; the run is left to be resumed when its lease expires")
            self.stop("storage_lost")
            await anyio.lowlevel.checkpoint()  # raises the cancellation just requested
            raise  # only if the step was already finishing

    def _emit(self, event_class: type[Event], **fields: Any) -> None:
        """Every event of this run goes out here, with its run id, job name and labels."""
        if not self._bus.listens(event_class):
            return
        if event_class in RUN_LABELLED:
            fields["labels"] = self.run.labels
        self._bus.emit(event_class, run_id=self.run_id, job_name=self.job_name, **fields)

    def _report(self, exc: BaseException, context: str) -> None:
        self._log.warning("worker error", context=context, error=describe(exc))
        self._bus.emit(WorkerErrorEvent, error=describe(exc), context=context, run_id=self.run_id)

    # --- steps -------------------------------------------------------------------

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        type_: Any,
        retries: RetryPolicy | None = None,
        timeout: float | None = None,
    ) -> Any:
        if not callable(fn):
            raise TypeError(f"step {name!r}: {fn!r} is not callable")
        index = await self.begin_step(name)
        stored = self._stored_steps.get(name)
        if stored is not None:
            self._emit(StepSkipEvent, step_name=name, step_index=stored[0])
            self._trace.skipped(name, stored[0])
            return self._result(stored[1], type_, name)
        self._reports.end_replay()
        if self._pipelined and not await self._pipeline.room():
            await self._lease_gone()
        attempts = StepAttempts(name, self._step_attempts.get(name, 0), retries, timeout)
        with self._trace.step(name, index):
            return await self._execute_step(
                name, index, partial(call_step_function, fn, args, kwargs), type_, attempts
            )

    async def begin_step(self, name: str) -> int:
        """Check and reserve a step name; its index. No step starts once the run is stopping."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"step name must be a non-empty string, got {name!r}")
        if name in self._seen_steps:
            raise ValueError(f"step name {name!r} is used twice in run {self.run_id}; names must be unique")
        self._seen_steps.add(name)
        index = self._next_index
        self._next_index += 1
        if self.stop_reason is not None:
            await anyio.lowlevel.checkpoint()  # raises the pending cancellation: no step starts
        return index

    def stored_step(self, name: str) -> bytes | None:
        """The stored result of a completed step (JSON), if any."""
        stored = self._stored_steps.get(name)
        return None if stored is None else stored[1]

    async def wait(self, request: WaitRequest) -> WaitResult:
        """Resolve a wait or make the run wait, in one fenced write (SPEC §12).

        When the run now waits, this execution ends quietly: ``Suspend`` unwinds the body.
        """
        self._reports.end_replay()
        await self._drained()
        telemetry = self._telemetry.take()
        result = await self._store(lambda: self._storage.wait(self.lease, request, telemetry))
        if result.state == "lost":
            await self._lease_gone()
        if result.state == "waiting":
            self.stop_reason = self.ended = "waiting"
            self._waiting_for = (request.waiting_for, result.wake_at)
            self.wake_at = result.wake_at
            raise Suspend
        return result

    async def _execute_step(
        self, name: str, index: int, call: Callable[[], Awaitable[Any]], type_: Any, attempts: StepAttempts
    ) -> Any:
        self._emit(StepStartEvent, step_name=name, step_index=index)
        started = time.perf_counter()
        record = partial(StepRecord, name=name, index=index, started_at=_clock.now())
        token = current_step.set(name)
        try:
            value = await attempts.call(
                call,
                lambda exc, delay: self._back_off(
                    record(error=describe(exc), completed_at=None, attempts=attempts.count), delay
                ),
            )
            output = encode_result(name, value, type_)
            held = await self._checkpoint(
                record(output=output, completed_at=_clock.now(), attempts=attempts.count)
            )
        except Exception as exc:
            await self._step_failed(
                record(error=describe(exc), completed_at=_clock.now(), attempts=attempts.count), exc
            )
            raise
        finally:
            current_step.reset(token)
        if not held:
            await self._lease_gone()
        result = self._result(output, type_, name)
        if self._bus.listens(StepCompleteEvent):
            self._emit(
                StepCompleteEvent,
                step_name=name,
                step_index=index,
                output=_codec.decode(output),
                duration=time.perf_counter() - started,
            )
        return result

    async def _back_off(self, failed: StepRecord, delay: float) -> None:
        """Store a failed attempt, then wait ``delay`` s: in place, or if longer than a lease,
        as a pending run with a ``wake_at`` whose slot and lease are freed meanwhile."""
        self._log.warning(
            "step attempt failed",
            step_name=failed.name,
            attempt=failed.attempts,
            error=failed.error,
            retry_in=delay,
        )
        await self._drained()
        telemetry = self._telemetry.take()
        if delay <= self._lease_seconds:
            if not await self._store(lambda: self._storage.save_step(self.lease, failed, telemetry)):
                await self._lease_gone()
            await anyio.sleep(delay)
            return
        wake_at = await self._store(lambda: self._storage.postpone_run(self.lease, failed, delay, telemetry))
        if wake_at is None:
            await self._lease_gone()
        self.wake_at = _clock.now() + delay
        self.stop("postponed")
        await anyio.lowlevel.checkpoint()  # raises the cancellation just requested

    async def _step_failed(self, record: StepRecord, exc: Exception) -> None:
        self._step_errors.append((exc, record.name))
        if not await self._checkpoint(record):
            await self._lease_gone()
        self._emit(StepFailEvent, step_name=record.name, step_index=record.index, error=record.error)

    async def _checkpoint(self, step: StepRecord) -> bool:
        """Store a finished step: acknowledged before the body goes on, or queued (pipelined)."""
        if self._pipelined:
            return self._pipeline.add(step)
        telemetry = self._telemetry.take()
        return await self._store(lambda: self._storage.save_step(self.lease, step, telemetry))

    @staticmethod
    def _result(data: bytes, type_: Any, name: str) -> Any:
        try:
            return _codec.decode(data) if type_ is None else _codec.decode_as(data, type_)
        except msgspec.DecodeError as exc:  # a corrupt stored result, or one that does not fit
            expected = "JSON" if type_ is None else repr(type_)
            message = f"stored result of step {name!r} does not decode as {expected}: {exc}"
            raise ValidationError(message) from exc

    # --- progress and logs (durably/_reports.py) -------------------------------------

    def progress(self, current: float, total: float | None, message: str | None) -> None:
        self._reports.progress(current, total, message)

    def log(self, level: LogLevel, message: str, data: dict[str, Any]) -> None:
        self._reports.log(level, message, data)
