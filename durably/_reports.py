"""What a run reports besides its steps: progress and log lines, replay-aware (SPEC §3)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from durably import _clock, _codec
from durably._events import LogWriteEvent, RunProgressEvent
from durably._models import ClaimedRun, LogEntry, LogLevel, Progress
from durably._steps import checked_progress
from durably._telemetry import TelemetryBuffer

#: The step whose function is running (its log lines carry its name).
current_step: ContextVar[str | None] = ContextVar("durably_current_step", default=None)


class RunReports:
    """The progress and log lines of one execution, emitted and buffered for storage.

    Replay: the log calls a resumed body makes again are skipped, the n-th per step up to
    the stored count; progress is held back until replay ends (``end_replay``). Sync steps
    run on other threads: what they report is handed to the loop's thread.
    """

    def __init__(
        self,
        claimed: ClaimedRun,
        *,
        telemetry: TelemetryBuffer,
        emit: Callable[..., None],
        logger: Callable[[], Any],
    ) -> None:
        self._stored_progress = claimed.run.progress
        self._logs_to_skip = dict(claimed.log_counts)
        self._replaying = claimed.lease_generation > 1
        self._held_progress: Progress | None = None
        self._telemetry = telemetry
        self._emit: Callable[..., None] = emit
        self._logger = logger
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()

    def progress(self, current: float, total: float | None, message: str | None) -> None:
        self._on_loop(self._record_progress, checked_progress(current, total, message))

    def log(self, level: LogLevel, message: str, data: dict[str, Any]) -> None:
        _codec.canonical(data, dict[str, Any], what=f"the data of log line {message!r}")
        step_name = current_step.get()
        getattr(self._logger(), "warning" if level == "warn" else level)(message, step_name=step_name, **data)
        entry = LogEntry(
            level=level,
            message=str(message),
            data=data,
            step_name=step_name,
            created_at=_clock.to_datetime(_clock.now()),
        )
        self._on_loop(self._record_log, entry)

    def end_replay(self) -> None:
        """The body reached code that never ran (a new step, or its end): progress flows again.

        The last progress held back during replay lands unless it is the one stored.
        """
        if not self._replaying:
            return
        self._replaying = False
        held, self._held_progress = self._held_progress, None
        if held is not None and held != self._stored_progress:
            self._record_progress(held)

    def _on_loop(self, record: Callable[[Any], None], value: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            record(value)
        else:
            self._loop.call_soon_threadsafe(record, value)

    def _record_progress(self, progress: Progress) -> None:
        if self._replaying:
            self._held_progress = progress
            return
        self._emit(RunProgressEvent, progress=progress)
        self._telemetry.add_progress(progress)

    def _record_log(self, entry: LogEntry) -> None:
        skip = self._logs_to_skip.get(entry.step_name, 0)
        if skip:  # stored before the interruption by this same call
            self._logs_to_skip[entry.step_name] = skip - 1
            return
        self._emit(
            LogWriteEvent,
            step_name=entry.step_name,
            level=entry.level,
            message=entry.message,
            data=entry.data,
        )
        self._telemetry.add_log(entry)
