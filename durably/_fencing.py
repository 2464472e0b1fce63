"""One execution's lease: bounded storage calls, fenced writes retried while it can hold,
and why it is gone when a write or renewal was refused."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import anyio

from durably._storage._protocol import Lease, Storage
from durably.errors import LeaseLostError, StorageError

T = TypeVar("T")

# "cancelled": by this process, which announced it; "cancelled_elsewhere": found cancelled
# by another process when a write or renewal was refused, so announced here (SPEC §7, §10);
# "postponed": a step backing off for longer than a lease released the run to wait (SPEC §12);
# "waiting": the run waits (a sleep, a signal, its children) and holds no lease.
StopReason = Literal[
    "cancelled",
    "cancelled_elsewhere",
    "lease_lost",
    "finished_elsewhere",
    "shutdown",
    "storage_lost",
    "postponed",
    "waiting",
]


def describe(exc: BaseException) -> str:
    """How an exception is stored on a run: ``"ExcType: message"``."""
    return f"{type(exc).__name__}: {exc}"


class _Timer:
    """The deadline of one bounded call: cancels the awaiting task once, when it passes."""

    __slots__ = ("expired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.expired = False

    def expire(self) -> None:
        self.expired = True
        self.task.cancel()


async def bounded(call: Awaitable[T], seconds: float, what: str) -> T:
    """Await a storage call for at most ``seconds``; a hung one becomes a transient ``StorageError``.

    Worker and execution calls stop well within a lease, so a hang is reported (and a write
    retried) while the lease still holds, never waited out. One loop timer per call, as
    ``asyncio.timeout`` does (a third of an anyio cancel scope's cost, ~10 of these per run):
    a cancellation that is not this timer's (a cancel scope, a shutdown) goes through as is.
    """
    task = asyncio.current_task()
    assert task is not None
    loop = task.get_loop()
    cancelling = task.cancelling()
    timer = _Timer(task)
    handle = loop.call_at(loop.time() + seconds, timer.expire)
    try:
        return await call
    except asyncio.CancelledError:
        if timer.expired and task.uncancel() <= cancelling:
            raise StorageError(
                f"{what}: the database did not answer within {seconds:g} s", transient=True
            ) from None
        raise
    finally:
        handle.cancel()


class Fence:
    """The lease one execution holds, and how its storage calls go under it."""

    def __init__(
        self,
        storage: Storage,
        lease: Lease,
        *,
        lease_seconds: float,
        storage_timeout: float,
        report: Callable[[BaseException, str], None],
    ) -> None:
        self.lease = lease
        self._storage = storage
        self._lease_seconds = lease_seconds
        self._storage_timeout = storage_timeout
        self._report = report
        self._what = f"run {lease.run_id}"

    def bounded(self, call: Awaitable[T]) -> Awaitable[T]:
        return bounded(call, self._storage_timeout, self._what)

    async def write(self, operation: Callable[[], Awaitable[T]]) -> T:
        """A fenced write, retried on transient errors while the lease can still be valid."""
        deadline = time.monotonic() + self._lease_seconds
        delay = 0.05
        while True:
            try:
                return await bounded(operation(), self._storage_timeout, self._what)
            except StorageError as exc:
                if not exc.transient or time.monotonic() + delay > deadline:
                    raise
                self._report(exc, "writing run state (will retry)")
                await anyio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 1.0)

    async def why_gone(self) -> StopReason:
        """Why a fenced write or renewal was refused: cancelled, finished elsewhere, or taken over."""
        try:
            run = await self.bounded(self._storage.get_run(self.lease.run_id))
        except Exception as exc:  # the lease is gone for sure; only the reason is unknown
            self._report(exc, "reading a run whose lease was refused")
            return "lease_lost"
        if run is None:  # deleted: it had ended, and whoever ended it announced it
            return "cancelled"
        if run.status == "cancelled":
            return "cancelled_elsewhere"
        if run.status in ("completed", "failed"):
            return "finished_elsewhere"
        return "lease_lost"

    def lost(self, reason: StopReason) -> LeaseLostError:
        """The error reported when this execution stopped because its lease is gone."""
        how = {
            "finished_elsewhere": "another worker finished the run",
            "storage_lost": "the database was unreachable for longer than the lease, so it lapsed",
        }.get(reason, "another worker took it over")
        return LeaseLostError(
            f"the lease on run {self.lease.run_id} (generation {self.lease.generation}) is lost: {how};"
            " this execution stopped and wrote nothing more"
        )
