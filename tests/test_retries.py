"""Automatic retries with backoff, step timeouts, NonRetryableError and step.attempt (SPEC §12)."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import pytest
from anyio import to_thread

from durably import (
    ConfigurationError,
    Durably,
    NonRetryableError,
    RetryPolicy,
    Run,
    StepContext,
    define_job,
)

from .conftest import Database

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_attempts=3, initial_delay=0.01, jitter=False)


class Calls:
    """What the jobs below did; reset before every test."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.attempts: list[int] = []  # step.attempt, per body execution
        self.step: int = 0  # calls of the step function
        self.before: int = 0  # calls of the step before the failing one
        self.fail_times = 0
        self.error: type[Exception] = RuntimeError
        self.cancelled = False


calls = Calls()


@pytest.fixture(autouse=True)
def _reset() -> None:
    calls.reset()


def _before() -> str:
    calls.before += 1
    return "done"


def _flaky() -> str:
    calls.step += 1
    if calls.step <= calls.fail_times:
        raise calls.error(f"attempt {calls.step} failed")
    return "ok"


async def _body(step: StepContext, payload: dict[str, Any]) -> str:
    calls.attempts.append(step.attempt)
    await step.run("before", _before)
    result: str = await step.run("flaky", _flaky)
    return result


retried = define_job(name="retried", input=dict[str, Any], run=_body, retries=FAST)
retried_only_lookup = define_job(
    name="retried-lookup",
    input=dict[str, Any],
    run=_body,
    retries=RetryPolicy(max_attempts=3, initial_delay=0.01, retry_on=(LookupError,)),
)
slow_retry = define_job(
    name="slow-retry", input=dict[str, Any], run=_body, retries=RetryPolicy(initial_delay=60, jitter=False)
)
short_retry = define_job(
    name="short-retry", input=dict[str, Any], run=_body, retries=RetryPolicy(initial_delay=1.0, jitter=False)
)
no_retry = define_job(name="no-retry", input=dict[str, Any], run=_body)


@define_job(name="step-retries", input=dict[str, Any])
async def step_retries(step: StepContext, payload: dict[str, Any]) -> str:
    retry_on = (LookupError,) if payload.get("lookup_only") else (Exception,)
    policy = RetryPolicy(
        max_attempts=payload.get("max", 3), initial_delay=payload.get("delay", 0.01), retry_on=retry_on
    )
    result: str = await step.run("flaky", _flaky, retries=policy)
    return result


async def _hang_async() -> str:
    try:
        await anyio.sleep(30)
    except BaseException:
        calls.cancelled = True
        raise
    return "late"


def _hang_sync() -> str:
    calls.step += 1
    time.sleep(0.6)
    return "late"


async def _slow_first_time() -> str:
    calls.step += 1
    if calls.step == 1:
        await anyio.sleep(30)
    return "in time"


@define_job(name="timeouts", input=dict[str, Any])
async def timeouts(step: StepContext, payload: dict[str, Any]) -> str:
    kind = payload["kind"]
    if kind == "retried":
        return str(await step.run("slow", _slow_first_time, timeout=0.2, retries=FAST))
    fn = _hang_async if kind == "async" else _hang_sync
    return str(await step.run("slow", fn, timeout=timedelta(seconds=0.2)))


JOBS = {
    "retried": retried,
    "retried_lookup": retried_only_lookup,
    "slow_retry": slow_retry,
    "short_retry": short_retry,
    "no_retry": no_retry,
    "step_retries": step_retries,
    "timeouts": timeouts,
}


@pytest.fixture
def durably(make_durably: Callable[..., Durably]) -> Durably:
    return make_durably().register(**JOBS)


def _record(durably: Durably) -> list[Any]:
    seen: list[Any] = []
    durably.on("*", seen.append)
    return seen


def _types(events: list[Any], *types: str) -> list[Any]:
    return [event for event in events if event.type in types]


async def _outcome(durably: Durably, run_id: str) -> Run:
    """Work until the run has ended, backoffs included (a backing-off run is not claimable yet)."""
    async with durably:
        return await durably.wait_for_run(run_id, timeout=10)


# --- the policy -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": True}, "max_attempts"),
        ({"initial_delay": -1}, "initial_delay"),
        ({"initial_delay": float("nan")}, "initial_delay"),
        ({"backoff": 0.5}, "backoff"),
        ({"max_delay": "5"}, "max_delay"),
        ({"jitter": 1}, "jitter"),
        ({"retry_on": (ValueError, "x")}, "retry_on"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError, match=field):
        RetryPolicy(**options)


def test_delays_grow_by_the_backoff_up_to_the_maximum() -> None:
    policy = RetryPolicy(
        initial_delay=timedelta(seconds=2), backoff=3, max_delay=timedelta(seconds=30), jitter=False
    )
    assert [policy.delay(n) for n in range(1, 6)] == [2, 6, 18, 30, 30]
    assert policy.delay(10**9) == 30  # no overflow however many attempts


