"""What a job sees of its run: ``StepContext`` (``step``) and ``step.log``."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from functools import partial
from types import UnionType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from durably import _codec, _threads
from durably._models import LogLevel, Progress
from durably._retry import RetryPolicy, check_policy, check_timeout
from durably._waits import ChildJob, Waits

if TYPE_CHECKING:
    from typing import _SpecialForm

    from durably._storage._protocol import WaitRequest, WaitResult

T = TypeVar("T")
OutT = TypeVar("OutT")


class _Run(Protocol):
    """The execution a context belongs to (``durably._runtime.Execution``)."""

    run_id: str
    job_name: str
    attempt: int

    async def step(
        self,
        name: str,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        type_: Any,
        retries: RetryPolicy | None,
        timeout: float | None,
    ) -> Any: ...

    def progress(self, current: float, total: float | None, message: str | None) -> None: ...

    def log(self, level: LogLevel, message: str, data: dict[str, Any]) -> None: ...

    async def begin_step(self, name: str) -> int: ...

    def stored_step(self, name: str) -> bytes | None: ...

    async def wait(self, request: WaitRequest) -> WaitResult: ...


class StepLog:
    """``step.log``: messages stored with the run, emitted as ``log:write``, sent to structlog."""

    def __init__(self, execution: _Run) -> None:
        self._execution = execution

    def info(self, message: str, **data: Any) -> None:
        self._execution.log("info", message, data)

    def warn(self, message: str, **data: Any) -> None:
        self._execution.log("warn", message, data)

    def error(self, message: str, **data: Any) -> None:
        self._execution.log("error", message, data)


class StepContext:
    """What a job receives as ``step``: checkpointed steps, progress and logs of one run."""

    def __init__(self, execution: _Run) -> None:
        self._execution = execution
        self.run_id = execution.run_id
        self.job_name = execution.job_name
        #: The run's attempt number: 1, then one more per retry, manual or automatic.
        self.attempt = execution.attempt
        self.log = StepLog(execution)
        self._waits = Waits(execution)

    @overload
    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        type: None = None,
        retries: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> Any: ...

    @overload
    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        type: type[T],
        retries: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> T: ...

    # A type that is not a class (``X | None``, ``Literal[…]``) converts too, but checkers
    # cannot make a type of it: Any. Not ``object``: mypy would fall back to this overload
    # (and miss the mismatch) where ``x: str = await step.run(…, type=ImageOut)``.
    @overload
    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        type: UnionType | _SpecialForm,
        retries: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> Any: ...

    async def run(
        self,
        name: str,
        fn: Callable[..., Any],
        *args: Any,
        type: Any = None,
        retries: RetryPolicy | None = None,
        timeout: float | timedelta | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` once and store its result under ``name``.

        On resume the stored result is returned without calling ``fn``. Either
        way the value is the result as decoded from its stored JSON (converted to
        ``type`` when given). Sync functions run in a worker thread. ``retries``
        tries a failing ``fn`` again with backoff; past ``timeout`` seconds an
        attempt fails with ``TimeoutError`` (a sync function's thread runs on, its
        late result discarded).
        """
        where = f"step {name!r}"
        policy, seconds = check_policy(retries, where), check_timeout(timeout, where)
        return await self._execution.step(name, fn, args, kwargs, type, policy, seconds)

    def progress(self, current: float, total: float | None = None, message: str | None = None) -> None:
        """Report progress: emitted at once, stored within a second (the last value always lands)."""
        self._execution.progress(current, total, message)

    async def sleep(self, name: str, duration: float | timedelta) -> None:
        """A durable timer: the run waits ``duration`` (database clock) holding no slot."""
        await self._waits.sleep(name, duration)

    async def sleep_until(self, name: str, when: datetime) -> None:
        """A durable timer until ``when`` (a timezone-aware datetime)."""
        await self._waits.sleep_until(name, when)

    async def wait_for_signal(
        self, name: str, *, timeout: float | timedelta | None = None, type: Any = None
    ) -> Any:
        """Wait for ``durably.signal(run_id, name, payload)``; its payload (converted to ``type``).

        A signal sent earlier is kept for this wait. ``timeout`` (durable too) raises
        ``TimeoutError`` here, which the job may catch.
        """
        return await self._waits.wait_for_signal(name, timeout=timeout, type_=type)

    async def run_job(self, name: str, handle: ChildJob[OutT], payload: Any, **options: Any) -> OutT:
        """Trigger a child run exactly once and wait for its output without holding a slot.

        ``options``: ``trigger()``'s ``concurrency_key``, ``labels``, ``delay``, ``run_at``,
        ``priority``. A failed or cancelled child raises ``RunFailedError``/``RunCancelledError``.
        """
        [output] = await self._waits.run_jobs(name, handle, [payload], options)
        return output  # type: ignore[no-any-return]

    async def run_jobs(
        self, name: str, handle: ChildJob[OutT], payloads: Sequence[Any], **options: Any
    ) -> list[OutT]:
        """Trigger one child run per payload in one write; their outputs once all have ended."""
        return await self._waits.run_jobs(name, handle, payloads, options)


def encode_result(name: str, value: Any, type_: Any) -> bytes:
    """A step result as JSON; a ``ValidationError`` naming the step when it would not come back as is."""
    return _codec.canonical(value, Any if type_ is None else type_, what=f"the result of step {name!r}")


def checked_progress(current: int | float, total: int | float | None, message: str | None) -> Progress:
    """The arguments of ``step.progress()``, checked and kept as given (``1`` stays an int)."""
    for name, value in (("current", current), ("total", total)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise TypeError(f"step.progress(): {name} must be a number, got {value!r}")
        # JSON stores NaN and infinities as null, which would make the run unreadable.
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"step.progress(): {name} must be a finite number, got {value!r}")
    if message is not None and not isinstance(message, str):
        raise TypeError(f"step.progress(): message must be a string, got {message!r}")
    return Progress(current, total, message)


async def call_step_function(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Await an async step function; run a sync one on a worker thread."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kwargs)
    value = await _threads.run_sync(partial(fn, *args, **kwargs))
    if inspect.isawaitable(value):
        value = await value
    return value
