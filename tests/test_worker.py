"""The worker (SPEC §4, §8): processing, concurrency, graceful stop, wake-ups, lost leases."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import anyio
import pytest
from anyio import to_thread

from durably import ConfigurationError, Durably, StepContext, create_durably, define_job
from durably._storage._protocol import Lease, Storage, Telemetry

pytestmark = pytest.mark.anyio


@define_job(name="quick", input=dict[str, Any])
async def quick(step: StepContext, payload: dict[str, Any]) -> Any:
    return await step.run("echo", lambda: payload)


@define_job(name="other-quick", input=dict[str, Any])
async def other_quick(step: StepContext, payload: dict[str, Any]) -> Any:
    return await step.run("echo", lambda: payload)


async def _status(durably: Durably, run_id: str) -> str:
    run = await durably.get_run(run_id)
    assert run is not None
    return run.status


async def test_process_one_is_false_when_idle_and_true_after_executing_one_run(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(quick=quick)
    assert await durably.process_one() is False

    first = await durably.jobs.quick.trigger({"n": 1})
    second = await durably.jobs.quick.trigger({"n": 2})
    assert await durably.process_one() is True
    assert await _status(durably, first.id) == "completed"
    assert await _status(durably, second.id) == "pending"
    assert await durably.process_one() is True
    assert await _status(durably, second.id) == "completed"
    assert await durably.process_one() is False


async def test_process_until_idle_returns_how_many_runs_it_executed(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably(max_concurrent_runs=3).register(quick=quick)
    assert await durably.process_until_idle() == 0
    runs = [await durably.jobs.quick.trigger({"n": i}) for i in range(7)]

    assert await durably.process_until_idle(max_runs=2) == 2
    statuses = [await _status(durably, run.id) for run in runs]
    assert statuses == ["completed"] * 2 + ["pending"] * 5  # oldest first

    assert await durably.process_until_idle(max_runs=4) == 4
    assert await durably.process_until_idle() == 1
    assert await durably.process_until_idle() == 0
    assert [await _status(durably, run.id) for run in runs] == ["completed"] * 7


async def test_max_concurrent_runs_bounds_and_reaches_the_runs_executing_at_once(
    make_durably: Callable[..., Durably],
) -> None:
    active = 0
    peak = 0

    async def work() -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await anyio.sleep(0.15)
        finally:
            active -= 1

    @define_job(name="concurrent", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        await step.run("work", work)
        return payload["i"]

    durably = make_durably(max_concurrent_runs=3).register(job=job)
    runs = [await durably.jobs.job.trigger({"i": i}) for i in range(8)]
    async with durably:
        with anyio.fail_after(10):
            for run in runs:
                done = await durably.wait_for_run(run.id)
                assert done.status == "completed", done.error
    assert peak == 3

    # The limit can change while the worker runs (the CLI's --concurrency uses this).
    peak = 0
    durably.max_concurrent_runs = 2
    more = [await durably.jobs.job.trigger({"i": i}) for i in range(6)]
    async with durably:
        with anyio.fail_after(10):
            for run in more:
                assert (await durably.wait_for_run(run.id)).status == "completed"
    assert peak == 2
    with pytest.raises(ConfigurationError, match="max_concurrent_runs"):
        durably.max_concurrent_runs = 0


async def test_a_worker_claims_only_runs_of_its_registered_jobs(make_durably: Callable[..., Durably]) -> None:
    first = make_durably().register(quick=quick)
    second = make_durably().register(other=other_quick)
    mine = await first.jobs.quick.trigger({"who": "first"})
    theirs = await second.jobs.other.trigger({"who": "second"})

    assert await first.process_until_idle() == 1
    assert await _status(first, mine.id) == "completed"
    async with first:
        await anyio.sleep(0.3)  # the running worker keeps polling: still not its job
        assert await _status(first, theirs.id) == "pending"

    assert await second.process_until_idle() == 1
    assert await _status(second, theirs.id) == "completed"


async def test_stop_lets_an_in_flight_run_finish_within_the_timeout(
    make_durably: Callable[..., Durably],
) -> None:
    started = anyio.Event()

    async def slow() -> str:
        started.set()
        await anyio.sleep(0.3)
        return "finished"

    @define_job(name="in-flight", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        return await step.run("slow", slow)

    durably = make_durably().register(job=job)
    await durably.init()
    run = await durably.jobs.job.trigger({})
    with anyio.fail_after(2):
        await started.wait()
    with anyio.fail_after(5):
        await durably.stop(timeout=5)
    stored = await durably.get_run(run.id)
    assert stored is not None
    assert stored.status == "completed"
    assert stored.output == "finished"


async def test_stop_with_a_stuck_run_releases_its_lease_for_another_worker_at_once(
    make_durably: Callable[..., Durably],
) -> None:
    executions = 0
    started = anyio.Event()

    async def stuck_the_first_time() -> str:
        nonlocal executions
        executions += 1
        if executions == 1:
            started.set()
            await anyio.sleep(60)
        return f"execution {executions}"

    @define_job(name="stuck", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        return await step.run("long", stuck_the_first_time)

    # A long lease: only an explicit release lets another worker in quickly.
    first = make_durably(stale_threshold=30.0).register(job=job)
    await first.init()
    run = await first.jobs.job.trigger({})
    with anyio.fail_after(2):
        await started.wait()
    with anyio.fail_after(2):
        await first.stop(timeout=0.2)

    released = await first.get_run(run.id)
    assert released is not None
    assert released.status == "pending"
    assert await first.get_steps(run.id) == []

    second = make_durably(stale_threshold=30.0).register(job=job)
    with anyio.fail_after(3):
        assert await second.process_until_idle() == 1
    done = await second.get_run(run.id)
    assert done is not None
    assert done.status == "completed", done.error
    assert done.output == "execution 2"
    assert done.attempt == 1


async def test_an_in_process_trigger_wakes_an_idle_worker_at_once(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably(polling_interval=30.0).register(quick=quick)
    async with durably:
        await anyio.sleep(0.2)  # the worker found nothing and waits for its next poll
        with anyio.fail_after(3):
            first = await durably.jobs.quick.trigger_and_wait({"n": 1}, timeout=3)
        assert first.output == {"n": 1}
        await anyio.sleep(0.1)
        with anyio.fail_after(3):
            second = await durably.jobs.quick.trigger_and_wait({"n": 2}, timeout=3)
        assert second.output == {"n": 2}


async def test_async_with_starts_the_worker_and_stops_it_on_exit(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(quick=quick)
    async with durably as entered:
        assert entered is durably
        with anyio.fail_after(3):
            result = await durably.jobs.quick.trigger_and_wait({"n": 1}, timeout=3)
        assert result.output == {"n": 1}

    # The worker is gone: a run triggered now stays pending.
    observer = make_durably().register(quick=quick)
    run = await observer.jobs.quick.trigger({"n": 2})
    await anyio.sleep(0.3)
    assert await _status(observer, run.id) == "pending"


async def test_a_worker_whose_lease_was_taken_over_writes_nothing_more(
    storage_url: str, storage: Storage, make_durably: Callable[..., Durably]
) -> None:
    in_first_step = threading.Event()
    release = threading.Event()
    finish = threading.Event()
    worker_errors: list[str] = []
    thread_failures: list[BaseException] = []
    second_step_ran: list[bool] = []

    async def hog_the_loop() -> str:
        in_first_step.set()
        # Blocks this worker's event loop on purpose: its heartbeat cannot renew the lease.
        release.wait(10)
        return "first"

    @define_job(name="lease-victim", input=dict[str, Any])
    async def job(step: StepContext, payload: dict[str, Any]) -> Any:
        await step.run("first", hog_the_loop)
        await step.run("second", lambda: second_step_ran.append(True))
        return "victim finished"

    def victim_worker() -> None:
        async def main() -> None:
            victim = create_durably(
                storage_url, polling_interval=0.01, heartbeat_interval=0.1, stale_threshold=0.5
            ).register(job=job)
            victim.on("worker:error", lambda event: worker_errors.append(event.error))
            async with victim:
                await to_thread.run_sync(finish.wait, 10)

        try:
            # Its own event loop on its own thread, so blocking it leaves the test's loop free.
            anyio.run(main, backend_options={"debug": False})
        except BaseException as exc:
            thread_failures.append(exc)

    trigger = make_durably().register(job=job)
    run = await trigger.jobs.job.trigger({})
    thread = threading.Thread(target=victim_worker, name="victim-worker")
    thread.start()
    try:
        assert await to_thread.run_sync(in_first_step.wait, 5), "the victim never started the run"
        await anyio.sleep(1.0)  # > stale_threshold (0.5 s) since the victim's last renewal

        claim = await storage.claim_runs(
            worker_id="thief", job_names=["lease-victim"], limit=1, lease_seconds=30
        )
        [claimed] = claim.runs
        assert claimed.run.id == run.id
        assert claimed.lease_generation == 2
        release.set()

        with anyio.fail_after(3):
            while True:
                if any("LeaseLostError" in error for error in worker_errors):
                    break
                await anyio.sleep(0.02)
        await anyio.sleep(0.3)  # give a misbehaving victim time to write what it should not

        assert await storage.get_steps(run.id) == []
        assert second_step_ran == []
        stored = await storage.get_run(run.id)
        assert stored is not None
        assert stored.status == "leased"
        assert stored.output is None
        assert stored.error is None

        # The thief's lease is intact and works.
        assert await storage.renew_leases([Lease(run.id, 2)], lease_seconds=30) == {run.id}
        assert await storage.complete_run(Lease(run.id, 2), b'"thief finished"', Telemetry())
    finally:
        release.set()
        finish.set()
        await to_thread.run_sync(thread.join, 10)
    assert thread_failures == []
    done = await storage.get_run(run.id)
    assert done is not None
    assert (done.status, done.output) == ("completed", "thief finished")
