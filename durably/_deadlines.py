"""Bounded storage calls: every wait on the database ends within its bound (SPEC §15).

A run makes about ten storage calls. An anyio cancel scope around each (a scope, a timer
handle, a heap entry) cost more than the local file's statements; so each event loop keeps
one timer for all of its calls in flight, set for the earliest deadline. A call only notes
its deadline; the timer, when it fires, cancels the calls past theirs and is set again for
the next one, so under steady work it fires about once per bound, not once per call.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable
from typing import TypeVar

from durably.errors import StorageError

T = TypeVar("T")


class _Call:
    """One bounded call in flight: its task, and when it is past its bound."""

    __slots__ = ("deadline", "expired", "task")

    def __init__(self, task: asyncio.Task[object], deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.expired = False


class _Watch:
    """The bounded calls in flight in one event loop, and the one timer that ends them."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.calls: set[_Call] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._at = math.inf  # when the timer fires

    def add(self, call: _Call) -> None:
        self.calls.add(call)
        if call.deadline < self._at:
            self._set(call.deadline)

    def _set(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._at = at
        self._timer = self._loop.call_at(at, self._fire)

    def _fire(self) -> None:
        self._timer, self._at = None, math.inf
        now = self._loop.time()
        earliest = math.inf
        for call in list(self.calls):
            if call.expired:
                continue
            if call.deadline <= now:
                call.expired = True
                call.task.cancel()
            else:
                earliest = min(earliest, call.deadline)
        if earliest < math.inf:
            self._set(earliest)


_watches: dict[asyncio.AbstractEventLoop, _Watch] = {}


def _watch(loop: asyncio.AbstractEventLoop) -> _Watch:
    global _watches
    watch = _watches.get(loop)
    if watch is None:
        # A new loop (serverless handlers run one per invocation): forget the closed ones.
        _watches = {old: kept for old, kept in _watches.items() if not old.is_closed()}
        watch = _watches[loop] = _Watch(loop)
    return watch


async def bounded(call: Awaitable[T], seconds: float, what: str) -> T:
    """Await a storage call for at most ``seconds``; a hung one becomes a transient ``StorageError``.

    Worker and execution calls stop well within a lease, so a hang is reported (and a write
    retried) while the lease still holds, never waited out. Only this bound's expiry becomes
    the error: a cancellation that is not its own (a cancel scope, a shutdown) goes through.
    """
    task = asyncio.current_task()
    assert task is not None
    loop = task.get_loop()
    watch = _watch(loop)
    entry = _Call(task, loop.time() + seconds)
    cancelling = task.cancelling()
    watch.add(entry)
    try:
        return await call
    except asyncio.CancelledError:
        if entry.expired and task.uncancel() <= cancelling:
            raise StorageError(
                f"{what}: the database did not answer within {seconds:g} s", transient=True
            ) from None
        raise
    finally:
        watch.calls.discard(entry)
