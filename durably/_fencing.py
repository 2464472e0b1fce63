"""One execution's lease: bounded storage calls, fenced writes retried while it can hold,
and why it is gone when a write or renewal was refused."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

import anyio

from durably._deadlines import bounded
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