def test_jitter_draws_between_half_and_all_of_the_delay() -> None:
    policy = RetryPolicy(initial_delay=10)
    delays = {policy.delay(1) for _ in range(200)}
    assert min(delays) >= 5 and max(delays) <= 10 and len(delays) > 1


def test_retries_and_timeout_are_checked() -> None:
    with pytest.raises(ConfigurationError, match="retries"):
        define_job(name="x", input=dict, run=_body, retries=3)  # type: ignore[call-overload]


async def test_a_bad_step_timeout_fails_the_step_naming_it(durably: Durably) -> None:
    @define_job(name="bad-timeout", input=dict[str, Any])
    async def bad(step: StepContext, payload: dict[str, Any]) -> str:
        return str(await step.run("s", _before, timeout=0))

    durably.register(bad=bad)
    run = await durably.jobs.bad.trigger({})
    await durably.process_until_idle()
    done = await durably.get_run(run.id)
    assert done is not None and done.status == "failed"
    assert done.error is not None and done.error.startswith("ConfigurationError: step 's': timeout")
    assert calls.before == 0


# --- job retries --------------------------------------------------------------------


async def test_a_failing_run_is_retried_with_backoff_and_resumes_after_its_completed_steps(
    durably: Durably,
) -> None:
    calls.fail_times = 2
    events = _record(durably)
    run = await durably.jobs.retried.trigger({})
    done = await _outcome(durably, run.id)
    assert done.status == "completed", done.error
    assert done.attempt == 3 and done.error is None and done.wake_at is None
    assert calls.attempts == [1, 2, 3]
    assert calls.before == 1  # completed steps are kept across retries
    retries = _types(events, "run:retry")
    assert [e.attempt for e in retries] == [2, 3]
    assert all(e.next_attempt_at is not None for e in retries)
    assert _types(events, "run:fail") == []


async def test_the_final_failure_alone_emits_run_fail(durably: Durably) -> None:
    calls.fail_times = 99
    events = _record(durably)
    run = await durably.jobs.retried.trigger({})
    done = await _outcome(durably, run.id)
    assert done.status == "failed" and done.attempt == 3
    assert done.error == "RuntimeError: attempt 3 failed"
    assert calls.step == 3
    assert len(_types(events, "run:retry")) == 2
    [fail] = _types(events, "run:fail")
    assert fail.failed_step_name == "flaky"


async def test_a_backing_off_run_is_pending_with_wake_at_on_the_database_clock(durably: Durably) -> None:
    calls.fail_times = 1
    events = _record(durably)
    run = await durably.jobs.slow_retry.trigger({})
    before = datetime.now(UTC)
    assert await durably.process_one()
    waiting = await durably.get_run(run.id)
    assert waiting is not None
    assert (waiting.status, waiting.attempt) == ("pending", 2)
    assert waiting.error == "RuntimeError: attempt 1 failed"
    assert waiting.wake_at is not None
    assert before + timedelta(seconds=50) < waiting.wake_at < before + timedelta(seconds=70)
    [retry] = _types(events, "run:retry")
    assert retry.next_attempt_at == waiting.wake_at
    assert not await durably.process_one()  # not claimable before wake_at
    assert calls.step == 1


async def test_no_policy_means_no_automatic_retry(durably: Durably) -> None:
    calls.fail_times = 1
    run = await durably.jobs.no_retry.trigger({})
    done = await _outcome(durably, run.id)
    assert (done.status, done.attempt, calls.step) == ("failed", 1, 1)


async def test_a_manual_retry_emits_run_retry_without_next_attempt_at(durably: Durably) -> None:
    calls.fail_times = 1
    events = _record(durably)
    run = await durably.jobs.no_retry.trigger({})
    await durably.process_until_idle()
    await durably.retry(run.id)
    [retry] = _types(events, "run:retry")
    assert retry.attempt == 2 and retry.next_attempt_at is None


@pytest.mark.parametrize(("job", "error"), [("retried", NonRetryableError), ("retried_lookup", ValueError)])
async def test_a_non_retryable_error_fails_the_run_at_once(
    durably: Durably, job: str, error: type[Exception]
) -> None:
    calls.fail_times, calls.error = 99, error
    events = _record(durably)
    run = await durably.jobs[job].trigger({})
    done = await _outcome(durably, run.id)
    assert (done.status, done.attempt, calls.step) == ("failed", 1, 1)
    assert _types(events, "run:retry") == []


# --- step retries -------------------------------------------------------------------


async def test_a_step_is_retried_in_place_and_stores_its_attempts(durably: Durably) -> None:
    calls.fail_times = 2
    events = _record(durably)
    run = await durably.jobs.step_retries.trigger({})
    done = await _outcome(durably, run.id)
    assert (done.status, done.output, done.attempt, calls.step) == ("completed", "ok", 1, 3)
    [step] = await durably.get_steps(run.id)
    assert (step.status, step.error) == ("completed", None)
    assert len(_types(events, "step:start")) == 1 and _types(events, "step:fail") == []


