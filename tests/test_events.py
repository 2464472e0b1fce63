"""Events (SPEC §7): every type with its fields, handlers, ordering, failures, unsubscribe."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest

from durably import ConfigurationError, Durably, Progress, StepContext, define_job

pytestmark = pytest.mark.anyio

COMMON_FIELDS = {"type", "timestamp", "sequence"}

# SPEC §7, verbatim.
SPEC_FIELDS: dict[str, set[str]] = {
    "run:trigger": {"run_id", "job_name", "input", "labels"},
    "run:start": {"run_id", "job_name", "input", "labels", "attempt", "worker_id"},
    "run:complete": {"run_id", "job_name", "output", "duration", "labels"},
    "run:fail": {"run_id", "job_name", "error", "failed_step_name", "labels"},
    "run:cancel": {"run_id", "job_name", "labels"},
    "run:retry": {"run_id", "job_name", "attempt", "labels", "next_attempt_at"},
    "run:wait": {"run_id", "job_name", "waiting_for", "wake_at", "labels"},
    "run:signal": {"run_id", "job_name", "name"},
    "run:delete": {"run_id", "job_name", "labels"},
    "run:progress": {"run_id", "job_name", "progress", "labels"},
    "step:start": {"run_id", "job_name", "step_name", "step_index"},
    "step:complete": {"run_id", "job_name", "step_name", "step_index", "output", "duration"},
    "step:fail": {"run_id", "job_name", "step_name", "step_index", "error"},
    "step:skip": {"run_id", "job_name", "step_name", "step_index"},
    "log:write": {"run_id", "job_name", "step_name", "level", "message", "data"},
    "worker:error": {"error", "context", "run_id"},
}

LABELS = {"team": "imaging"}


class Recorder:
    """Collects events; checks each has exactly the SPEC's fields as it arrives."""

    def __init__(self) -> None:
        self.events: list[Any] = []

    def __call__(self, event: Any) -> None:
        names = {field.name for field in msgspec.structs.fields(event)}
        assert names == COMMON_FIELDS | SPEC_FIELDS[event.type], event.type
        self.events.append(event)

    def of(self, event_type: str, run_id: str | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if e.type == event_type and (run_id is None or getattr(e, "run_id", None) == run_id)
        ]

    def types(self, run_id: str | None = None) -> list[str]:
        return [e.type for e in self.events if run_id is None or getattr(e, "run_id", None) == run_id]


