"""``define_job`` and the per-instance job handles that trigger runs."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, overload

from durably._models import LogEntry, Progress, Run, RunResult
from durably._retry import RetryPolicy, check_policy
from durably._waiters import check_timeout
from durably.errors import ConfigurationError

if TYPE_CHECKING:
    from durably._steps import StepContext

InputT = TypeVar("InputT")
OutputT = TypeVar("OutputT")

Checkpoints = Literal["sync", "pipelined"]
"""When a step's checkpoint must be acknowledged: before the next step starts, or later (SPEC §3)."""
_CHECKPOINTS = ("sync", "pipelined")

JobFunction = Callable[["StepContext", InputT], Awaitable[OutputT]]
"""What ``define_job`` wraps: ``async def job(step, payload: In) -> Out``."""

JSONData = Mapping[str, object] | list[Any] | tuple[object, ...]
"""Plain JSON-like data a payload may be given as instead of an instance of ``input``.

Only containers: a checker can then still flag a ``str``, a number or an instance of
another class passed where a Struct, a dataclass or a TypedDict is expected.
"""


class JobDefinition(Generic[InputT, OutputT]):
    """A named job: its input and output types and the async function that runs it.

    Register it on a ``Durably`` instance to trigger and execute it; ``InputT`` and
    ``OutputT`` carry the declared types to ``durably.job(definition)``.
    """

    def __init__(
        self,
        *,
        name: str,
        input: Any,
        output: Any,
        run: JobFunction[InputT, OutputT],
        retries: RetryPolicy | None = None,
        checkpoints: Checkpoints = "sync",
    ) -> None:
        self.name: str = name
        # Any: besides classes, msgspec converts to unions, Literals, Annotated…
        self.input_type: Any = input
        self.output_type: Any = Any if output is None else output
        self.run: JobFunction[InputT, OutputT] = run
        self.retries = retries
        self.checkpoints: Checkpoints = checkpoints

    def __repr__(self) -> str:
        return f"JobDefinition(name={self.name!r})"


def _check_run(name: object, run: object) -> None:
    if not callable(run) or not inspect.iscoroutinefunction(run):
        raise ConfigurationError(f"job {name!r}: run must be an async function (async def)")


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name.strip():
        raise ConfigurationError(f"job name must be a non-empty string, got {name!r}")


# Two sets of overloads, decorator then ``run=``: a class (a Struct, a dataclass, a
# TypedDict, ``dict[str, Any]``…) gives its type; anything else (``int | None``,
# ``Literal[…]``: mypy and pyright type those as objects, not classes) and ``output=None``
# give ``Any``. A ``run=`` function that does not fit falls through to the last, untyped
# overload (no checker can tell "not a class" apart); the decorator is always checked.


@overload
def define_job(
    *,
    name: str,
    input: type[InputT],
    output: type[OutputT],
    run: None = None,
    retries: RetryPolicy | None = None,
    checkpoints: Checkpoints = "sync",
) -> Callable[[JobFunction[InputT, OutputT]], JobDefinition[InputT, OutputT]]: ...


@overload
def define_job(
    *,
    name: str,
    input: type[InputT],
    output: object = None,
    run: None = None,
    retries: RetryPolicy | None = None,
    checkpoints: Checkpoints = "sync",
) -> Callable[[JobFunction[InputT, Any]], JobDefinition[InputT, Any]]: ...


@overload
def define_job(
    *,
    name: str,
    input: object,
    output: type[OutputT],
    run: None = None,
    retries: RetryPolicy | None = None,
    checkpoints: Checkpoints = "sync",
) -> Callable[[JobFunction[Any, OutputT]], JobDefinition[Any, OutputT]]: ...


@overload
def define_job(
    *,
    name: str,
    input: object,
    output: object = None,
    run: None = None,
    retries: RetryPolicy | None = None,
    checkpoints: Checkpoints = "sync",
) -> Callable[[JobFunction[Any, Any]], JobDefinition[Any, Any]]: ...


@overload
def define_job(
    *,
    name: str,
    input: type[InputT],
    output: type[OutputT],
    run: JobFunction[InputT, OutputT],
    retries: RetryPolicy | None = None,
    checkpoints: Checkpoints = "sync",
) -> JobDefinition[InputT, OutputT]: ...


@overload
def define_job(
    *,
    name: str,
    input: type[InputT],
    output: None = None,
    run: JobFunction[InputT, Any],
    retries: RetryPolicy | None = None,
    checkpoints: Checkpoints = "sync",
) -> JobDefinition[InputT, Any]: ...


@overload
def define_job(
    *,
    name: str,
    input: object,
    output: object = None,
    run: JobFunction[Any, Any],
    retries: RetryPolicy | None = None,
    checkpoints: Checkpoints = "sync",
) -> JobDefinition[Any, Any]: ...