async def test_a_step_out_of_attempts_fails_the_run(durably: Durably) -> None:
    calls.fail_times = 99
    run = await durably.jobs.step_retries.trigger({"max": 2})
    done = await _outcome(durably, run.id)
    assert (done.status, done.error, calls.step) == ("failed", "RuntimeError: attempt 2 failed", 2)
    [step] = await durably.get_steps(run.id)
    assert step.status == "failed" and step.completed_at is not None


@pytest.mark.parametrize(("error", "payload"), [(NonRetryableError, {}), (ValueError, {"lookup_only": True})])
async def test_a_non_retryable_step_error_fails_at_once(
    durably: Durably, error: type[Exception], payload: dict[str, Any]
) -> None:
    calls.fail_times, calls.error = 99, error
    run = await durably.jobs.step_retries.trigger(payload)
    done = await _outcome(durably, run.id)
    assert (done.status, calls.step) == ("failed", 1)


async def test_a_step_backoff_longer_than_a_lease_frees_the_slot(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably(stale_threshold=0.5, heartbeat_interval=0.1, max_concurrent_runs=1).register(
        **JOBS
    )
    calls.fail_times = 1
    order: list[str] = []
    durably.on("run:complete", lambda e: order.append(e.run_id))
    first = await durably.jobs.step_retries.trigger({"delay": 1.5})
    async with durably:
        with anyio.fail_after(10):
            while True:  # the first run has failed once and is backing off
                stored = await durably.get_run(first.id)
                assert stored is not None
                if stored.status == "pending" and stored.wake_at is not None:
                    break
                await anyio.sleep(0.02)
        second = await durably.jobs.no_retry.trigger({})
        done = await durably.wait_for_run(second.id, timeout=10)
        assert done.status == "completed"  # ran while the first one waited, on the only slot
        first_done = await durably.wait_for_run(first.id, timeout=10)
    assert first_done.status == "completed" and first_done.attempt == 1
    assert order == [second.id, first.id]
    assert calls.step == 3  # the first run twice, the second once


# --- step timeouts ---------------------------------------------------------------------


async def test_an_async_step_past_its_timeout_is_cancelled_and_fails(durably: Durably) -> None:
    run = await durably.jobs.timeouts.trigger({"kind": "async"})
    started = time.monotonic()
    done = await _outcome(durably, run.id)
    assert done.status == "failed"
    assert done.error == "TimeoutError: step 'slow' ran longer than its timeout of 0.2 s"
    assert calls.cancelled
    assert time.monotonic() - started < 20  # far less than the 30 s sleep: it was cut short


async def test_a_sync_step_past_its_timeout_fails_and_its_late_result_is_discarded(durably: Durably) -> None:
    run = await durably.jobs.timeouts.trigger({"kind": "sync"})
    done = await _outcome(durably, run.id)
    assert done.status == "failed" and done.error is not None and done.error.startswith("TimeoutError")
    await anyio.sleep(0.8)  # the thread returns meanwhile; nothing of it is stored
    [step] = await durably.get_steps(run.id)
    assert (step.status, step.output) == ("failed", None)
    assert calls.step == 1


async def test_a_timeout_counts_as_a_failure_for_retries(durably: Durably) -> None:
    run = await durably.jobs.timeouts.trigger({"kind": "retried"})
    done = await _outcome(durably, run.id)
    assert (done.status, done.output, calls.step) == ("completed", "in time", 2)


async def test_a_postponed_step_goes_on_counting_its_attempts(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably(stale_threshold=0.5, heartbeat_interval=0.1).register(**JOBS)
    calls.fail_times = 99
    run = await durably.jobs.step_retries.trigger({"delay": 1.2, "max": 2})
    done = await _outcome(durably, run.id)
    # Counting from one again after the postponement would postpone it forever.
    assert (done.status, done.error, calls.step) == ("failed", "RuntimeError: attempt 2 failed", 2)
    [step] = await durably.get_steps(run.id)
    assert step.status == "failed" and step.completed_at is not None


async def test_a_backing_off_run_survives_its_worker_and_a_restart_of_the_database_server(
    database: Database, make_durably: Callable[..., Durably]
) -> None:
    calls.fail_times = 1
    first = make_durably().register(**JOBS)
    run = await first.jobs.short_retry.trigger({})
    assert await first.process_one()  # attempt 1 fails; the wait is stored as wake_at
    await first.close()
    server = database.server
    if server is not None:  # killed and started again on the same data
        await to_thread.run_sync(lambda: server.restart(graceful=False))
    second = make_durably().register(**JOBS)  # a new worker, knowing nothing of the first
    done = await _outcome(second, run.id)
    assert (done.status, done.attempt, calls.step) == ("completed", 2, 2)
