"""The worker: claims runs, executes up to ``max_concurrent_runs``, renews leases, stops gracefully."""

from __future__ import annotations

import asyncio
import math
import random
import secrets
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import structlog

from durably import _clock, _otel
from durably._events import EventBus, WorkerErrorEvent
from durably._fencing import bounded, describe
from durably._models import ClaimedRun, Finished
from durably._polling import IdlePolling
from durably._runtime import Execution
from durably._storage._protocol import Claim, Lease, LeaseOffer, Storage, Telemetry
from durably.errors import StorageError

if TYPE_CHECKING:
    from durably._job import JobDefinition

_logger = structlog.get_logger("durably")

# Claims one worker may have in flight at once (_claim_alongside).
_CLAIMS_IN_FLIGHT = 2


class _Backoff:
    """Exponential backoff with full jitter, for a database that is down."""

    def __init__(self, first: float = 0.1, cap: float = 5.0) -> None:
        self._first = first
        self._cap = cap
        self._next = first

    def reset(self) -> None:
        self._next = self._first

    def delay(self) -> float:
        delay = self._next * (0.5 + random.random() / 2)
        self._next = min(self._next * 2, self._cap)
        return delay


class Promise:
    """Slots a serving worker holds for the runs a trigger in its process is creating;
    settled once: the runs created leased to ``offer`` start, the other slots are given back."""

    def __init__(self, worker: Worker, offer: LeaseOffer) -> None:
        self._worker = worker
        self.offer = offer
        self._settled = False

    def give_back(self) -> None:
        """The trigger failed: it starts no run, and the slots are free again."""
        if not self._settled:
            self._settled = True
            self._worker._unpromise(self.offer.slots, used=0)

    async def settle(self, claimed: Sequence[ClaimedRun]) -> None:
        """Start ``claimed`` (the runs created leased to the offer); give back the other slots."""
        if not self._settled:
            self._settled = True
            self._worker._unpromise(self.offer.slots, used=len(claimed))
            await self._worker._start_created(claimed)


