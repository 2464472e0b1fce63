"""Pipelined checkpoints (SPEC §3, ``checkpoints="pipelined"``): steps go on while theirs are written.

At most one checkpoint write of a run is in flight; the steps that finish meanwhile queue up
and go together in the next write. The run's ending write carries the steps still queued
(``settle``), and every other fenced write of the run first waits for the queue to be
stored (``drain``; a progress flush is deferred to the next write instead), so no write
of the run overtakes an earlier checkpoint: two requests in flight may commit in either order.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio

from durably._storage._protocol import StepRecord

#: How many finished steps may wait for their checkpoint to be acknowledged. A step does not
#: start while this many are unacknowledged, so a worker whose lease was lost while a write
#: was held runs at most this many steps before it notices; after a crash at most this many
#: steps (plus the one that was running) run again.
MAX_UNACKNOWLEDGED = 8

#: How long the first checkpoint of a burst waits before it leaves (seconds), so quick steps
#: that follow it, and a completion right after them, travel in one write: a 3-step run of
#: quick steps is then one write, not two. Against a round trip of 10-50 ms it costs nothing.
LINGER = 0.002


class CheckpointPipeline:
    """The unacknowledged checkpoints of one execution, written one batch at a time.

    ``write`` stores a batch under the run's lease, retrying transient errors while the
    lease can hold (so each wait here is bounded by a lease's length); ``False`` means the
    lease is gone. ``broken`` is awaited with the exception (``None`` for a refused write)
    once a write did not store its batch: it stops the execution. Nothing is written after.
    """

    def __init__(
        self,
        *,
        write: Callable[[list[StepRecord]], Awaitable[bool]],
        broken: Callable[[Exception | None], Awaitable[None]],
        spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], object],
    ) -> None:
        self._write = write
        self._broken = broken
        self._spawn = spawn
        self._queued: list[StepRecord] = []
        self._in_flight = 0
        self._writing = False
        self._settling = False  # the body ended: the ending write carries what is queued
        self._changed: anyio.Event | None = None  # made by the first wait: a "sync" job has none
        self.failed = False

    @property
    def unacknowledged(self) -> int:
        return self._in_flight + len(self._queued)

    def add(self, step: StepRecord) -> bool:
        """Queue a finished step's checkpoint; written at once unless a write is in flight.

        ``False`` if the pipeline failed: nothing is written any more.
        """
        if self.failed:
            return False
        self._queued.append(step)
        if not self._writing:
            self._writing = True
            self._spawn(self._write_queued)
        return True

    async def room(self) -> bool:
        """Wait until a step may start (fewer than ``MAX_UNACKNOWLEDGED`` unacknowledged);
        ``False`` if the pipeline failed."""
        while self.unacknowledged >= MAX_UNACKNOWLEDGED and not self.failed:
            await self._change()
        return not self.failed

    async def drain(self) -> bool:
        """Wait until every queued checkpoint is stored; ``False`` if one could not be."""
        while self._writing:
            await self._change()
        return not self.failed

    async def unstored(self, *, carry: bool) -> list[StepRecord] | None:
        """Before the run's ending write: the steps it carries (``settle``), or none once all
        are stored (``drain``). ``None`` if one could not be stored."""
        if carry:
            return await self.settle()
        return [] if await self.drain() else None

    async def settle(self) -> list[StepRecord] | None:
        """Wait for the write in flight; the steps still queued, taken for the run's ending
        write to carry (``None`` if the pipeline failed)."""
        self._settling = True
        while self._in_flight and not self.failed:
            await self._change()
        if self.failed:
            return None
        queued, self._queued = self._queued, []
        return queued

    async def _write_queued(self) -> None:
        """The writer: one batch at a time until the queue is empty or a write fails."""
        try:
            await anyio.sleep(LINGER)  # the run's end meanwhile takes the queue (``settle``)
            while self._queued and not self.failed and not self._settling:
                batch, self._queued = self._queued, []
                self._in_flight = len(batch)
                failure: Exception | None = None
                try:
                    held = await self._write(batch)
                except Exception as exc:  # storage gone for a lease's length, or a bug: reported
                    held, failure = False, exc
                if not held:
                    await self._broken(failure)
                    self.failed = True
                self._in_flight = 0
                self._notify()
        finally:
            self._writing = False
            self._notify()

    async def _change(self) -> None:
        """Until the next write ends (or the pipeline fails)."""
        if self._changed is None:
            self._changed = anyio.Event()
        await self._changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
