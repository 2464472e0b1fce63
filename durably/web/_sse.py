"""Server-Sent Events: one run's status, steps, progress and logs; every run's status.

Each event of a run's stream carries ``id: STEPS.LOGS``, how many of its steps and
log lines the client has seen, so a browser that reconnects with ``Last-Event-ID``
gets only what it missed (and the current status and progress again).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import msgspec

from durably._models import LogEntry, Progress, Run, Step
from durably.errors import NotFoundError
from durably.web._changes import ProgressMade, RunChanged, RunDeleted

if TYPE_CHECKING:
    from durably._engine import Durably
    from durably.web._changes import ChangeFeed

HEARTBEAT = 15.0  # seconds between comment lines that keep proxies from closing the stream
PUSH_FRESHNESS = 2.0  # seconds a pushed progress outranks the stored one
_encoder = msgspec.json.Encoder()


def sse(event: str, data: Any, event_id: str | None = None) -> bytes:
    """One event in ``text/event-stream`` format (msgspec JSON never spans lines)."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: ".encode() + _encoder.encode(data) + b"\n\n"


def _parse_last_event_id(value: str | None) -> tuple[int, int]:
    try:
        steps, logs = (value or "").split(".")
        return max(int(steps), 0), max(int(logs), 0)
    except ValueError:
        return 0, 0


class RunView:
    """What the client of one run's stream has seen; turns a new state into the events it lacks."""

    def __init__(self, last_event_id: str | None) -> None:
        self._skip_steps, self._logs = _parse_last_event_id(last_event_id)
        self._steps: dict[str, str] = {}
        self._status: str | None = None
        self._progress: Progress | None = None
        self._pushed_at = -PUSH_FRESHNESS
        self.ended = False

    @property
    def event_id(self) -> str:
        return f"{len(self._steps)}.{self._logs}"

    def update(self, run: Run, steps: list[Step], logs: list[LogEntry]) -> list[bytes]:
        events = []
        for position, step in enumerate(steps):
            if self._steps.get(step.name) != step.status:
                self._steps[step.name] = step.status
                if position >= self._skip_steps:
                    events.append(sse("step", step, self.event_id))
        self._skip_steps = 0
        for log in logs[self._logs :]:
            self._logs += 1
            events.append(sse("log", log, self.event_id))
        # Progress pushed by this process is newer than what storage has (it lands within
        # a second), so storage's only counts once pushes stop, and at the end.
        if run.is_terminal or time.monotonic() - self._pushed_at > PUSH_FRESHNESS:
            events.extend(self._progress_event(run.progress))
        if run.status != self._status:
            self._status = run.status
            events.append(sse("status", run, self.event_id))
            self.ended = run.is_terminal
        return events

    def pushed(self, progress: Progress) -> list[bytes]:
        """Events for ``run:progress`` of this process."""
        self._pushed_at = time.monotonic()
        return self._progress_event(progress)

    def _progress_event(self, progress: Progress | None) -> list[bytes]:
        if progress is None or progress == self._progress:
            return []
        self._progress = progress
        return [sse("progress", progress, self.event_id)]


async def run_events(
    durably: Durably, feed: ChangeFeed, run_id: str, last_event_id: str | None
) -> AsyncIterator[bytes]:
    """The stream of ``GET /api/runs/{id}/events``; it ends after the terminal status."""
    view = RunView(last_event_id)
    async with feed.subscribe(run_id) as subscription:

        async def snapshot() -> list[bytes]:
            try:
                run = await durably.get_run(run_id)
                if run is not None:
                    return view.update(run, await durably.get_steps(run_id), await durably.get_logs(run_id))
            except NotFoundError:
                pass
            view.ended = True
            return [sse("status", {"id": run_id, "status": "deleted"})]

        for event in await snapshot():
            yield event
        while not view.ended:
            message = await subscription.get(HEARTBEAT)
            if subscription.overflowed:
                subscription.overflowed = False
                events = await snapshot()
            elif message is None:
                events = [b": heartbeat\n\n"]
            elif isinstance(message, ProgressMade):
                events = view.pushed(message.progress)
            elif isinstance(message, RunDeleted):
                events, view.ended = [sse("status", {"id": run_id, "status": "deleted"})], True
            elif message.steps is None or message.logs is None:
                events = await snapshot()
            else:
                events = view.update(message.run, message.steps, message.logs)
            for event in events:
                yield event


async def all_events(feed: ChangeFeed, matches: Callable[[Run], bool]) -> AsyncIterator[bytes]:
    """The stream of ``GET /api/events``: ``status`` (the run as it is now), ``progress``,
    ``delete``, and ``reset`` when the client fell behind and should reload its list."""
    async with feed.subscribe() as subscription:
        yield b": connected\n\n"
        while True:
            message = await subscription.get(HEARTBEAT)
            if subscription.overflowed:
                subscription.overflowed = False
                yield sse("reset", {})
            elif message is None:
                yield b": heartbeat\n\n"
            elif isinstance(message, ProgressMade):
                yield sse("progress", {"run_id": message.run_id, "progress": message.progress})
            elif isinstance(message, RunDeleted):
                yield sse("delete", {"run_id": message.run_id})
            elif isinstance(message, RunChanged) and matches(message.run):
                yield sse("status", message.run)
