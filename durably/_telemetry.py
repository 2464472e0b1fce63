"""Progress and log lines of one run, buffered and stored at most once a second.

Every fenced write of the run carries what is buffered; between writes a flusher
stores it within ``PERIOD``. A write that fails keeps its lines for the next one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import anyio

from durably._models import LogEntry, Progress
from durably._storage._protocol import Telemetry
from durably.errors import StorageError

PERIOD = 1.0
_NOTHING = Telemetry()  # shared, never changed: most writes carry no progress or logs


class TelemetryBuffer:
    """What a run reported and has not stored yet.

    ``store`` writes a batch under the run's lease (``False``: the lease is gone);
    ``report`` says a write failed; ``lease_gone`` stops the run.
    """

    def __init__(
        self,
        *,
        store: Callable[[Telemetry], Awaitable[bool]],
        report: Callable[[BaseException, str], None],
        lease_gone: Callable[[], Awaitable[None]],
        spawn: Callable[[Callable[[], Coroutine[Any, Any, None]]], object],
    ) -> None:
        self._store = store
        self._report = report
        self._lease_gone = lease_gone
        self._spawn = spawn
        self._pending = Telemetry()
        self._written_at = 0.0
        self._due: anyio.Event | None = None
        self._flusher: anyio.CancelScope | None = None  # made by the flusher: most runs have none
        self._closed = False

    def add_progress(self, progress: Progress) -> None:
        self._pending.progress = progress
        self._changed()

    def add_log(self, entry: LogEntry) -> None:
        self._pending.logs.append(entry)
        self._changed()

    def take(self) -> Telemetry:
        """Everything buffered, for a write about to be made; the buffer starts empty."""
        if not self._pending:
            return _NOTHING
        telemetry, self._pending = self._pending, Telemetry()
        self._written_at = time.monotonic()
        return telemetry

    def put_back(self, unstored: Telemetry) -> None:
        """Progress and logs a failed write did not store ride along with the next one."""
        self._pending.logs[:0] = unstored.logs
        if self._pending.progress is None:
            self._pending.progress = unstored.progress

    def defer(self, unstored: Telemetry) -> None:
        """Not stored now (it must not overtake a write in flight): kept for the next write,
        or for a flush within ``PERIOD``."""
        self.put_back(unstored)
        self._changed()

    def close(self) -> None:
        """No more periodic writes: the run's outcome write carries what is left."""
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()

    def _changed(self) -> None:
        if self._closed:
            return
        if self._due is None:
            self._due = anyio.Event()
            self._spawn(self._flush)
        self._due.set()

    async def _flush(self) -> None:
        if self._closed:  # closed before this task started
            return
        self._flusher = anyio.CancelScope()
        with self._flusher:
            await self._flush_forever()

    async def _flush_forever(self) -> None:
        while True:
            assert self._due is not None
            await self._due.wait()
            delay = self._written_at + PERIOD - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)
            self._due = anyio.Event()
            telemetry = self.take()
            if not telemetry:
                continue
            try:
                held = await self._store(telemetry)
            except StorageError as exc:
                self._report(exc, "storing progress and logs (kept for the next write)")
                self.put_back(telemetry)
                continue
            if not held:
                await self._lease_gone()
                return
