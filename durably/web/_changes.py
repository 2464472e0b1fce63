"""One change feed per app: every live subscriber of the process shares one storage poll.

Changes made by workers anywhere are found with ``Storage.get_run_changes`` (one
indexed read) at most once a second, however many browsers watch. Events of this
process poke the poll so their changes go out at once, and ``run:progress``, which
is stored only within a second, is passed on as it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import anyio
import msgspec
import structlog

from durably._models import LogEntry, Progress, Run, Step
from durably.errors import NotFoundError

if TYPE_CHECKING:
    from durably._engine import Durably

_logger = structlog.get_logger("durably.web")

QUEUE_SIZE = 64
_BATCH = 200
_MIN_GAP = 0.05  # pokes closer together than this share one read
_PROGRESS_GAP = 0.1
_POKING = frozenset(
    {
        "run:trigger",
        "run:start",
        "run:complete",
        "run:fail",
        "run:cancel",
        "run:retry",
        "run:delete",
        "step:complete",
        "step:fail",
    }
)


class RunChanged(msgspec.Struct, frozen=True):
    """A run as stored now; ``steps``/``logs`` are filled for runs someone watches closely."""

    run: Run
    steps: list[Step] | None = None
    logs: list[LogEntry] | None = None


class RunDeleted(msgspec.Struct, frozen=True):
    run_id: str


class ProgressMade(msgspec.Struct, frozen=True):
    """``run:progress`` of this process, before it is stored."""

    run_id: str
    progress: Progress


Message = RunChanged | RunDeleted | ProgressMade


class Subscription:
    """A bounded queue of messages; when it overflows, the reader resynchronises."""

    def __init__(self, run_id: str | None) -> None:
        self.run_id = run_id
        self.queue: asyncio.Queue[Message] = asyncio.Queue(QUEUE_SIZE)
        self.overflowed = False

    def put(self, message: Message) -> None:
        if self.run_id is not None and _run_id(message) != self.run_id:
            return
        try:
            self.queue.put_nowait(message)
        except asyncio.QueueFull:
            # A slow reader must not hold memory: drop what it has not read, and tell it.
            self.overflowed = True
            while not self.queue.empty():
                self.queue.get_nowait()

    async def get(self, timeout: float) -> Message | None:
        """The next message, or ``None`` after ``timeout`` seconds (time for a heartbeat)."""
        with anyio.move_on_after(timeout):
            return await self.queue.get()
        return None


def _run_id(message: Message) -> str:
    return message.run.id if isinstance(message, RunChanged) else message.run_id


class ChangeFeed:
    """The poll and the subscribers of one app; it runs only while someone listens."""

    def __init__(self, durably: Durably, *, interval: float = 1.0) -> None:
        self._durably = durably
        self.interval = interval
        self._subscriptions: set[Subscription] = set()
        self._task: asyncio.Task[None] | None = None
        self._poke = asyncio.Event()
        self._ready = asyncio.Event()
        self._cursor: int | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._progress_sent: dict[str, float] = {}
        self.reads = 0  # storage reads made by the poll (benchmarks/_web.py reports them)

    @property
    def subscribers(self) -> int:
        return len(self._subscriptions)

    @contextlib.asynccontextmanager
    async def subscribe(self, run_id: str | None = None) -> AsyncIterator[Subscription]:
        """A subscription for one run, or for every run when ``run_id`` is None.

        It yields once the feed has its starting cursor, so a snapshot read after this
        misses nothing that changes later (it may see a change twice).
        """
        subscription = Subscription(run_id)
        self._subscriptions.add(subscription)
        try:
            if self._task is None or self._task.done():
                self._start()
            with anyio.move_on_after(self.interval * 5):
                await self._ready.wait()
            yield subscription
        finally:
            self._subscriptions.discard(subscription)
            if not self._subscriptions:
                self._stop()

    def _start(self) -> None:
        self._cursor = None
        self._poke, self._ready = asyncio.Event(), asyncio.Event()
        if self._unsubscribe is None:
            self._unsubscribe = self._durably.on("*", self._on_event)
        self._task = asyncio.get_running_loop().create_task(self._poll_forever(), name="durably-web-feed")
        self._task.add_done_callback(_check_ended)

    def _stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def _on_event(self, event: Any) -> None:
        if event.type == "run:progress":
            # A tight loop of step.progress() must not flood the queues: a few a second
            # per run go out now, and the last value comes from storage within a second.
            now = time.monotonic()
            if now - self._progress_sent.get(event.run_id, 0.0) >= _PROGRESS_GAP:
                if len(self._progress_sent) > QUEUE_SIZE * 16:
                    self._progress_sent.clear()
                self._progress_sent[event.run_id] = now
                self._publish(ProgressMade(run_id=event.run_id, progress=event.progress))
        elif event.type == "run:delete":
            self._publish(RunDeleted(run_id=event.run_id))
        elif event.type in _POKING:
            self._poke.set()

    def _publish(self, message: Message) -> None:
        for subscription in list(self._subscriptions):
            subscription.put(message)

    async def _poll_forever(self) -> None:
        first = True
        while self._subscriptions:
            if not first:
                with anyio.move_on_after(self.interval):
                    await self._poke.wait()
                self._poke.clear()
            first = False
            try:
                await self.poll()
            except Exception as exc:  # the feed outlives any storage hiccup
                _logger.warning("change feed poll failed", error=f"{type(exc).__name__}: {exc}")
            await anyio.sleep(_MIN_GAP)

    async def poll(self) -> None:
        """Read what changed since the last poll and hand it to the subscribers."""
        storage = self._durably.storage
        if self._cursor is None:
            self._cursor = (await storage.get_run_changes(None, limit=1)).cursor
            self.reads += 1
            self._ready.set()
            return
        while True:
            changes = await storage.get_run_changes(self._cursor, limit=_BATCH)
            self.reads += 1
            self._cursor = changes.cursor
            watched = {s.run_id for s in self._subscriptions if s.run_id is not None}
            for run in changes.runs:
                self._publish(await self._details(run) if run.id in watched else RunChanged(run=run))
            if len(changes.runs) < _BATCH:
                return

    async def _details(self, run: Run) -> Message:
        storage = self._durably.storage
        self.reads += 2
        try:
            steps, logs = await storage.get_steps(run.id), await storage.get_logs(run.id)
            return RunChanged(run=run, steps=steps, logs=logs)
        except NotFoundError:
            return RunDeleted(run_id=run.id)


def _check_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _logger.error("change feed ended with an error", exc_info=task.exception())