def _two_steps(fail_first_attempt: bool) -> Any:
    attempts: list[int] = []

    @define_job(name="two-steps", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        attempts.append(1)
        first = await step.run("first", lambda: {"n": payload["n"]})
        step.log.info("between steps", n=first["n"])
        step.progress(1, 2, "half")
        if fail_first_attempt and len(attempts) == 1:
            await step.run("second", _raise, "second step broke")
        second = await step.run("second", lambda: first["n"] * 2)
        return {"result": second}

    return job


def _raise(message: str) -> None:
    raise RuntimeError(message)


async def test_a_normal_run_emits_its_events_with_their_fields(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(job=_two_steps(fail_first_attempt=False))
    recorder = Recorder()
    durably.on("*", recorder)

    run = await durably.jobs.job.trigger({"n": 21}, labels=LABELS)
    assert await durably.process_until_idle() == 1

    assert recorder.types(run.id) == [
        "run:trigger",
        "run:start",
        "step:start",
        "step:complete",
        "log:write",
        "run:progress",
        "step:start",
        "step:complete",
        "run:complete",
    ]
    for event in recorder.events:
        assert event.run_id == run.id
        assert event.job_name == "two-steps"
        assert event.timestamp.tzinfo is not None
    sequences = [e.sequence for e in recorder.events]
    assert sequences == sorted(set(sequences)), sequences
    [trigger] = recorder.of("run:trigger")
    assert (trigger.input, trigger.labels) == ({"n": 21}, LABELS)
    [start] = recorder.of("run:start")
    assert (start.input, start.labels, start.attempt) == ({"n": 21}, LABELS, 1)
    assert start.worker_id == durably.worker_id
    starts = recorder.of("step:start")
    assert [(e.step_name, e.step_index) for e in starts] == [("first", 0), ("second", 1)]
    completes = recorder.of("step:complete")
    assert [(e.step_name, e.step_index, e.output) for e in completes] == [
        ("first", 0, {"n": 21}),
        ("second", 1, 42),
    ]
    assert all(isinstance(e.duration, float) and e.duration >= 0 for e in completes)
    [log] = recorder.of("log:write")
    assert (log.step_name, log.level, log.message, log.data) == (None, "info", "between steps", {"n": 21})
    [progress] = recorder.of("run:progress")
    assert progress.progress == Progress(current=1, total=2, message="half")
    assert progress.labels == LABELS
    [complete] = recorder.of("run:complete")
    assert complete.output == {"result": 42}
    assert complete.labels == LABELS
    assert isinstance(complete.duration, float)
    assert complete.duration >= 0


async def test_a_failing_run_emits_step_fail_and_run_fail(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(job=_two_steps(fail_first_attempt=True))
    recorder = Recorder()
    durably.on("*", recorder)

    run = await durably.jobs.job.trigger({"n": 1}, labels=LABELS)
    await durably.process_until_idle()

    types = recorder.types(run.id)
    assert types[-3:] == ["step:start", "step:fail", "run:fail"]
    assert "run:complete" not in types
    [step_fail] = recorder.of("step:fail")
    assert (step_fail.step_name, step_fail.step_index, step_fail.error) == (
        "second",
        1,
        "RuntimeError: second step broke",
    )
    [run_fail] = recorder.of("run:fail")
    assert run_fail.run_id == run.id
    assert run_fail.error == "RuntimeError: second step broke"
    assert run_fail.failed_step_name == "second"
    assert run_fail.labels == LABELS


async def test_a_retried_run_emits_run_retry_and_step_skip_on_resume(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(job=_two_steps(fail_first_attempt=True))
    recorder = Recorder()
    durably.on("*", recorder)

    run = await durably.jobs.job.trigger({"n": 5}, labels=LABELS)
    await durably.process_until_idle()
    first_attempt = len(recorder.events)
    await durably.retry(run.id)
    assert await durably.process_until_idle() == 1

    resumed = recorder.events[first_attempt:]
    # The replayed body's log line and progress ran before: not emitted again (SPEC §3).
    assert [e.type for e in resumed] == [
        "run:retry",
        "run:start",
        "step:skip",
        "step:start",
        "step:complete",
        "run:complete",
    ]
    retry, start, skip = resumed[:3]
    assert (retry.run_id, retry.job_name, retry.attempt, retry.labels) == (run.id, "two-steps", 2, LABELS)
    assert start.attempt == 2
    assert (skip.run_id, skip.job_name, skip.step_name, skip.step_index) == (run.id, "two-steps", "first", 0)
    step_start = resumed[3]
    assert (step_start.step_name, step_start.step_index) == ("second", 1)
    assert resumed[-1].output == {"result": 10}


async def test_cancelling_a_pending_and_a_leased_run_emits_run_cancel(
    make_durably: Callable[..., Durably],
) -> None:
    started = anyio.Event()

    async def forever() -> None:
        started.set()
        await anyio.sleep_forever()

    @define_job(name="blocks", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        await step.run("forever", forever)

    durably = make_durably().register(job=job)
    recorder = Recorder()
    durably.on("*", recorder)

    pending = await durably.jobs.job.trigger({}, labels=LABELS)
    await durably.cancel(pending.id)
    [cancel] = recorder.of("run:cancel", pending.id)
    assert (cancel.job_name, cancel.labels) == ("blocks", LABELS)

    leased = await durably.jobs.job.trigger({"leased": True})
    with anyio.fail_after(2.5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(durably.process_one)
            await started.wait()
            await durably.cancel(leased.id)
    [cancel] = recorder.of("run:cancel", leased.id)
    assert (cancel.job_name, cancel.labels) == ("blocks", {})
    types = recorder.types(leased.id)
    assert "run:complete" not in types
    assert "run:fail" not in types
    # Cancelling an already cancelled run changes nothing and emits nothing.
    await durably.cancel(leased.id)
    assert len(recorder.of("run:cancel")) == 2


async def test_deleting_a_run_emits_run_delete(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(job=_two_steps(fail_first_attempt=False))
    recorder = Recorder()
    durably.on("run:delete", recorder)
    run = await durably.jobs.job.trigger({"n": 1}, labels=LABELS)
    await durably.process_until_idle()
    await durably.delete_run(run.id)
    [event] = recorder.events
    assert (event.type, event.run_id, event.job_name, event.labels) == (
        "run:delete",
        run.id,
        "two-steps",
        LABELS,
    )


async def test_every_event_type_is_emitted_in_order_with_tz_aware_timestamps(
    make_durably: Callable[..., Durably],
) -> None:
    @define_job(name="waits", input=Any)
    async def waits(step: StepContext, payload: Any) -> Any:
        return await step.wait_for_signal("go")

    durably = make_durably().register(job=_two_steps(fail_first_attempt=True), waits=waits)
    recorder = Recorder()
    durably.on("*", recorder)

    def broken_handler(event: Any) -> None:
        raise RuntimeError("handler broke")

    durably.on("run:delete", broken_handler)

    run = await durably.jobs.job.trigger({"n": 3}, labels=LABELS)
    await durably.process_until_idle()  # fails at step 2
    await durably.retry(run.id)
    await durably.process_until_idle()  # resumes: step:skip, completes
    other = await durably.jobs.job.trigger({"n": 4})
    await durably.cancel(other.id)
    await durably.delete_run(run.id)  # the broken handler reports worker:error
    waiting = await durably.jobs.waits.trigger({}, labels=LABELS)
    await durably.process_until_idle()  # run:wait
    await durably.signal(waiting.id, "go", 1)  # run:signal

    assert {e.type for e in recorder.events} == set(SPEC_FIELDS)
    sequences = [e.sequence for e in recorder.events]
    assert all(a < b for a, b in itertools.pairwise(sequences)), sequences
    assert all(e.timestamp.tzinfo is not None for e in recorder.events)
    assert all(e.timestamp.utcoffset() == timedelta(0) for e in recorder.events)
    stamps = [e.timestamp for e in recorder.events]
    assert stamps == sorted(stamps)


async def test_sync_and_async_handlers_and_type_specific_subscriptions(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(job=_two_steps(fail_first_attempt=False))
    sync_seen: list[str] = []
    async_seen: list[str] = []
    only_steps: list[str] = []

    async def async_handler(event: Any) -> None:
        await anyio.lowlevel.checkpoint()
        async_seen.append(event.type)

    durably.on("*", lambda event: sync_seen.append(event.type))
    durably.on("*", async_handler)
    durably.on("step:complete", lambda event: only_steps.append(event.step_name))

    await durably.jobs.job.trigger({"n": 1})
    await durably.process_until_idle()
    with anyio.fail_after(2):
        while True:
            if len(async_seen) >= len(sync_seen):
                break
            await anyio.sleep(0.01)

    assert sync_seen[0] == "run:trigger"
    assert sync_seen[-1] == "run:complete"
    assert sorted(async_seen) == sorted(sync_seen)
    assert only_steps == ["first", "second"]


async def test_a_failing_handler_is_reported_as_worker_error_and_the_run_completes(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(job=_two_steps(fail_first_attempt=False))
    errors = Recorder()
    durably.on("worker:error", errors)

    def sync_breaks(event: Any) -> None:
        raise RuntimeError(f"sync handler broke on {event.step_name}")

    async def async_breaks(event: Any) -> None:
        await anyio.lowlevel.checkpoint()
        raise LookupError("async handler broke")

    durably.on("step:complete", sync_breaks)
    durably.on("run:start", async_breaks)

    run = await durably.jobs.job.trigger({"n": 2})
    assert await durably.process_until_idle() == 1
    with anyio.fail_after(2):
        while True:
            if len(errors.events) >= 3:
                break
            await anyio.sleep(0.01)

    stored = await durably.get_run(run.id)
    assert stored is not None
    assert stored.status == "completed"
    assert stored.output == {"result": 4}
    messages = sorted(e.error for e in errors.events)
    assert messages == [
        "LookupError: async handler broke",
        "RuntimeError: sync handler broke on first",
        "RuntimeError: sync handler broke on second",
    ]
    assert all(e.run_id == run.id for e in errors.events)
    assert all(isinstance(e.context, str) and e.context for e in errors.events)


async def test_unsubscribe_stops_delivery(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(job=_two_steps(fail_first_attempt=False))
    received: list[str] = []
    kept: list[str] = []
    unsubscribe = durably.on("run:trigger", lambda event: received.append(event.run_id))
    durably.on("run:trigger", lambda event: kept.append(event.run_id))

    first = await durably.jobs.job.trigger({"n": 1})
    unsubscribe()
    second = await durably.jobs.job.trigger({"n": 2})
    unsubscribe()  # a second call is harmless

    assert received == [first.id]
    assert kept == [first.id, second.id]


async def test_an_unknown_event_type_raises_configuration_error(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably()
    with pytest.raises(ConfigurationError, match="run:finish"):
        durably.on("run:finish", lambda event: None)
    with pytest.raises(ConfigurationError):
        durably.on("", lambda event: None)