class Worker:
    """Executes the runs of the registered jobs; one per ``Durably`` instance."""

    def __init__(
        self,
        *,
        storage: Storage,
        bus: EventBus,
        jobs: Mapping[str, JobDefinition[Any, Any]],
        worker_id: str,
        polling_interval: float,
        max_polling_interval: float,
        heartbeat_interval: float,
        stale_threshold: float,
        max_concurrent_runs: int,
        on_finished: Finished,
        otel: _otel.Otel | None = None,
    ) -> None:
        self._storage = storage
        self._bus = bus
        self._jobs = jobs
        self.worker_id = worker_id
        self._polling = IdlePolling(polling_interval, max_polling_interval)
        self._heartbeat_interval = heartbeat_interval
        self._stale_threshold = stale_threshold
        self.max_concurrent_runs = max_concurrent_runs
        self._on_finished = on_finished
        self._otel = otel or _otel.Otel()
        # Every execution in flight, and the newest per run: a retried run can be claimed
        # again while its cancelled execution is still unwinding.
        self._running: set[Execution] = set()
        self._active: dict[str, Execution] = {}
        # Runs whose job body returned and whose outcome is being written: their slot is
        # free already, so the next claim overlaps that write.
        self._finishing: set[Execution] = set()
        # Slots promised to triggers in this process, for the runs they create leased.
        self._promised = 0
        # Slots asked for by claims in flight, and a slot freed meanwhile (_claim_alongside).
        self._claiming = 0
        self._freed = anyio.Event()
        # While serving: where runs execute, and the event loop they execute in.
        self._runs: anyio.abc.TaskGroup | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = anyio.Event()
        self._stopping = False
        self._log = _logger.bind(worker_id=worker_id)

    # --- signals from the engine ------------------------------------------------------

    def wake(self, at: float | None = None) -> None:
        """New work may be claimable (an in-process trigger, a freed slot): look at once,
        and idle from ``polling_interval`` again. ``at`` (epoch seconds, ``_clock``): a run
        known here becomes claimable then; the idle wait will not run past it."""
        if at is not None:
            self._polling.expect(anyio.current_time() + at - _clock.now())
        self._wake.set()

    def cancel_local(self, run_id: str) -> None:
        """Stop a run this worker is executing, because it was cancelled; a cancel may also
        free a concurrency key or wake a waiting parent, so look for work."""
        execution = self._active.get(run_id)
        if execution is not None:
            execution.stop("cancelled")
        self.wake()

    def request_stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def shut_down_runs(self) -> None:
        """Stop the runs still executing and release their leases."""
        for execution in list(self._running):
            execution.stop("shutdown")

    # --- the loop -----------------------------------------------------------------

    @property
    def storage_timeout(self) -> float:
        """How long one storage call may take: two heartbeats short of a lease (at least half
        of it), so a hung call is reported (and retried) while the lease still holds, and a
        slow but working database (contention) is given time."""
        return max(self._stale_threshold / 2, self._stale_threshold - 2 * self._heartbeat_interval)

    async def serve(self) -> None:
        """Claim and execute runs until ``request_stop()``; then wait for in-flight runs.

        Nothing ends this loop but a stop: any error is reported and followed by a backoff.
        An idle worker's waits grow up to ``max_polling_interval`` (``IdlePolling``) until
        something may mean work: a wake-up, a claim that found runs, a due time known here.
        """
        backoff = _Backoff()
        async with anyio.create_task_group() as task_group:
            heartbeat = anyio.CancelScope()
            task_group.start_soon(self._heartbeat_forever, heartbeat)
            async with anyio.create_task_group() as runs:
                self._runs, self._loop = runs, asyncio.get_running_loop()
                while not self._stopping:
                    # Reset before looking, so a wake-up that arrives meanwhile is kept.
                    woken, self._wake = self._wake.is_set(), anyio.Event()
                    running = len(self._running)
                    try:
                        busy = await self._claim_alongside(runs)
                    except Exception as exc:  # storage, a row it cannot decode, a bug
                        self.report(exc, "claiming runs")
                        await self._idle(backoff.delay())
                        continue
                    backoff.reset()
                    if woken or len(self._running) > running:
                        self._polling.restart()
                    if not busy:
                        await self._idle(self._polling.next_wait())
                self._runs = None
            heartbeat.cancel()

    async def _claim_and_start(self, task_group: anyio.abc.TaskGroup) -> bool:
        """Fill the free slots; whether all of them were filled (so look again at once)."""
        free = self._free()
        if free <= 0:
            return False
        self._claiming += free
        try:
            claim = await self.claim(free, next_due_within=self._polling.ceiling)
        finally:
            self._claiming -= free
        self._note_next_due(claim)
        claimed = claim.runs
        # A trigger here may have been promised a slot meanwhile (and filled it): the runs
        # past the slots left go back to pending, so max_concurrent_runs holds.
        room = max(self._free(), 0)
        for run in claimed[:room]:
            self._start(task_group, run)
        await self._release(claimed[room:], "giving back runs claimed past the free slots")
        return len(claimed) == free

    def _note_next_due(self, claim: Claim) -> None:
        """The idle wait ends when the claim said the next run becomes due, counted from
        when its answer came (never early, whatever this host's clock says)."""
        if claim.next_due_in is not None:
            self._polling.learn(anyio.current_time() + claim.next_due_in)
        elif not claim.runs:  # none due within the ceiling; a local claim that took runs did not read it
            self._polling.learn(math.inf)

    def _free(self) -> int:
        """Slots not executing a run (one whose body returned counts as free), not promised
        to a trigger, and not asked for by a claim in flight."""
        running = len(self._running) - len(self._finishing)
        return self.max_concurrent_runs - running - self._promised - self._claiming

    async def _claim_alongside(self, task_group: anyio.abc.TaskGroup) -> bool:
        """``_claim_and_start``, and while a claim is in flight, another at once for any
        slot freed meanwhile (at most ``_CLAIMS_IN_FLIGHT``), until a claim finds fewer
        runs than slots or a stop. Whether every claim filled its slots; the first error
        is raised once every claim ended.

        A pipelined run's body returns moments after it starts, so at c=8 and 40 ms RTT
        one claim at a time took cohorts in turn (7, 1, 7, 1, ...): 8 runs per two round
        trips, whatever the other writes did.
        """
        if len(self._running) <= len(self._finishing):
            # No body runs that could free a slot while this claim is in flight (an idle
            # worker, or c=1 between runs): no claims alongside to watch for.
            return await self._claim_and_start(task_group)
        results: list[bool | Exception] = []
        in_flight = 1  # the first claim, made below in this very pass

        async def claim() -> None:
            nonlocal in_flight
            try:
                results.append(await self._claim_and_start(task_group))
            except Exception as exc:  # raised below, once the other claims ended too
                results.append(exc)
            in_flight -= 1
            self._freed.set()

        async def alongside() -> None:
            nonlocal in_flight
            while in_flight:
                self._freed = anyio.Event()  # before looking, so a slot freed meanwhile is kept
                filled = all(result is True for result in results)
                if filled and in_flight < _CLAIMS_IN_FLIGHT and not self._stopping and self._free() > 0:
                    self._wake = anyio.Event()  # as in serve(): this claim looks for what it asked
                    in_flight += 1
                    claims.start_soon(claim)
                await self._freed.wait()  # a slot freed, or a claim ended: bounded by its timeout

        async with anyio.create_task_group() as claims:
            claims.start_soon(alongside)
            # Inline, not a task: the claim leaves in this pass of the loop, so it shares a
            # request with the writes made in it (the completion of the run that freed the slot).
            await claim()
        errors = [result for result in results if isinstance(result, Exception)]
        if errors:
            raise errors[0]
        return bool(results) and all(results)

    # --- runs created leased by triggers in this process ---------------------------------

    def offer(self, job_name: str, count: int) -> Promise | None:
        """Promise free slots to ``count`` runs of ``job_name`` a trigger is about to create,
        so they are created leased to this worker: only while serving, in its event loop."""
        if self._runs is None or self._stopping or job_name not in self._jobs:
            return None
        if asyncio.get_running_loop() is not self._loop:
            return None
        # A claim in flight gives back what it took past the slots promised meanwhile.
        slots = min(count, self._free() + self._claiming)
        if slots <= 0:
            return None
        self._promised += slots
        owner = f"{self.worker_id}/{secrets.token_hex(6)}"
        return Promise(
            self,
            LeaseOffer(
                owner=owner, job_names=tuple(self._jobs), slots=slots, lease_seconds=self._stale_threshold
            ),
        )

    def _unpromise(self, slots: int, *, used: int) -> None:
        """Promised slots come back; if some were not filled, the worker looks for work at once."""
        self._promised -= slots
        if used < slots:
            self._wake.set()

    async def _start_created(self, claimed: Sequence[ClaimedRun]) -> None:
        """Execute runs a trigger created leased to this worker; if it stopped meanwhile,
        release their leases so any worker claims them."""
        runs = self._runs
        if runs is None or self._stopping:
            await self._release(claimed, "releasing runs created leased to a stopped worker")
            return
        for run in claimed:
            self._start(runs, run)

    async def _release(self, claimed: Sequence[ClaimedRun], context: str) -> None:
        """Put runs leased to this worker and never started back to pending; one that fails
        to is reported, and any worker claims it once its lease expires."""
        for run in claimed:
            lease = Lease(run.run.id, run.lease_generation)
            try:
                await bounded(self._storage.release_lease(lease, Telemetry()), self.storage_timeout, context)
            except Exception as exc:
                self.report(exc, context, run_id=run.run.id)

    async def _idle(self, seconds: float) -> None:
        """Wait ``seconds``, or less if woken (a trigger, a freed slot, a stop) or until the
        earliest due time known here (which then counts as a wake-up) or learned by the claim.

        A new due time always comes with a wake-up or a claim, so the one read here cannot
        go stale.
        """
        until = min(anyio.current_time() + seconds, self._polling.earliest_due())
        with anyio.move_on_after(until - anyio.current_time()):
            await self._wake.wait()
        if self._polling.take_due(anyio.current_time()):
            self._wake.set()

    async def claim(self, limit: int, *, next_due_within: float | None = None) -> Claim:
        if not self._jobs:
            return Claim([])
        return await bounded(
            self._storage.claim_runs(
                worker_id=self.worker_id,
                job_names=list(self._jobs),
                limit=limit,
                lease_seconds=self._stale_threshold,
                next_due_within=next_due_within,
            ),
            self.storage_timeout,
            "claiming runs",
        )

    def _start(self, task_group: anyio.abc.TaskGroup, claimed: ClaimedRun) -> Execution:
        execution = Execution(
            claimed,
            self._jobs[claimed.run.job_name],
            storage=self._storage,
            bus=self._bus,
            worker_id=self.worker_id,
            lease_seconds=self._stale_threshold,
            storage_timeout=self.storage_timeout,
            on_finished=self._on_finished,
            spawn=task_group.start_soon,
            on_body_done=self._body_done,
            trace=self._otel.run(claimed),
        )
        self._active[execution.run_id] = execution
        self._running.add(execution)
        task_group.start_soon(self._execute, execution)
        return execution

    def _body_done(self, execution: Execution) -> None:
        self._finishing.add(execution)
        self._freed.set()
        self._wake.set()

    async def _execute(self, execution: Execution) -> None:
        try:
            await execution.execute()
        except Exception as exc:  # a bug must not take the worker down
            self.report(exc, "executing a run", run_id=execution.run_id)
        finally:
            self._running.discard(execution)
            self._finishing.discard(execution)
            if self._active.get(execution.run_id) is execution:
                del self._active[execution.run_id]
            # Its outcome may make runs claimable (a concurrency key, a parent): look if a
            # slot is free. A slot its body freed was refilled already; the next body's end
            # looks again.
            if execution.wake_at is not None or self._free() > 0:
                self.wake(execution.wake_at)

    async def process(self, limit: int, *, deadline: float | None = None) -> tuple[int, int]:
        """Claim up to ``limit`` runs, execute them with lease renewal; how many were claimed,
        and how many reached completed, failed or waiting. At ``deadline`` (monotonic) the
        runs still executing are stopped and their leases released."""
        claimed = (await self.claim(limit)).runs
        executions: list[Execution] = []
        if claimed:
            async with anyio.create_task_group() as task_group:
                heartbeat, stopper = anyio.CancelScope(), anyio.CancelScope()
                task_group.start_soon(self._heartbeat_forever, heartbeat)
                if deadline is not None:
                    task_group.start_soon(self._stop_at, deadline, executions, stopper)
                async with anyio.create_task_group() as runs:
                    executions.extend(self._start(runs, run) for run in claimed)
                heartbeat.cancel()
                stopper.cancel()
        return len(claimed), sum(execution.ended is not None for execution in executions)

    async def _stop_at(self, deadline: float, executions: list[Execution], scope: anyio.CancelScope) -> None:
        """At ``deadline``, stop ``executions``: each releases its lease (one bounded write)."""
        with scope:
            await anyio.sleep(max(0.0, deadline - anyio.current_time()))
            for execution in executions:
                execution.stop("shutdown")

    # --- leases -------------------------------------------------------------------

    async def _heartbeat_forever(self, scope: anyio.CancelScope) -> None:
        with scope:
            while True:
                await anyio.sleep(self._heartbeat_interval)
                try:
                    await self.renew_leases()
                except Exception as exc:  # a bug or bad data must not end the renewals
                    self.report(exc, "renewing leases")

    async def renew_leases(self) -> None:
        """Renew every lease held in one statement; stop runs whose lease is gone."""
        executions = list(self._active.values())
        if not executions:
            return
        try:
            held = await bounded(
                self._storage.renew_leases(
                    [execution.lease for execution in executions], lease_seconds=self._stale_threshold
                ),
                self.storage_timeout,
                "renewing leases",
            )
        except StorageError as exc:
            self.report(exc, "renewing leases")
            return
        for execution in executions:
            if execution.run_id not in held and self._active.get(execution.run_id) is execution:
                execution.stop(await execution.why_lease_gone())

    def report(self, exc: BaseException, context: str, *, run_id: str | None = None) -> None:
        self._log.warning("worker error", context=context, error=describe(exc), run_id=run_id)
        self._bus.emit(WorkerErrorEvent, error=describe(exc), context=context, run_id=run_id)
