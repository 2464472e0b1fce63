"""The run API: reading runs, steps and logs; retry, retrigger, cancel, delete, purge, wait."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest

from durably import (
    ConflictError,
    Durably,
    LogEntry,
    NotFoundError,
    Run,
    Step,
    StepContext,
    ValidationError,
    define_job,
)

pytestmark = pytest.mark.anyio

UNKNOWN_ID = "01HZZZZZZZZZZZZZZZZZZZZZZZ"


class Behaviour:
    """What the jobs below do, and what they observed; reset before every test."""

    step_one_calls: int
    fail_step_two: bool
    block: bool
    nap_started: anyio.Event
    nap_exited: anyio.Event
    nap_finished_normally: bool

    def reset(self) -> None:
        self.step_one_calls = 0
        self.fail_step_two = True
        self.block = True
        self.nap_started = anyio.Event()
        self.nap_exited = anyio.Event()
        self.nap_finished_normally = False


behaviour = Behaviour()


@pytest.fixture(autouse=True)
def _reset_behaviour() -> None:
    behaviour.reset()


@define_job(name="add", input=dict[str, Any])
async def add_job(step: StepContext, payload: dict[str, Any]) -> int:
    total = await step.run("sum", lambda: payload["a"] + payload["b"])
    return int(total)


@define_job(name="other", input=dict[str, Any])
async def other_job(step: StepContext, payload: dict[str, Any]) -> str:
    return "other"


def _step_one() -> str:
    behaviour.step_one_calls += 1
    return "one"


def _step_two() -> str:
    if behaviour.fail_step_two:
        raise ValueError("step two is not ready")
    return "two"


@define_job(name="flaky", input=dict[str, Any])
async def flaky_job(step: StepContext, payload: dict[str, Any]) -> list[str]:
    one = await step.run("one", _step_one)
    two = await step.run("two", _step_two)
    return [one, two]


async def _nap() -> str:
    behaviour.nap_started.set()
    try:
        if behaviour.block:
            await anyio.sleep(30)
        behaviour.nap_finished_normally = True
        return "rested"
    finally:
        behaviour.nap_exited.set()


@define_job(name="napper", input=dict[str, Any])
async def napper_job(step: StepContext, payload: dict[str, Any]) -> str:
    await step.run("one", _step_one)
    return str(await step.run("nap", _nap))


@define_job(name="logger", input=dict[str, Any])
async def logger_job(step: StepContext, payload: dict[str, Any]) -> None:
    step.log.info("starting", n=1)

    async def inside() -> int:
        step.log.warn("inside the step", detail={"x": [1, 2]})
        return 5

    await step.run("work", inside)
    step.log.error("done badly", code="E1")


@define_job(name="broken", input=dict[str, Any])
async def broken_job(step: StepContext, payload: dict[str, Any]) -> None:
    await step.run("fine", lambda: {"ok": True})

    def explode() -> None:
        raise ValueError("bad input")

    await step.run("explode", explode)


ALL_JOBS = {
    "add": add_job,
    "other": other_job,
    "flaky": flaky_job,
    "napper": napper_job,
    "logger": logger_job,
    "broken": broken_job,
}


def _is_utc(value: datetime | None) -> bool:
    return value is not None and value.tzinfo is not None and value.utcoffset() == timedelta(0)


async def _completed_run(instance: Durably, a: int = 1, b: int = 2, **options: Any) -> Run:
    run = await instance.jobs.add.trigger({"a": a, "b": b}, **options)
    await instance.process_until_idle()
    done = await instance.wait_for_run(run.id, timeout=5)
    assert done.status == "completed"
    return done


async def _failed_run(instance: Durably) -> Run:
    run = await instance.jobs.broken.trigger({})
    await instance.process_until_idle()
    done = await instance.wait_for_run(run.id, timeout=5)
    assert done.status == "failed"
    return done


async def _leased_napper(instance: Durably) -> Run:
    """A napper run executing its long step on ``instance``'s worker."""
    run = await instance.jobs.napper.trigger({})
    await instance.init()
    with anyio.fail_after(5):
        await behaviour.nap_started.wait()
    leased = await instance.get_run(run.id)
    assert leased is not None
    assert leased.status == "leased"
    return leased


