"""Event types and the in-process emitter behind ``durably.on()``."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Literal, TypeAlias

import msgspec
import structlog

from durably import _clock
from durably._models import LogLevel, Progress
from durably.errors import ConfigurationError

_logger = structlog.get_logger("durably")


class Event(msgspec.Struct, kw_only=True):
    """Fields every event has; ``sequence`` increases per durably instance."""

    type: str
    timestamp: datetime
    sequence: int


class RunTriggerEvent(Event, kw_only=True):
    type: Literal["run:trigger"] = "run:trigger"
    run_id: str
    job_name: str
    input: Any
    labels: dict[str, str]


class RunStartEvent(Event, kw_only=True):
    type: Literal["run:start"] = "run:start"
    run_id: str
    job_name: str
    input: Any
    labels: dict[str, str]
    attempt: int
    worker_id: str


class RunCompleteEvent(Event, kw_only=True):
    type: Literal["run:complete"] = "run:complete"
    run_id: str
    job_name: str
    output: Any
    duration: float
    labels: dict[str, str]


class RunFailEvent(Event, kw_only=True):
    type: Literal["run:fail"] = "run:fail"
    run_id: str
    job_name: str
    error: str
    failed_step_name: str | None
    labels: dict[str, str]


class RunCancelEvent(Event, kw_only=True):
    type: Literal["run:cancel"] = "run:cancel"
    run_id: str
    job_name: str
    labels: dict[str, str]


class RunRetryEvent(Event, kw_only=True):
    type: Literal["run:retry"] = "run:retry"
    run_id: str
    job_name: str
    attempt: int
    labels: dict[str, str]
    #: When an automatic retry becomes claimable (database clock); None for a manual ``retry()``.
    next_attempt_at: datetime | None = None


class RunWaitEvent(Event, kw_only=True):
    type: Literal["run:wait"] = "run:wait"
    run_id: str
    job_name: str
    waiting_for: str
    wake_at: datetime | None
    labels: dict[str, str]


class RunSignalEvent(Event, kw_only=True):
    type: Literal["run:signal"] = "run:signal"
    run_id: str
    job_name: str
    name: str


class RunDeleteEvent(Event, kw_only=True):
    type: Literal["run:delete"] = "run:delete"
    run_id: str
    job_name: str
    labels: dict[str, str]


class RunProgressEvent(Event, kw_only=True):
    type: Literal["run:progress"] = "run:progress"
    run_id: str
    job_name: str
    progress: Progress
    labels: dict[str, str]


class StepStartEvent(Event, kw_only=True):
    type: Literal["step:start"] = "step:start"
    run_id: str
    job_name: str
    step_name: str
    step_index: int


class StepCompleteEvent(Event, kw_only=True):
    type: Literal["step:complete"] = "step:complete"
    run_id: str
    job_name: str
    step_name: str
    step_index: int
    output: Any
    duration: float


class StepFailEvent(Event, kw_only=True):
    type: Literal["step:fail"] = "step:fail"
    run_id: str
    job_name: str
    step_name: str
    step_index: int
    error: str


class StepSkipEvent(Event, kw_only=True):
    type: Literal["step:skip"] = "step:skip"
    run_id: str
    job_name: str
    step_name: str
    step_index: int


class LogWriteEvent(Event, kw_only=True):
    type: Literal["log:write"] = "log:write"
    run_id: str
    job_name: str
    step_name: str | None
    level: LogLevel
    message: str
    data: dict[str, Any]


class WorkerErrorEvent(Event, kw_only=True):
    type: Literal["worker:error"] = "worker:error"
    error: str
    context: str
    run_id: str | None = None


def _type_name(cls: type[Event]) -> str:
    return next(str(f.default) for f in msgspec.structs.fields(cls) if f.name == "type")


EVENT_TYPES: dict[str, type[Event]] = {
    _type_name(cls): cls
    for cls in (
        RunTriggerEvent,
        RunStartEvent,
        RunCompleteEvent,
        RunFailEvent,
        RunCancelEvent,
        RunRetryEvent,
        RunWaitEvent,
        RunSignalEvent,
        RunDeleteEvent,
        RunProgressEvent,
        StepStartEvent,
        StepCompleteEvent,
        StepFailEvent,
        StepSkipEvent,
        LogWriteEvent,
        WorkerErrorEvent,
    )
}

_TYPE_NAMES: dict[type[Event], str] = {cls: name for name, cls in EVENT_TYPES.items()}
# The event classes that carry their run's labels.
RUN_LABELLED: frozenset[type[Event]] = frozenset(
    cls for cls in EVENT_TYPES.values() if "labels" in cls.__struct_fields__
)

Handler: TypeAlias = Callable[[Any], Awaitable[None] | None]


class EventBus:
    """Calls handlers in the emitting process; a failing handler never breaks a run."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}
        self._sequence = 0
        self._tasks: set[Any] = set()
        self._depth = 0
        self._deferred: list[dict[str, Any]] = []

    def on(self, event_type: str, handler: Handler) -> Callable[[], None]:
        if not isinstance(event_type, str) or (event_type != "*" and event_type not in EVENT_TYPES):
            known = ", ".join(sorted(EVENT_TYPES))
            raise ConfigurationError(f"unknown event type {event_type!r}; use '*' or one of: {known}")
        if not callable(handler):
            raise ConfigurationError(f"event handler for {event_type!r} must be callable")
        handlers = self._handlers.setdefault(event_type, [])
        handlers.append(handler)

        def unsubscribe() -> None:
            if handler in handlers:
                handlers.remove(handler)

        return unsubscribe

    def wants(self, event_type: str) -> bool:
        """Whether anyone listens; lets hot paths skip building events nobody reads."""
        return bool(self._handlers.get(event_type) or self._handlers.get("*"))

    def listens(self, event_class: type[Event]) -> bool:
        """``wants`` for an event class: what a run checks before building an event's fields."""
        return self.wants(_TYPE_NAMES[event_class])

    def emit(self, event_class: type[Event], **fields: Any) -> None:
        event_type = _TYPE_NAMES[event_class]
        handlers = [*self._handlers.get(event_type, ()), *self._handlers.get("*", ())]
        if not handlers:
            return
        self._sequence += 1
        event = event_class(
            timestamp=_clock.to_datetime(_clock.now()),  # type: ignore[arg-type]
            sequence=self._sequence,
            **fields,
        )
        self._depth += 1
        try:
            for handler in handlers:
                try:
                    result = handler(event)
                    if inspect.isawaitable(result):
                        self._spawn(result, event)
                except Exception as exc:
                    self._handler_failed(exc, event)
        finally:
            self._depth -= 1
        if not self._depth:
            # Errors of handlers go out after the event that caused them reached everyone.
            while self._deferred:
                self.emit(WorkerErrorEvent, **self._deferred.pop(0))

    def _spawn(self, awaitable: Awaitable[None], event: Event) -> None:
        async def guarded() -> None:
            try:
                await awaitable
            except Exception as exc:
                self._handler_failed(exc, event)

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handler_failed(self, exc: Exception, event: Event) -> None:
        _logger.error("event handler failed", event_type=event.type, exc_info=exc)
        if event.type == "worker:error":
            return  # reporting a failing error handler to itself would never end
        report = {
            "error": f"{type(exc).__name__}: {exc}",
            "context": f"event handler for {event.type}",
            "run_id": getattr(event, "run_id", None),
        }
        if self._depth:
            self._deferred.append(report)
        else:
            self.emit(WorkerErrorEvent, **report)

    async def drain(self, *, timeout: float) -> None:
        """Wait up to ``timeout`` for this loop's async handlers still running (on shutdown)."""
        loop = asyncio.get_running_loop()
        tasks = {task for task in self._tasks if task.get_loop() is loop}
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
