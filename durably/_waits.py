"""Durable waits on the step side: sleep, signals, child runs (SPEC §12).

Each wait is one fenced storage write that either resolves it or leaves the run
``waiting`` with its lease released; the execution then unwinds with ``Suspend`` and
ends quietly. Any worker that later claims the run replays the body to the wait,
which then finds its resolution stored (or, for a sleep, its deadline passed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

import msgspec

from durably import _clock, _codec
from durably._storage._protocol import WaitRequest, WaitResult
from durably._triggering import check_text, epoch, new_runs, seconds
from durably.errors import RunCancelledError, RunFailedError, ValidationError

OutT_co = TypeVar("OutT_co", covariant=True)


class ChildDefinition(Protocol[OutT_co]):
    """A child's job (``JobDefinition``), typed by its output."""

    @property
    def name(self) -> str: ...

    @property
    def input_type(self) -> Any: ...

    @property
    def output_type(self) -> Any: ...

    @property
    def run(self) -> Callable[[Any, Any], Awaitable[OutT_co]]: ...


class ChildJob(Protocol[OutT_co]):
    """What ``run_job`` takes: a job handle (``durably.jobs.<name>``)."""

    @property
    def definition(self) -> ChildDefinition[OutT_co]: ...


class Suspend(BaseException):
    """The run now waits: unwinds the job body past its ``except Exception`` clauses.

    Private: the execution catches it; a job never needs to.
    """


class _Execution(Protocol):
    run_id: str

    async def begin_step(self, name: str) -> int: ...

    def stored_step(self, name: str) -> bytes | None: ...

    async def wait(self, request: WaitRequest) -> WaitResult: ...


def _convert(value: Any, type_: Any, what: str) -> Any:
    if type_ is None:
        return value
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        raise ValidationError(f"{what} does not fit {type_!r}: {exc}") from exc


class Waits:
    """The waits of one execution; counts signal waits so the n-th wait of a name replays as such."""

    def __init__(self, execution: _Execution) -> None:
        self._execution = execution
        self._signals: dict[str, int] = {}

    async def sleep(self, name: str, duration: float | timedelta) -> None:
        await self._sleep(name, timer=seconds("duration", duration), deadline=None)

    async def sleep_until(self, name: str, when: datetime) -> None:
        await self._sleep(name, timer=None, deadline=epoch("when", when))

    async def _sleep(self, name: str, *, timer: float | None, deadline: float | None) -> None:
        index = await self._execution.begin_step(name)
        stored = self._execution.stored_step(name)
        # Elapsed by this host's clock: no round trip. Otherwise the database clock decides.
        if stored is not None and float(_codec.decode(stored)) <= _clock.now():
            return
        request = WaitRequest(
            key=name, index=index, waiting_for="sleep", timer_key=name, timer=timer, deadline=deadline
        )
        await self._execution.wait(request)

    async def wait_for_signal(self, name: str, *, timeout: float | timedelta | None, type_: Any) -> Any:
        check_text("signal name", name, empty=False)
        timer = None if timeout is None else seconds("timeout", timeout)
        count = self._signals[name] = self._signals.get(name, 0) + 1
        key = f"signal:{name}" if count == 1 else f"signal:{name}#{count}"
        index = await self._execution.begin_step(key)
        stored = self._execution.stored_step(key)
        if stored is None:
            request = WaitRequest(
                key=key,
                index=index,
                waiting_for=f"signal:{name}",
                timer_key=None if timer is None else f"{key}@deadline",
                timer=timer,
                signal=name,
            )
            stored = (await self._execution.wait(request)).output
        assert stored is not None
        resolution = _codec.decode(stored)
        if "timeout" in resolution:
            raise TimeoutError(f"no signal {name!r} came within the timeout of {timeout!r}")
        return _convert(resolution["signal"], type_, f"the payload of signal {name!r}")

    async def run_jobs(
        self, name: str, handle: ChildJob[Any], payloads: Sequence[Any], options: dict[str, Any]
    ) -> list[Any]:
        definition = handle.definition
        run_id = self._execution.run_id
        if isinstance(payloads, (str, bytes, dict)) or not isinstance(payloads, Sequence):
            raise ValidationError("run_jobs() takes a list of payloads")
        index = await self._execution.begin_step(name)
        stored = self._execution.stored_step(name)
        if stored is None:
            keys = [f"{run_id}/{name}/{i}" for i in range(len(payloads))]
            children = new_runs(definition, payloads, idempotency_keys=keys, parent_run_id=run_id, **options)
            if not children:
                return []
            request = WaitRequest(key=name, index=index, waiting_for="runs", children=tuple(children))
            stored = (await self._execution.wait(request)).output
        assert stored is not None
        return [_child_output(child, definition.output_type) for child in _codec.decode(stored)]


def _child_output(outcome: list[Any], output_type: Any) -> Any:
    """A child's output, or the error of a child that failed or was cancelled."""
    child_id, status, output, error = outcome
    if status == "failed":
        raise RunFailedError(child_id, error)
    if status == "cancelled":
        raise RunCancelledError(child_id)
    return _convert(output, output_type, f"the output of child run {child_id}")