# --- reading -------------------------------------------------------------------------------


async def test_get_run_returns_the_run_or_none(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    assert await instance.get_run(UNKNOWN_ID) is None
    run = await instance.jobs.add.trigger({"a": 1, "b": 2}, labels={"k": "v"})
    fetched = await instance.get_run(run.id)
    assert fetched is not None
    assert (fetched.id, fetched.job_name, fetched.status, fetched.input, fetched.labels) == (
        run.id,
        "add",
        "pending",
        {"a": 1, "b": 2},
        {"k": "v"},
    )
    assert _is_utc(fetched.created_at)
    assert fetched.started_at is None
    assert fetched.completed_at is None
    assert await instance.storage.get_run(run.id) == fetched


async def test_a_finished_run_carries_output_and_utc_timestamps(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    done = await _completed_run(instance, 2, 3)
    assert done.output == 5
    assert done.error is None
    assert _is_utc(done.created_at)
    assert _is_utc(done.started_at)
    assert _is_utc(done.completed_at)
    assert done.created_at <= done.started_at <= done.completed_at  # type: ignore[operator]


async def test_get_runs_is_newest_first_and_filters(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    completed = await _completed_run(instance)
    failed = await _failed_run(instance)
    pending_add = await instance.jobs.add.trigger({"a": 0, "b": 0})
    pending_other = await instance.jobs.other.trigger({})

    def ids(runs: list[Run]) -> list[str]:
        return [run.id for run in runs]

    everything = [pending_other.id, pending_add.id, failed.id, completed.id]
    assert ids(await instance.get_runs()) == everything
    assert ids(await instance.get_runs(status="pending")) == [pending_other.id, pending_add.id]
    assert ids(await instance.get_runs(status=["completed", "failed"])) == [failed.id, completed.id]
    assert ids(await instance.get_runs(job_name="add")) == [pending_add.id, completed.id]
    assert ids(await instance.get_runs(job_name=["other", "broken"])) == [pending_other.id, failed.id]
    assert ids(await instance.get_runs(job_name="add", status="pending")) == [pending_add.id]
    assert await instance.get_runs(job_name="nothing-like-this") == []
    assert ids(await instance.get_runs(limit=2)) == everything[:2]
    assert ids(await instance.get_runs(limit=2, offset=1)) == everything[1:3]
    assert ids(await instance.get_runs(offset=3)) == everything[3:]
    assert await instance.get_runs(offset=10) == []


@pytest.mark.parametrize(
    "options",
    [
        {"status": "done"},
        {"status": ["pending", "running"]},
        {"limit": 0},
        {"limit": -1},
        {"offset": -1},
        {"status": 5},
        {"job_name": 5},
        {"job_name": ["add", 3]},
    ],
    ids=[
        "unknown-status",
        "unknown-status-in-list",
        "zero-limit",
        "negative-limit",
        "negative-offset",
        "int-status",
        "int-job-name",
        "int-in-job-name-list",
    ],
)
async def test_get_runs_refuses_bad_filters(
    make_durably: Callable[..., Durably], options: dict[str, Any]
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    with pytest.raises(ValidationError):
        await instance.get_runs(**options)


async def test_get_steps_returns_the_persisted_steps(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    failed = await _failed_run(instance)
    steps = await instance.get_steps(failed.id)
    assert all(isinstance(step, Step) for step in steps)
    assert [(s.name, s.index, s.status, s.output, s.error) for s in steps] == [
        ("fine", 0, "completed", {"ok": True}, None),
        ("explode", 1, "failed", None, "ValueError: bad input"),
    ]
    for step in steps:
        assert _is_utc(step.started_at)
        assert _is_utc(step.completed_at)
        assert step.started_at <= step.completed_at  # type: ignore[operator]
    assert failed.error == "ValueError: bad input"


async def test_get_steps_of_a_run_without_steps_is_empty(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await instance.jobs.add.trigger({"a": 1, "b": 1})
    assert await instance.get_steps(run.id) == []
    assert await instance.get_logs(run.id) == []


async def test_get_logs_returns_what_the_job_logged(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await instance.jobs.logger.trigger({})
    await instance.process_until_idle()
    done = await instance.wait_for_run(run.id, timeout=5)
    assert done.status == "completed"
    logs = await instance.get_logs(run.id)
    assert all(isinstance(entry, LogEntry) for entry in logs)
    assert [(e.level, e.message, e.data, e.step_name) for e in logs] == [
        ("info", "starting", {"n": 1}, None),
        ("warn", "inside the step", {"detail": {"x": [1, 2]}}, "work"),
        ("error", "done badly", {"code": "E1"}, None),
    ]
    assert all(_is_utc(entry.created_at) for entry in logs)


# --- retry and retrigger -------------------------------------------------------------------


async def test_retry_of_a_failed_run_resumes_after_the_last_completed_step(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await instance.jobs.flaky.trigger({})
    await instance.process_until_idle()
    failed = await instance.wait_for_run(run.id, timeout=5)
    assert failed.status == "failed"
    assert failed.error == "ValueError: step two is not ready"
    assert failed.attempt == 1

    behaviour.fail_step_two = False
    retried = await instance.retry(run.id)
    assert retried.id == run.id
    assert retried.status == "pending"
    assert retried.attempt == 2
    assert retried.error is None
    assert await instance.process_until_idle() == 1
    done = await instance.wait_for_run(run.id, timeout=5)
    assert done.status == "completed"
    assert done.output == ["one", "two"]
    assert done.attempt == 2
    assert behaviour.step_one_calls == 1
    steps = await instance.get_steps(run.id)
    assert [(s.name, s.status, s.output) for s in steps] == [
        ("one", "completed", "one"),
        ("two", "completed", "two"),
    ]


async def test_retry_of_a_cancelled_run_resumes_after_the_last_completed_step(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await _leased_napper(instance)
    await instance.cancel(run.id)
    cancelled = await instance.wait_for_run(run.id, timeout=5)
    assert cancelled.status == "cancelled"

    behaviour.block = False
    retried = await instance.retry(run.id)
    assert retried.status == "pending"
    assert retried.attempt == 2
    done = await instance.wait_for_run(run.id, timeout=5)
    assert done.status == "completed"
    assert done.output == "rested"
    assert done.attempt == 2
    assert behaviour.step_one_calls == 1


async def test_retry_of_a_cancelled_pending_run(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await instance.jobs.add.trigger({"a": 4, "b": 4})
    await instance.cancel(run.id)
    retried = await instance.retry(run.id)
    assert (retried.status, retried.attempt) == ("pending", 2)
    assert await instance.process_until_idle() == 1
    done = await instance.wait_for_run(run.id, timeout=5)
    assert (done.status, done.output, done.attempt) == ("completed", 8, 2)


async def test_retry_of_a_completed_pending_or_leased_run_conflicts(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    completed = await _completed_run(instance)
    with pytest.raises(ConflictError):
        await instance.retry(completed.id)
    pending = await instance.jobs.add.trigger({"a": 1, "b": 1})
    with pytest.raises(ConflictError):
        await instance.retry(pending.id)
    leased = await _leased_napper(instance)
    with pytest.raises(ConflictError):
        await instance.retry(leased.id)
    after = await instance.get_run(completed.id)
    assert after is not None
    assert (after.status, after.attempt) == ("completed", 1)
    await instance.cancel(leased.id)  # or closing the instance waits for the 30 s step


async def test_retrigger_creates_a_new_run_with_the_same_input_and_labels(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    original = await _completed_run(instance, 3, 4, labels={"team": "red"}, idempotency_key="once")
    again = await instance.retrigger(original.id)
    assert again.id != original.id
    assert again.job_name == "add"
    assert again.status == "pending"
    assert again.disposition == "created"
    assert again.attempt == 1
    assert again.input == original.input == {"a": 3, "b": 4}
    assert again.labels == {"team": "red"}
    assert {r.id for r in await instance.get_runs(labels={"team": "red"})} == {original.id, again.id}
    assert again.output is None
    assert len(await instance.get_runs()) == 2
    assert await instance.process_until_idle() == 1
    done = await instance.wait_for_run(again.id, timeout=5)
    assert (done.status, done.output) == ("completed", 7)
    still = await instance.get_run(original.id)
    assert still is not None
    assert still.status == "completed"


# --- cancel -----------------------------------------------------------------------------------


async def test_cancel_of_a_pending_run_is_immediate(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await instance.jobs.add.trigger({"a": 1, "b": 1})
    cancelled = await instance.cancel(run.id)
    assert cancelled.status == "cancelled"
    stored = await instance.get_run(run.id)
    assert stored is not None
    assert stored.status == "cancelled"
    assert _is_utc(stored.completed_at)
    assert await instance.process_until_idle() == 0


async def test_cancel_of_a_leased_run_stops_its_step_within_a_second(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await _leased_napper(instance)
    await instance.cancel(run.id)
    with anyio.fail_after(1.0):
        await behaviour.nap_exited.wait()
    assert not behaviour.nap_finished_normally
    await _assert_stopped_after_step_one(instance, instance, run.id)


async def _assert_stopped_after_step_one(executor: Durably, reader: Durably, run_id: str) -> None:
    """The cancelled napper stays cancelled once its worker stopped; only step one was stored."""
    done = await executor.wait_for_run(run_id, timeout=1)
    assert done.status == "cancelled"
    await executor.stop(timeout=1)  # whatever the worker still does is done now
    after = await reader.get_run(run_id)
    assert after is not None
    assert after.status == "cancelled"
    steps = {step.name: step.status for step in await executor.get_steps(run_id)}
    assert steps == {"one": "completed"}


async def test_cancel_from_another_instance_stops_the_run_within_a_second(
    make_durably: Callable[..., Durably],
) -> None:
    executor = make_durably().register(**ALL_JOBS)
    other = make_durably().register(**ALL_JOBS)
    await other.migrate()  # no worker here
    run = await _leased_napper(executor)
    cancelled = await other.cancel(run.id)
    assert cancelled.status == "cancelled"
    with anyio.fail_after(1.0):
        await behaviour.nap_exited.wait()
    assert not behaviour.nap_finished_normally
    await _assert_stopped_after_step_one(executor, other, run.id)


async def test_cancel_of_a_completed_or_failed_run_conflicts(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    completed = await _completed_run(instance)
    failed = await _failed_run(instance)
    for run in (completed, failed):
        with pytest.raises(ConflictError):
            await instance.cancel(run.id)
        after = await instance.get_run(run.id)
        assert after is not None
        assert after.status == run.status


async def test_cancel_of_a_cancelled_run_leaves_it_as_is(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await instance.jobs.add.trigger({"a": 1, "b": 1})
    first = await instance.cancel(run.id)
    events: list[Any] = []
    instance.on("run:cancel", events.append)
    second = await instance.cancel(run.id)
    assert second.status == "cancelled"
    assert second.completed_at == first.completed_at
    assert second.attempt == first.attempt
    assert events == []


# --- delete and purge --------------------------------------------------------------------------


async def test_delete_run_refuses_pending_and_leased_runs(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    pending = await instance.jobs.add.trigger({"a": 1, "b": 1})
    with pytest.raises(ConflictError):
        await instance.delete_run(pending.id)
    leased = await _leased_napper(instance)
    with pytest.raises(ConflictError):
        await instance.delete_run(leased.id)
    assert await instance.get_run(pending.id) is not None
    assert await instance.get_run(leased.id) is not None
    assert [step.name for step in await instance.get_steps(leased.id)] == ["one"]
    await instance.cancel(leased.id)  # or closing the instance waits for the 30 s step


async def test_delete_run_removes_the_run_its_steps_and_logs(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await instance.jobs.logger.trigger({}, labels={"team": "red"})
    await instance.process_until_idle()
    keep = await _completed_run(instance, labels={"team": "red"})
    assert await instance.get_steps(run.id)
    assert await instance.get_logs(run.id)
    await instance.delete_run(run.id)
    assert await instance.get_run(run.id) is None
    # Steps or logs left behind would still be returned for the id.
    with pytest.raises(NotFoundError):
        await instance.get_steps(run.id)
    with pytest.raises(NotFoundError):
        await instance.get_logs(run.id)
    assert [r.id for r in await instance.get_runs(labels={"team": "red"})] == [keep.id]
    assert await instance.get_steps(keep.id)


async def test_delete_run_works_for_failed_and_cancelled_runs(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    failed = await _failed_run(instance)
    cancelled = await instance.jobs.add.trigger({"a": 1, "b": 1})
    await instance.cancel(cancelled.id)
    for run_id in (failed.id, cancelled.id):
        await instance.delete_run(run_id)
        assert await instance.get_run(run_id) is None
    assert await instance.get_runs() == []


async def test_purge_runs_deletes_only_ended_runs(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    completed = await _completed_run(instance)
    failed = await _failed_run(instance)
    cancelled = await instance.jobs.add.trigger({"a": 1, "b": 1})
    await instance.cancel(cancelled.id)
    pending = await instance.jobs.add.trigger({"a": 2, "b": 2})
    await anyio.sleep(0.02)  # the ended runs are now strictly older than "now"

    assert await instance.purge_runs(timedelta(hours=1)) == 0
    assert len(await instance.get_runs()) == 4
    assert await instance.purge_runs(timedelta(0)) == 3
    assert [run.id for run in await instance.get_runs()] == [pending.id]
    for run in (completed, failed):
        with pytest.raises(NotFoundError):
            await instance.get_steps(run.id)
    assert await instance.get_run(cancelled.id) is None


async def test_purge_runs_takes_a_datetime_and_a_limit(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    for i in range(3):
        await _completed_run(instance, i, i)
    await instance.jobs.add.trigger({"a": 9, "b": 9})
    assert await instance.purge_runs(datetime.now(UTC) - timedelta(hours=1)) == 0
    future = datetime.now(UTC) + timedelta(minutes=5)
    assert await instance.purge_runs(future, limit=2) == 2
    assert len(await instance.get_runs(status="completed")) == 1
    assert await instance.purge_runs(future, limit=2) == 1
    assert await instance.purge_runs(future) == 0
    assert [run.status for run in await instance.get_runs()] == ["pending"]


async def test_purge_runs_refuses_bad_arguments(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    with pytest.raises(ValidationError):
        await instance.purge_runs(datetime.now() + timedelta(minutes=5))  # a naive datetime
    with pytest.raises(ValidationError):
        await instance.purge_runs(30)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        await instance.purge_runs(timedelta(0), limit=0)


# --- wait_for_run ------------------------------------------------------------------------------


async def test_wait_for_run_returns_terminal_runs_of_every_status(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    completed = await instance.jobs.add.trigger({"a": 1, "b": 1})
    failed = await instance.jobs.broken.trigger({})
    cancelled = await instance.jobs.add.trigger({"a": 2, "b": 2})
    await instance.cancel(cancelled.id)
    await instance.init()
    statuses = {}
    for run in (completed, failed, cancelled):
        done = await instance.wait_for_run(run.id, timeout=5)
        assert done.id == run.id
        statuses[run.id] = done.status
    assert statuses == {completed.id: "completed", failed.id: "failed", cancelled.id: "cancelled"}
    done = await instance.wait_for_run(completed.id, timeout=5)
    assert done.output == 2


async def test_wait_for_run_sees_a_cancel_made_while_waiting(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await _leased_napper(instance)
    results: list[Run] = []

    async def wait() -> None:
        results.append(await instance.wait_for_run(run.id, timeout=5))

    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        await anyio.sleep(0.05)
        await instance.cancel(run.id)
    assert [r.status for r in results] == ["cancelled"]


async def test_wait_for_run_times_out(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await instance.jobs.add.trigger({"a": 1, "b": 1})  # no worker: stays pending
    with pytest.raises(TimeoutError):
        await instance.wait_for_run(run.id, timeout=0.1)
    stored = await instance.get_run(run.id)
    assert stored is not None
    assert stored.status == "pending"


# --- unknown ids -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method",
    ["get_steps", "get_logs", "retry", "retrigger", "cancel", "delete_run", "wait_for_run"],
)
async def test_an_unknown_run_id_raises_not_found(make_durably: Callable[..., Durably], method: str) -> None:
    instance = make_durably().register(**ALL_JOBS)
    await instance.jobs.add.trigger({"a": 1, "b": 1})  # the database is not empty
    with pytest.raises(NotFoundError, match=UNKNOWN_ID):
        await getattr(instance, method)(UNKNOWN_ID)
    assert len(await instance.get_runs()) == 1