def define_job(
    *,
    name: str,
    input: object,
    output: object = None,
    run: JobFunction[Any, Any] | None = None,
    retries: RetryPolicy | None = None,
    checkpoints: Checkpoints = "sync",
) -> JobDefinition[Any, Any] | Callable[[JobFunction[Any, Any]], JobDefinition[Any, Any]]:
    """Define a job; a decorator when ``run`` is omitted.

    ``input`` and ``output`` are any types msgspec can convert to; ``output=None``
    accepts any JSON value. ``retries`` retries a failed run with backoff (SPEC §12);
    none by default. ``checkpoints="pipelined"`` lets the next step start before the
    last one's checkpoint is acknowledged (SPEC §3; its price: docs/guarantees.md).
    Returns a ``JobDefinition``, not the function.
    """
    _check_name(name)
    policy = check_policy(retries, f"job {name!r}")
    if checkpoints not in _CHECKPOINTS:
        raise ConfigurationError(
            f"job {name!r}: checkpoints must be 'sync' or 'pipelined', got {checkpoints!r}"
        )
    if input is None:
        raise ConfigurationError(f"job {name!r}: input= is required (use dict[str, Any] for free-form JSON)")

    def build(fn: JobFunction[Any, Any]) -> JobDefinition[Any, Any]:
        _check_run(name, fn)
        return JobDefinition(
            name=name, input=input, output=output, run=fn, retries=policy, checkpoints=checkpoints
        )

    if run is None:
        return build
    return build(run)


class RunStarter(Protocol):
    """What a handle needs of its instance: start runs and wait for their results."""

    async def trigger(
        self,
        definition: JobDefinition[Any, Any],
        payloads: Sequence[Any],
        *,
        idempotency_key: str | None = None,
        concurrency_key: str | None = None,
        labels: dict[str, str] | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: int = 0,
    ) -> list[Run]: ...

    async def result(
        self,
        definition: JobDefinition[Any, OutputT],
        run: Run,
        *,
        timeout: float | None,
        on_progress: Callable[[Progress], Any] | None,
        on_log: Callable[[LogEntry], Any] | None,
    ) -> RunResult[OutputT]: ...


class JobHandle(Generic[InputT, OutputT]):
    """A job registered on one ``Durably`` instance: ``durably.jobs.<name>``."""

    def __init__(self, runs: RunStarter, definition: JobDefinition[InputT, OutputT]) -> None:
        self._runs = runs
        self.definition = definition

    @property
    def name(self) -> str:
        return self.definition.name

    async def trigger(
        self,
        payload: InputT | JSONData,
        *,
        idempotency_key: str | None = None,
        concurrency_key: str | None = None,
        labels: dict[str, str] | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: int = 0,
    ) -> Run:
        """Validate ``payload`` and write a new ``pending`` run (or return the idempotent one).

        ``delay`` (seconds or timedelta) or ``run_at`` (aware datetime): not claimed before
        then, by the database clock. ``priority``: higher is claimed first.
        """
        [run] = await self._runs.trigger(
            self.definition,
            [payload],
            idempotency_key=idempotency_key,
            concurrency_key=concurrency_key,
            labels=labels,
            delay=delay,
            run_at=run_at,
            priority=priority,
        )
        return run

    async def batch_trigger(
        self,
        payloads: Sequence[InputT | JSONData],
        *,
        labels: dict[str, str] | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: int = 0,
    ) -> list[Run]:
        """Validate every payload, then write them all atomically in one round trip."""
        if isinstance(payloads, (str, bytes, dict)) or not isinstance(payloads, Sequence):
            raise ConfigurationError("batch_trigger() takes a list of payloads")
        return await self._runs.trigger(
            self.definition, list(payloads), labels=labels, delay=delay, run_at=run_at, priority=priority
        )

    async def trigger_and_wait(
        self,
        payload: InputT | JSONData,
        *,
        timeout: float | None = None,
        on_progress: Callable[[Progress], Any] | None = None,
        on_log: Callable[[LogEntry], Any] | None = None,
        idempotency_key: str | None = None,
        concurrency_key: str | None = None,
        labels: dict[str, str] | None = None,
        delay: float | timedelta | None = None,
        run_at: datetime | None = None,
        priority: int = 0,
    ) -> RunResult[OutputT]:
        """Trigger a run and wait until it ends, wherever it executes.

        Raises ``RunFailedError``, ``RunCancelledError``, or ``TimeoutError`` (the
        run itself goes on).
        """
        check_timeout(timeout)  # before anything is written
        run = await self.trigger(
            payload,
            idempotency_key=idempotency_key,
            concurrency_key=concurrency_key,
            labels=labels,
            delay=delay,
            run_at=run_at,
            priority=priority,
        )
        return await self._runs.result(
            self.definition, run, timeout=timeout, on_progress=on_progress, on_log=on_log
        )

    def __repr__(self) -> str:
        return f"JobHandle(name={self.name!r})"


class Jobs:
    """The registered job handles: ``durably.jobs.name`` or ``durably.jobs["name"]``.

    A read-only view of the registry it is given; it has no methods of its own, so
    no job name is shadowed by one.
    """

    def __init__(self, handles: Mapping[str, JobHandle[Any, Any]]) -> None:
        self._handles = handles

    def __getattr__(self, key: str) -> JobHandle[Any, Any]:
        try:
            return self._handles[key]
        except KeyError:
            raise AttributeError(
                f"no job registered as {key!r}; registered: {sorted(self._handles)}"
            ) from None

    def __getitem__(self, key: str) -> JobHandle[Any, Any]:
        try:
            return self._handles[key]
        except KeyError:
            raise KeyError(f"no job registered as {key!r}; registered: {sorted(self._handles)}") from None

    def __contains__(self, key: object) -> bool:
        return key in self._handles

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self) -> int:
        return len(self._handles)
