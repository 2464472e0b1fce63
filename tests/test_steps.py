"""``StepContext``: step.run, results and resume, failures, progress, logs (SPEC §3)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
import structlog.testing

from durably import Durably, Progress, Run, StepContext, define_job
from durably._events import Event, RunFailEvent

pytestmark = pytest.mark.anyio


class Point(msgspec.Struct):
    x: int
    y: int


async def _run_once(durably: Durably, handle: str, payload: Any = None) -> Run:
    """Trigger one run, execute everything claimable, return the run as stored."""
    run = await durably.jobs[handle].trigger({} if payload is None else payload)
    await durably.process_until_idle()
    stored = await durably.get_run(run.id)
    assert stored is not None
    return stored


async def _resume(durably: Durably, run_id: str) -> Run:
    """Retry a failed run and execute it again."""
    await durably.retry(run_id)
    assert await durably.process_until_idle() == 1
    stored = await durably.get_run(run_id)
    assert stored is not None
    return stored


# --- calling the step function ------------------------------------------------------


async def test_step_run_passes_args_and_kwargs(make_durably: Callable[..., Durably]) -> None:
    def combine(a: int, b: str, *, c: float, d: list[int]) -> dict[str, Any]:
        return {"a": a, "b": b, "c": c, "d": d}

    async def acombine(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"args": list(args), "kwargs": kwargs}

    @define_job(name="args", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        first = await step.run("sync", combine, 1, "two", c=3.5, d=[4])
        second = await step.run("async", acombine, "x", 2, key="value")
        return [first, second]

    durably = make_durably().register(job=job)
    run = await _run_once(durably, "job")
    assert run.status == "completed", run.error
    assert run.output == [
        {"a": 1, "b": "two", "c": 3.5, "d": [4]},
        {"args": ["x", 2], "kwargs": {"key": "value"}},
    ]


async def test_sync_steps_run_in_a_worker_thread_and_async_steps_on_the_loop(
    make_durably: Callable[..., Durably],
) -> None:
    loop_thread = threading.get_ident()
    seen: dict[str, int] = {}

    def sync_fn() -> str:
        seen["sync"] = threading.get_ident()
        return "sync"

    async def async_fn() -> str:
        await anyio.lowlevel.checkpoint()  # a real coroutine, awaited by durably
        seen["async"] = threading.get_ident()
        return "async"

    @define_job(name="threads", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        seen["body"] = threading.get_ident()
        return [await step.run("s", sync_fn), await step.run("a", async_fn)]

    durably = make_durably().register(job=job)
    run = await _run_once(durably, "job")
    assert run.status == "completed", run.error
    assert run.output == ["sync", "async"]
    assert seen["body"] == loop_thread
    assert seen["sync"] != loop_thread
    assert seen["async"] == loop_thread


async def test_a_sync_step_does_not_block_the_event_loop(make_durably: Callable[..., Durably]) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.01)
            ticks += 1

    def nap() -> str:
        time.sleep(0.3)
        return "slept"

    @define_job(name="slow-sync", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        return await step.run("sleep", nap)

    durably = make_durably().register(job=job)
    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        run = await _run_once(durably, "job")
        tg.cancel_scope.cancel()
    assert run.output == "slept"
    # The loop kept ticking while the thread slept (30 would be perfect; any is proof).
    assert ticks >= 5


# --- results: first execution and resume agree ------------------------------------------


async def test_a_step_result_is_the_same_on_first_execution_and_on_resume(
    make_durably: Callable[..., Durably],
) -> None:
    returned: list[dict[str, Any]] = []
    calls = {"tuple": 0, "struct": 0, "typed": 0, "native": 0}

    def make_tuple() -> tuple[int, str]:
        calls["tuple"] += 1
        return (1, "a")

    def make_struct() -> Point:
        calls["struct"] += 1
        return Point(x=1, y=2)

    def make_typed() -> dict[str, int]:
        calls["typed"] += 1
        return {"x": 3, "y": 4}

    def make_native() -> dict[str, Any]:
        calls["native"] += 1
        return {"i": 1, "f": 1.5, "b": True, "n": None, "s": "é", "l": [1, [2]]}

    @define_job(name="resume-values", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        values = {
            "tuple": await step.run("tuple", make_tuple),
            "struct": await step.run("struct", make_struct),
            "typed": await step.run("typed", make_typed, type=Point),
            "native": await step.run("native", make_native),
        }
        returned.append(values)
        if len(returned) == 1:
            raise RuntimeError("fail after the steps, once")
        return "done"

    durably = make_durably().register(job=job)
    first = await _run_once(durably, "job")
    assert first.status == "failed"
    assert first.error == "RuntimeError: fail after the steps, once"
    second = await _resume(durably, first.id)
    assert second.status == "completed", second.error

    expected = {
        "tuple": [1, "a"],
        "struct": {"x": 1, "y": 2},
        "typed": Point(x=3, y=4),
        "native": {"i": 1, "f": 1.5, "b": True, "n": None, "s": "é", "l": [1, [2]]},
    }
    assert returned == [expected, expected]
    for values in returned:
        assert type(values["tuple"]) is list
        assert type(values["struct"]) is dict
        assert type(values["typed"]) is Point
    # On resume every stored result was reused: no step function ran twice.
    assert calls == {"tuple": 1, "struct": 1, "typed": 1, "native": 1}


async def test_type_converts_the_result_of_an_async_step(make_durably: Callable[..., Durably]) -> None:
    async def point() -> dict[str, int]:
        return {"x": 5, "y": 6}

    @define_job(name="typed", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        value = await step.run("p", point, type=Point)
        assert isinstance(value, Point)
        return value.x + value.y

    durably = make_durably().register(job=job)
    run = await _run_once(durably, "job")
    assert run.status == "completed", run.error
    assert run.output == 11


async def test_an_unencodable_result_fails_the_run_naming_the_step(
    make_durably: Callable[..., Durably],
) -> None:
    after: list[str] = []

    @define_job(name="unencodable", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        await step.run("make-an-object", object)
        after.append("ran on")
        return "unreachable"

    durably = make_durably().register(job=job)
    run = await _run_once(durably, "job")
    assert run.status == "failed"
    assert run.error is not None
    assert "make-an-object" in run.error
    assert after == []
    steps = await durably.get_steps(run.id)
    assert [(s.name, s.status) for s in steps] == [("make-an-object", "failed")]


# --- step names ----------------------------------------------------------------------


async def test_a_duplicate_step_name_raises_value_error_the_job_can_catch(
    make_durably: Callable[..., Durably],
) -> None:
    calls: list[str] = []

    @define_job(name="dup-caught", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        await step.run("same", lambda: calls.append("first"))
        try:
            await step.run("same", lambda: calls.append("second"))
        except ValueError as exc:
            return f"caught: {exc}"
        return "not raised"

    durably = make_durably().register(job=job)
    run = await _run_once(durably, "job")
    assert run.status == "completed", run.error
    assert run.output.startswith("caught: ")
    assert "same" in run.output
    assert calls == ["first"]


async def test_an_uncaught_duplicate_step_name_fails_the_run(make_durably: Callable[..., Durably]) -> None:
    @define_job(name="dup-uncaught", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        await step.run("same", lambda: 1)
        await step.run("same", lambda: 2)
        return "not raised"

    durably = make_durably().register(job=job)
    run = await _run_once(durably, "job")
    assert run.status == "failed"
    assert run.error is not None
    assert run.error.startswith("ValueError: ")
    assert "same" in run.error


# --- failures -------------------------------------------------------------------------


async def test_a_failing_step_fails_the_run_and_is_not_retried(make_durably: Callable[..., Durably]) -> None:
    calls: list[str] = []
    failures: list[Event] = []

    def explode() -> None:
        calls.append("explode")
        raise KeyError("missing-thing")

    def boom() -> None:
        calls.append("boom")
        raise RuntimeError("the step broke")

    @define_job(name="failing", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        await step.run("fine", lambda: "ok")
        await step.run("boom", boom)
        await step.run("never", explode)
        return "unreachable"

    durably = make_durably().register(job=job)
    durably.on("run:fail", failures.append)
    run = await _run_once(durably, "job")

    assert run.status == "failed"
    assert run.error == "RuntimeError: the step broke"
    assert run.completed_at is not None
    steps = await durably.get_steps(run.id)
    assert [(s.name, s.index, s.status, s.output, s.error) for s in steps] == [
        ("fine", 0, "completed", "ok", None),
        ("boom", 1, "failed", None, "RuntimeError: the step broke"),
    ]
    [event] = failures
    assert isinstance(event, RunFailEvent)
    assert event.failed_step_name == "boom"
    assert event.error == "RuntimeError: the step broke"

    # durably does not retry by itself: nothing is claimable, the step ran once.
    assert await durably.process_until_idle() == 0
    await anyio.sleep(0.1)
    assert await durably.process_until_idle() == 0
    assert calls == ["boom"]
    stored = await durably.get_run(run.id)
    assert stored is not None
    assert stored.status == "failed"
    assert stored.attempt == 1


async def test_an_async_step_failure_and_a_body_failure_are_stored_as_exc_type_message(
    make_durably: Callable[..., Durably],
) -> None:
    class CustomError(Exception):
        pass

    async def fails() -> None:
        raise CustomError("async step said no")

    failures: list[RunFailEvent] = []

    @define_job(name="async-fail", input=dict[str, Any])
    async def in_step(step: StepContext, payload: dict[str, Any]) -> Any:
        await step.run("a", fails)

    @define_job(name="body-fail", input=dict[str, Any])
    async def in_body(step: StepContext, payload: dict[str, Any]) -> Any:
        await step.run("ok", lambda: 1)
        raise ZeroDivisionError("the body divided by zero")

    durably = make_durably().register(in_step=in_step, in_body=in_body)
    durably.on("run:fail", failures.append)
    step_run = await _run_once(durably, "in_step")
    body_run = await _run_once(durably, "in_body")

    assert step_run.error == "CustomError: async step said no"
    assert body_run.error == "ZeroDivisionError: the body divided by zero"
    by_run = {event.run_id: event for event in failures}
    assert by_run[step_run.id].failed_step_name == "a"
    assert by_run[body_run.id].failed_step_name is None
    steps = await durably.get_steps(body_run.id)
    assert [(s.name, s.status) for s in steps] == [("ok", "completed")]


# --- progress -------------------------------------------------------------------------


async def test_progress_is_stored_while_the_run_is_executing(make_durably: Callable[..., Durably]) -> None:
    reported = anyio.Event()
    release = anyio.Event()

    async def wait_for_release() -> str:
        await release.wait()
        return "released"

    @define_job(name="progress-live", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        step.progress(3, 10, "three of ten")
        reported.set()
        return await step.run("wait", wait_for_release)

    durably = make_durably().register(job=job)
    run = await durably.jobs.job.trigger({})
    async with anyio.create_task_group() as tg:
        tg.start_soon(durably.process_one)
        with anyio.fail_after(2):
            await reported.wait()
            # Persisted within a second (throttled); poll with a generous bound.
            while True:
                stored = await durably.get_run(run.id)
                assert stored is not None
                if stored.progress is not None:
                    break
                await anyio.sleep(0.02)
            assert stored.status == "leased"
            assert stored.progress == Progress(current=3, total=10, message="three of ten")
        release.set()


async def test_the_last_progress_value_lands_when_many_are_reported_quickly(
    make_durably: Callable[..., Durably],
) -> None:
    @define_job(name="progress-burst", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        for i in range(1, 501):
            step.progress(i, 500, f"item {i}")
            if i % 100 == 0:
                await step.run(f"chunk-{i}", lambda: None)
        for i in range(501, 1001):
            step.progress(i, 1000)
        return "done"

    durably = make_durably().register(job=job)
    run = await _run_once(durably, "job")
    assert run.status == "completed", run.error
    assert run.progress is not None
    assert (run.progress.current, run.progress.total, run.progress.message) == (1000, 1000, None)


async def test_progress_reported_just_before_failing_lands(make_durably: Callable[..., Durably]) -> None:
    @define_job(name="progress-then-fail", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        step.progress(1, 2)
        step.progress(2, 2, "almost")
        raise RuntimeError("late failure")

    durably = make_durably().register(job=job)
    run = await _run_once(durably, "job")
    assert run.status == "failed"
    assert run.progress is not None
    assert (run.progress.current, run.progress.total, run.progress.message) == (2, 2, "almost")


async def test_progress_keeps_the_number_types_it_was_given(make_durably: Callable[..., Durably]) -> None:
    @define_job(name="progress-types", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        step.progress(*payload["progress"])
        for bad in (float("nan"), float("inf")):
            try:
                step.progress(bad, 3)  # JSON would store null: the run could no longer be read
            except ValueError as exc:
                refused.append(str(exc))
        return "done"

    refused: list[str] = []
    durably = make_durably().register(job=job)
    seen: list[Progress] = []
    durably.on("run:progress", lambda event: seen.append(event.progress))
    for given in ([1, 3], [0.5, 2.0], [2, None]):
        run = await _run_once(durably, "job", {"progress": given})
        assert run.status == "completed", run.error
        [emitted] = seen
        seen.clear()
        for progress in (emitted, run.progress):
            assert progress is not None
            assert [progress.current, progress.total] == given
            assert [type(progress.current), type(progress.total)] == [type(v) for v in given]
    expected = [f"step.progress(): current must be a finite number, got {v}" for v in ("nan", "inf")]
    assert refused == expected * 3


# --- logs -----------------------------------------------------------------------------


async def test_step_log_lines_are_stored_and_sent_to_structlog(make_durably: Callable[..., Durably]) -> None:
    async def logging_step(step: StepContext) -> str:
        step.log.warn("inside an async step", attempt=1)
        return "ok"

    @define_job(name="logging", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        step.log.info("starting", count=3, tags=["a", "b"])
        await step.run("work", logging_step, step)
        step.log.error("finished badly", code=7)
        return "done"

    durably = make_durably().register(job=job)
    with structlog.testing.capture_logs() as captured:
        run = await _run_once(durably, "job")
    assert run.status == "completed", run.error

    logs = await durably.get_logs(run.id)
    assert [(e.level, e.message, e.data, e.step_name) for e in logs] == [
        ("info", "starting", {"count": 3, "tags": ["a", "b"]}, None),
        ("warn", "inside an async step", {"attempt": 1}, "work"),
        ("error", "finished badly", {"code": 7}, None),
    ]
    assert all(e.created_at is not None and e.created_at.tzinfo is not None for e in logs)

    by_message = {entry["event"]: entry for entry in captured}
    for message, level in (
        ("starting", "info"),
        ("inside an async step", "warning"),
        ("finished badly", "error"),
    ):
        entry = by_message[message]
        assert entry["run_id"] == run.id
        assert entry["job_name"] == "logging"
        assert entry["log_level"] == level
    assert by_message["starting"]["count"] == 3
    assert by_message["finished badly"]["code"] == 7


async def test_step_log_and_progress_work_from_inside_a_sync_step(
    make_durably: Callable[..., Durably],
) -> None:
    # A sync step runs on a worker thread; logging and progress from there are natural.
    def crunch(step: StepContext) -> int:
        step.log.info("crunching", rows=42)
        step.progress(42, 42, "crunched")
        return 42

    @define_job(name="sync-logging", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        return await step.run("crunch", crunch, step)

    durably = make_durably().register(job=job)
    run = await _run_once(durably, "job")
    assert run.status == "completed", run.error
    logs = await durably.get_logs(run.id)
    assert [(e.level, e.message, e.data, e.step_name) for e in logs] == [
        ("info", "crunching", {"rows": 42}, "crunch")
    ]
    assert run.progress is not None
    assert (run.progress.current, run.progress.message) == (42, "crunched")


async def test_logs_written_before_a_failure_are_kept(make_durably: Callable[..., Durably]) -> None:
    @define_job(name="log-then-fail", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        step.log.info("about to fail")
        raise RuntimeError("failed after logging")

    durably = make_durably().register(job=job)
    run = await _run_once(durably, "job")
    assert run.status == "failed"
    logs = await durably.get_logs(run.id)
    assert [(e.level, e.message) for e in logs] == [("info", "about to fail")]


# --- identity -------------------------------------------------------------------------


async def test_step_exposes_run_id_and_job_name(make_durably: Callable[..., Durably]) -> None:
    @define_job(name="who-am-i", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        return {"run_id": step.run_id, "job_name": step.job_name}

    durably = make_durably().register(handle_name=job)
    run = await _run_once(durably, "handle_name")
    assert run.status == "completed", run.error
    assert run.output == {"run_id": run.id, "job_name": "who-am-i"}
