"""Waiting for runs to end (``trigger_and_wait``, ``wait_for_run``): in-process signals first,
polling for runs executed elsewhere. (A run that itself waits is ``_waits.py``.)"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
import msgspec

from durably import _codec
from durably._events import EventBus, LogWriteEvent, RunProgressEvent
from durably._models import LogEntry, Progress, Run
from durably._storage._protocol import Storage
from durably.errors import NotFoundError, ValidationError


def check_timeout(timeout: Any) -> None:
    """``None`` (wait as long as it takes) or a positive number of seconds."""
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0
    ):
        raise ValidationError(f"timeout must be a positive number of seconds or None, got {timeout!r}")


class Outcome(msgspec.Struct):
    """How a run ended: its status and stored output (JSON) or error."""

    status: str
    output: bytes | None
    error: str | None


class _Waiter:
    def __init__(self) -> None:
        self.event = anyio.Event()
        self.outcome: Outcome | None = None


class Waiters:
    """Everyone waiting for runs in this process; woken at once when a local run ends."""

    def __init__(self, storage: Storage, bus: EventBus, *, polling_interval: float) -> None:
        self._storage = storage
        self._bus = bus
        self._poll = min(max(polling_interval, 0.05), 1.0)
        self._waiters: dict[str, list[_Waiter]] = {}

    def finished(self, run_id: str, outcome: Outcome) -> None:
        """A run executed (or cancelled) by this process ended."""
        for waiter in self._waiters.pop(run_id, ()):
            waiter.outcome = outcome
            waiter.event.set()

    async def wait(
        self,
        run: Run,
        *,
        timeout: float | None,
        on_progress: Callable[[Progress], Any] | None = None,
        on_log: Callable[[LogEntry], Any] | None = None,
    ) -> Outcome:
        """The outcome of ``run``; ``TimeoutError`` after ``timeout`` seconds (the run goes on)."""
        check_timeout(timeout)
        watcher = _Watcher(run.id, self._bus, on_progress, on_log)
        waiter = _Waiter()
        self._waiters.setdefault(run.id, []).append(waiter)
        try:
            with anyio.move_on_after(timeout) as deadline:
                return await self._until_ended(run, waiter, watcher)
            assert deadline.cancelled_caught
            raise TimeoutError(f"run {run.id} did not end within {timeout} s; it goes on")
        finally:
            watcher.close()
            waiters = self._waiters.get(run.id, [])
            if waiter in waiters:
                waiters.remove(waiter)
            if not waiters:
                self._waiters.pop(run.id, None)

    async def _until_ended(self, run: Run, waiter: _Waiter, watcher: _Watcher) -> Outcome:
        current: Run | None = run
        while waiter.outcome is None:
            if current is None:
                raise NotFoundError(f"run {run.id} was deleted while being waited for")
            if current.is_terminal:
                return Outcome(current.status, _codec.encode(current.output), current.error)
            with anyio.move_on_after(self._poll):
                await waiter.event.wait()
            if waiter.outcome is None:
                current = await self._storage.get_run(run.id)
                if current is not None:
                    await watcher.poll(self._storage, current)
        return waiter.outcome


class _Watcher:
    """Feeds ``on_progress``/``on_log`` from local events, or from polling for remote runs."""

    def __init__(
        self,
        run_id: str,
        bus: EventBus,
        on_progress: Callable[[Progress], Any] | None,
        on_log: Callable[[LogEntry], Any] | None,
    ) -> None:
        self._run_id = run_id
        self._on_progress = on_progress
        self._on_log = on_log
        self._last_progress: Progress | None = None
        self._logs_seen = 0
        # Once this process emits events for the run, they are fresher than the
        # database (progress is stored up to a second late): stop polling then.
        self._local = False
        self._unsubscribe: list[Callable[[], None]] = []
        if on_progress is not None:
            self._unsubscribe.append(bus.on("run:progress", self._progress_event))
        if on_log is not None:
            self._unsubscribe.append(bus.on("log:write", self._log_event))

    def _progress_event(self, event: RunProgressEvent) -> None:
        if event.run_id == self._run_id:
            self._local = True
            self._deliver_progress(event.progress)

    def _deliver_progress(self, progress: Progress) -> None:
        if progress != self._last_progress and self._on_progress is not None:
            self._last_progress = progress
            self._on_progress(progress)

    def _log_event(self, event: LogWriteEvent) -> None:
        if event.run_id == self._run_id and self._on_log is not None:
            self._local = True
            self._logs_seen += 1
            self._on_log(
                LogEntry(
                    level=event.level,
                    message=event.message,
                    data=event.data,
                    step_name=event.step_name,
                    created_at=event.timestamp,
                )
            )

    async def poll(self, storage: Storage, run: Run) -> None:
        if self._local:
            return
        if run.progress is not None:
            self._deliver_progress(run.progress)
        if self._on_log is not None:
            logs = await storage.get_logs(self._run_id)
            for entry in logs[self._logs_seen :]:
                self._logs_seen += 1
                self._on_log(entry)

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()
