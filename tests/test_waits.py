"""Durable waits (SPEC §12): sleep, delayed and prioritised triggers, signals, child runs."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from durably import (
    ConflictError,
    Durably,
    NotFoundError,
    Run,
    RunCancelledError,
    RunFailedError,
    StepContext,
    ValidationError,
    define_job,
)
from durably._events import Event

from .jobs import echo

pytestmark = pytest.mark.anyio


async def _stored(durably: Durably, run_id: str) -> Run:
    run = await durably.get_run(run_id)
    assert run is not None
    return run


async def _until_status(durably: Durably, run_id: str, status: str, seconds: float = 10.0) -> Run:
    """Process runs until ``run_id`` reaches ``status`` (bounded)."""
    with anyio.fail_after(seconds):
        while (run := await _stored(durably, run_id)).status != status:
            await durably.process_until_idle()
            await anyio.sleep(0.02)
    return run


# --- sleep -------------------------------------------------------------------------------


async def test_sleep_waits_without_a_lease_then_resumes(make_durably: Callable[..., Durably]) -> None:
    calls: list[str] = []

    @define_job(name="sleeper", input=Any)
    async def sleeper(step: StepContext, payload: Any) -> str:
        await step.run("before", lambda: calls.append("before"))
        await step.sleep("nap", 0.4)
        await step.run("after", lambda: calls.append("after"))
        return "done"

    durably = make_durably().register(sleeper=sleeper)
    waits: list[Event] = []
    durably.on("run:wait", waits.append)
    run = await durably.jobs.sleeper.trigger({})
    assert await durably.process_until_idle() == 1
    waiting = await _stored(durably, run.id)
    assert waiting.status == "waiting"
    assert waiting.waiting_for == "sleep"
    assert waiting.wake_at is not None and waiting.wake_at > waiting.created_at
    assert [w.waiting_for for w in waits] == ["sleep"]  # type: ignore[attr-defined]
    assert await durably.process_until_idle() == 0  # not due yet: nothing to claim
    assert [r.id for r in await durably.get_runs(status="waiting")] == [run.id]
    done = await _until_status(durably, run.id, "completed")
    assert done.output == "done"
    assert calls == ["before", "after"]  # the step before the sleep ran once


async def test_sleep_until_a_past_time_does_not_wait(make_durably: Callable[..., Durably]) -> None:
    @define_job(name="past", input=Any)
    async def past(step: StepContext, payload: Any) -> int:
        await step.sleep_until("then", datetime(2000, 1, 1, tzinfo=UTC))
        await step.sleep("zero", timedelta(0))
        return 1

    durably = make_durably().register(past=past)
    run = await durably.jobs.past.trigger({})
    await durably.process_until_idle()
    assert (await _stored(durably, run.id)).status == "completed"


async def test_sleep_arguments_are_checked(make_durably: Callable[..., Durably]) -> None:
    @define_job(name="bad_sleep", input=dict[str, Any])
    async def bad_sleep(step: StepContext, payload: dict[str, Any]) -> None:
        if payload["naive"]:
            await step.sleep_until("n", datetime(2030, 1, 1))
        await step.sleep("s", -1)

    durably = make_durably().register(bad_sleep=bad_sleep)
    naive = await durably.jobs.bad_sleep.trigger({"naive": True})
    negative = await durably.jobs.bad_sleep.trigger({"naive": False})
    await durably.process_until_idle()
    assert "timezone-aware" in ((await _stored(durably, naive.id)).error or "")
    assert "duration" in ((await _stored(durably, negative.id)).error or "")


async def test_cancel_of_a_waiting_run_is_immediate(make_durably: Callable[..., Durably]) -> None:
    @define_job(name="long_sleep", input=Any)
    async def long_sleep(step: StepContext, payload: Any) -> None:
        await step.sleep("week", timedelta(days=7))

    durably = make_durably().register(long_sleep=long_sleep)
    run = await durably.jobs.long_sleep.trigger({})
    await durably.process_until_idle()
    assert (await _stored(durably, run.id)).status == "waiting"
    assert (await durably.cancel(run.id)).status == "cancelled"
    await durably.retry(run.id)  # a retried run goes back to its sleep, which has not passed
    await durably.process_until_idle()
    again = await _stored(durably, run.id)
    assert again.status == "waiting" and again.wake_at is not None
    assert again.wake_at > datetime.now(UTC) + timedelta(days=6)


# --- trigger options --------------------------------------------------------------------


async def test_delayed_and_prioritised_triggers(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(echo=echo)
    later = await durably.jobs.echo.trigger({"n": "later"}, delay=30)
    at = await durably.jobs.echo.trigger({"n": "at"}, run_at=datetime.now(UTC) + timedelta(hours=1))
    low = await durably.jobs.echo.trigger({"n": "low"})
    [high] = await durably.jobs.echo.batch_trigger([{"n": "high"}], priority=5)
    assert later.wake_at is not None and at.wake_at is not None and high.priority == 5
    starts: list[Event] = []
    durably.on("run:start", starts.append)
    assert await durably.process_until_idle() == 2
    assert [s.run_id for s in starts] == [high.id, low.id]  # type: ignore[attr-defined]
    assert (await _stored(durably, later.id)).status == "pending"
    assert (await _stored(durably, at.id)).status == "pending"
    next_wake = await durably.next_wake_at()
    assert next_wake is not None and abs((next_wake - later.wake_at).total_seconds()) < 1e-3


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"delay": 1, "run_at": datetime.now(UTC)}, "delay and run_at"),
        ({"run_at": datetime(2030, 1, 1)}, "run_at"),
        ({"delay": -5}, "delay"),
        ({"delay": float("nan")}, "delay"),
        ({"delay": "soon"}, "delay"),
        ({"priority": 1.5}, "priority"),
        ({"priority": True}, "priority"),
    ],
)
async def test_trigger_options_are_validated(
    make_durably: Callable[..., Durably], options: dict[str, Any], field: str
) -> None:
    durably = make_durably().register(echo=echo)
    with pytest.raises(ValidationError, match=field):
        await durably.jobs.echo.trigger({}, **options)
    assert await durably.get_runs() == []  # nothing half-written


# --- signals ----------------------------------------------------------------------------


@define_job(name="approval", input=Any)
async def approval(step: StepContext, payload: Any) -> Any:
    first = await step.wait_for_signal("approve", type=dict[str, int])
    second = await step.wait_for_signal("approve")
    try:
        await step.wait_for_signal("never", timeout=0.2)
    except TimeoutError:
        late = "timed out"
    return [first, second, late]


async def test_signals_are_kept_consumed_once_and_time_out(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(approval=approval)
    sent: list[Event] = []
    durably.on("run:signal", sent.append)
    run = await durably.jobs.approval.trigger({})
    await durably.signal(run.id, "approve", {"n": 1})  # sent before the wait: kept
    await durably.signal(run.id, "other", 0)
    await durably.process_until_idle()
    waiting = await _stored(durably, run.id)
    assert (waiting.status, waiting.waiting_for) == ("waiting", "signal:approve")
    assert waiting.wake_at is None
    await durably.signal(run.id, "approve", "second")
    done = await _until_status(durably, run.id, "completed")
    assert done.output == [{"n": 1}, "second", "timed out"]
    assert [e.name for e in sent] == ["approve", "other", "approve"]  # type: ignore[attr-defined]
    with pytest.raises(ConflictError):
        await durably.signal(run.id, "approve", 3)
    with pytest.raises(NotFoundError):
        await durably.signal("no-such-run", "approve")


# --- child runs ---------------------------------------------------------------------------


@define_job(name="square", input=int)
async def square(step: StepContext, n: int) -> int:
    if n < 0:
        raise ValueError("negative")
    if n == 99:
        await step.sleep("forever", timedelta(days=1))
    return n * n


@define_job(name="fan", input=list[int])
async def fan(step: StepContext, numbers: list[int]) -> Any:
    squares = await step.run_jobs("squares", _handles["square"], numbers)
    try:
        await step.run_job("negative", _handles["square"], -1)
    except RunFailedError as exc:
        return [squares, exc.error]
    return [squares, None]


_handles: dict[str, Any] = {}


async def test_children_fan_out_with_one_slot(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably(max_concurrent_runs=1).register(square=square, fan=fan)
    _handles["square"] = durably.jobs.square
    run = await durably.jobs.fan.trigger([1, 2, 3])
    done = await _until_status(durably, run.id, "completed")
    assert done.output == [[1, 4, 9], "ValueError: negative"]
    children = await durably.get_runs(job_name="square")
    assert len(children) == 4  # exactly one child per parent and step name, replays included
    assert {child.parent_run_id for child in children} == {run.id}


async def test_cancelling_a_parent_cancels_its_children(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(square=square, fan=fan)
    _handles["square"] = durably.jobs.square
    run = await durably.jobs.fan.trigger([99])
    await durably.process_until_idle()
    parent = await _stored(durably, run.id)
    [child] = await durably.get_runs(job_name="square")
    assert (parent.status, parent.waiting_for) == ("waiting", f"runs:{child.id}")
    assert (await _stored(durably, child.id)).status == "waiting"
    await durably.cancel(run.id)
    assert (await _stored(durably, child.id)).status == "cancelled"


async def test_a_cancelled_child_raises_in_its_parent(make_durably: Callable[..., Durably]) -> None:
    @define_job(name="parent", input=Any)
    async def parent(step: StepContext, payload: Any) -> str:
        try:
            await step.run_job("child", _handles["square"], 99)
        except RunCancelledError:
            return "child cancelled"
        return "no"

    durably = make_durably().register(square=square, parent=parent)
    _handles["square"] = durably.jobs.square
    run = await durably.jobs.parent.trigger({})
    await durably.process_until_idle()
    [child] = await durably.get_runs(job_name="square")
    await durably.cancel(child.id)
    done = await _until_status(durably, run.id, "completed")
    assert done.output == "child cancelled"
