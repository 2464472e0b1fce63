"""``checkpoints="pipelined"`` (SPEC §3): steps go on while their checkpoints are written.

The same results as ``"sync"``; fewer fenced writes (at most one in flight); the price after
a crash (un-landed steps run again) and under a lost lease (at most ``MAX_UNACKNOWLEDGED``
steps more, nothing written).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio import to_thread

from durably import (
    ConfigurationError,
    Durably,
    RetryPolicy,
    StepContext,
    create_durably,
    define_job,
    open_storage,
)
from durably._events import Event
from durably._pipeline import MAX_UNACKNOWLEDGED
from durably._storage._protocol import Lease, StepRecord, Telemetry

from .conftest import Database
from .procs import pipelined as child
from .support.watched import WatchedStorage

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent
FAST = RetryPolicy(max_attempts=3, initial_delay=0.01, jitter=False)


async def _double(n: int) -> int:
    await anyio.sleep(0.01)  # the checkpoint write of the step before is in flight meanwhile
    return 2 * n


async def _steps(step: StepContext, payload: dict[str, Any]) -> list[int]:
    results = []
    for index in range(payload["steps"]):
        step.log.info("step", index=index)
        step.progress(index, payload["steps"])
        results.append(await step.run(f"s{index}", _double, index))
    if payload.get("fail"):
        await step.run("boom", _boom)
    return results


def _boom() -> None:
    raise RuntimeError("boom")


def _jobs(checkpoints: Any) -> dict[str, Any]:
    return {"steps": define_job(name="steps", input=dict[str, Any], run=_steps, checkpoints=checkpoints)}


def _watched(database: Database, **options: Any) -> tuple[Durably, WatchedStorage]:
    storage = WatchedStorage(database.open(), **options)
    durably = create_durably(
        storage,  # type: ignore[arg-type]
        polling_interval=0.01,
        heartbeat_interval=0.1,
        stale_threshold=1.0,
    )
    return durably, storage


@asynccontextmanager
async def _closing(durably: Durably) -> AsyncIterator[Durably]:
    try:
        yield durably
    finally:
        await durably.close()


def test_checkpoints_must_be_sync_or_pipelined() -> None:
    with pytest.raises(ConfigurationError, match="'eventually'"):
        define_job(name="x", input=dict, run=_steps, checkpoints="eventually")  # type: ignore[call-overload]
    with pytest.raises(ConfigurationError, match="checkpoints"):
        define_job(name="x", input=dict, checkpoints=None)  # type: ignore[call-overload]
    assert define_job(name="x", input=dict, run=_steps).checkpoints == "sync"


async def _outcome(database: Database, checkpoints: str, payload: dict[str, Any]) -> tuple[Any, ...]:
    durably, storage = _watched(database)
    async with _closing(durably.register(**_jobs(checkpoints))):
        events: list[Event] = []
        durably.on("*", events.append)
        run = await durably.jobs.steps.trigger(payload)
        await durably.process_until_idle()
        done = await durably.get_run(run.id)
        assert done is not None
        steps = [(s.name, s.index, s.status, s.output, s.error) for s in await durably.get_steps(run.id)]
        logs = [(log.message, log.data, log.step_name) for log in await durably.get_logs(run.id)]
        kinds = [(e.type, getattr(e, "step_name", None)) for e in events if e.type != "run:progress"]
        return (done.status, done.output, done.error, done.progress), steps, logs, kinds, storage


def _checkpoint_writes(storage: WatchedStorage) -> int:
    return storage.writes.total() - storage.writes["save_telemetry"]


@pytest.mark.parametrize("fail", [False, True])
async def test_pipelined_stores_the_same_run_steps_logs_and_events_as_sync(
    database: Database, fail: bool
) -> None:
    payload = {"steps": 4, "fail": fail}
    *sync, sync_storage = await _outcome(database, "sync", payload)
    *pipelined, storage = await _outcome(database, "pipelined", payload)
    assert pipelined == sync
    run, steps, _, _ = pipelined
    assert run[0] == ("failed" if fail else "completed")
    assert [name for name, *_ in steps] == ["s0", "s1", "s2", "s3"] + (["boom"] if fail else [])
    # The point: fewer fenced writes (progress and logs flushed apart aside), one at a time.
    assert _checkpoint_writes(sync_storage) == len(steps) + 1
    assert _checkpoint_writes(storage) < len(steps) + 1
    assert storage.most_in_flight == 1
    assert storage.writes["save_step"] == 0
    assert storage.writes["complete_run" if not fail else "fail_run"] == 1


async def test_a_three_step_run_costs_two_writes(database: Database) -> None:
    """[step 1] in flight while steps 2-3 run, then the completion carries them."""
    durably, storage = _watched(database, latency=0.2)  # a write takes longer than two steps
    async with _closing(durably.register(**_jobs("pipelined"))):
        run = await durably.jobs.steps.trigger({"steps": 3})
        await durably.process_until_idle()
        assert [s.output for s in await durably.get_steps(run.id)] == [0, 2, 4]
    assert _checkpoint_writes(storage) == 2
    assert storage.writes["save_steps"] == storage.writes["complete_run"] == 1


@define_job(name="quick", input=dict[str, Any], checkpoints="pipelined")
async def quick(step: StepContext, payload: dict[str, Any]) -> list[int]:
    return [await step.run(f"s{index}", lambda index=index: index) for index in range(3)]


async def test_a_burst_of_quick_steps_and_the_completion_are_one_write(database: Database) -> None:
    """The first checkpoint lingers a moment (LINGER): quick steps after it go with it."""
    durably, storage = _watched(database, latency=0.2)
    async with _closing(durably.register(quick=quick)):
        run = await durably.jobs.quick.trigger({})
        await durably.process_until_idle()
        assert [s.output for s in await durably.get_steps(run.id)] == [0, 1, 2]
    assert _checkpoint_writes(storage) == storage.writes["complete_run"] == 1


@define_job(name="waits", input=dict[str, Any], checkpoints="pipelined", retries=FAST)
async def waits(step: StepContext, payload: dict[str, Any]) -> Any:
    first = await step.run("first", _double, 1)
    await step.sleep("nap", 0.05)
    second = await step.run("second", _double, 2)
    approved = await step.wait_for_signal("approve")
    third = await step.run("flaky", _flaky, payload["counter"], retries=FAST)
    if step.attempt == 1:
        await step.run("doomed", _boom)  # the run fails once, retried as a whole
    return [first, second, approved, third, step.attempt]


def _flaky(counter: str) -> str:
    with open(counter, "a") as file:
        file.write("x")
    if len(Path(counter).read_text()) < 2:
        raise RuntimeError("not yet")
    return "ok"


async def _until_waiting_for(durably: Durably, run_id: str, waiting_for: str) -> None:
    with anyio.fail_after(10):
        while True:
            run = await durably.get_run(run_id)
            if run is not None and run.waiting_for == waiting_for:
                return
            await anyio.sleep(0.02)


async def test_waits_and_retries_work_pipelined(make_durably: Callable[..., Durably], tmp_path: Path) -> None:
    durably = make_durably().register(waits=waits)
    counter = tmp_path / "counter"
    counter.touch()
    async with durably:
        run = await durably.jobs.waits.trigger({"counter": str(counter)})
        await _until_waiting_for(durably, run.id, "signal:approve")
        await durably.signal(run.id, "approve", "yes")
        done = await durably.wait_for_run(run.id, timeout=10)
    assert done.status == "completed", done.error
    assert done.output == [2, 4, "yes", "ok", 2]
    steps = {s.name: s.status for s in await durably.get_steps(run.id)}
    assert steps == {
        "first": "completed",
        "nap": "completed",
        "second": "completed",
        "signal:approve": "completed",
        "flaky": "completed",
        "doomed": "failed",  # attempt 1's; attempt 2 skipped it
    }
    assert counter.read_text() == "xx"  # one failed attempt, one success, none again on the retry


async def test_a_refused_batch_stores_nothing(storage: Any) -> None:
    """Steps carried by a completion, or sent together, land with it or not at all."""
    durably = create_durably(storage).register(**_jobs("pipelined"))
    run = await durably.jobs.steps.trigger({"steps": 1})
    [claimed] = (await storage.claim_runs(worker_id="w", job_names=["steps"], limit=1, lease_seconds=30)).runs
    stale = Lease(run.id, claimed.lease_generation + 1)
    steps = [
        StepRecord(name=f"s{i}", index=i, output=b"1", started_at=1.0, completed_at=2.0) for i in range(2)
    ]
    assert await storage.save_steps(stale, steps, Telemetry()) is False
    assert await storage.complete_run(stale, b"1", Telemetry(), steps=steps) is False
    assert await storage.fail_run(stale, "E: x", Telemetry(), steps=steps) is False
    assert await storage.get_steps(run.id) == []
    lease = Lease(run.id, claimed.lease_generation)
    assert await storage.save_steps(lease, steps[:1], Telemetry())
    assert await storage.save_steps(lease, steps[:1], Telemetry())  # re-sent: still one row
    assert await storage.complete_run(lease, b"1", Telemetry(), steps=steps[1:])
    assert [s.name for s in await storage.get_steps(run.id)] == ["s0", "s1"]
    assert (await storage.get_run(run.id)).status == "completed"


async def _logs_between_steps(step: StepContext, payload: dict[str, Any]) -> None:
    for index in range(3):
        await step.run(f"s{index}", _double, index)
        await anyio.sleep(0.05)  # the checkpoint write has left: the line is flushed on its own
        step.log.info(f"after s{index}")


async def test_logs_flushed_while_checkpoints_are_in_flight_are_not_lost(database: Database) -> None:
    """A flush waits for the queued checkpoints; the run ending meanwhile must not drop its lines."""
    durably, _ = _watched(database, latency=0.2)
    job = define_job(name="logs", input=dict[str, Any], run=_logs_between_steps, checkpoints="pipelined")
    async with _closing(durably.register(logs=job)):
        run = await durably.jobs.logs.trigger({})
        await durably.process_until_idle()
        assert [log.message for log in await durably.get_logs(run.id)] == ["after s0", "after s1", "after s2"]


async def _progress_then_long_step(step: StepContext, payload: dict[str, Any]) -> None:
    await step.run("s0", _double, 0)
    await anyio.sleep(0.05)  # s0's write is in flight: the flush may not overtake it
    step.progress(1, 2)
    await step.run("long", anyio.sleep, 3)


async def test_progress_deferred_behind_a_checkpoint_still_lands_during_a_long_step(
    database: Database,
) -> None:
    durably, _ = _watched(database, latency=0.2)
    job = define_job(name="slow", input=dict[str, Any], run=_progress_then_long_step, checkpoints="pipelined")
    completed: list[Event] = []
    durably.on("step:complete", completed.append)
    async with _closing(durably.register(slow=job)):
        run = await durably.jobs.slow.trigger({})
        durably.start()
        with anyio.fail_after(10):
            while True:
                stored = await durably.get_run(run.id)
                if stored is not None and stored.progress is not None:
                    break
                await anyio.sleep(0.05)
        assert stored.progress.current == 1
        assert [e.step_name for e in completed] == ["s0"]  # type: ignore[attr-defined]  # "long" still runs


async def _hang() -> None:
    await anyio.sleep(30)


async def _then_hang(step: StepContext, payload: dict[str, Any]) -> None:
    for index in range(3):
        await step.run(f"s{index}", _double, index)
    await step.run("hang", _hang)


async def test_on_shutdown_the_queued_checkpoints_land_before_the_lease_is_released(
    database: Database,
) -> None:
    storage = WatchedStorage(database.open(), latency=0.2)  # the writes are still queued at the stop
    durably = create_durably(storage, polling_interval=0.01, stale_threshold=3.0)  # type: ignore[arg-type]
    job = define_job(name="hangs", input=dict[str, Any], run=_then_hang, checkpoints="pipelined")
    started: list[Event] = []
    durably.on("step:start", started.append)
    async with _closing(durably.register(hangs=job)):
        run = await durably.jobs.hangs.trigger({})
        durably.start()
        await _until(lambda: any(e.step_name == "hang" for e in started))  # type: ignore[attr-defined]
        await durably.stop(timeout=0)
        assert [s.name for s in await durably.get_steps(run.id)] == ["s0", "s1", "s2"]
        released = await durably.get_run(run.id)
    assert released is not None and released.status == "pending"  # released, not lost


# --- the price: a crash, a lost lease ---------------------------------------------------


@pytest.mark.slow
async def test_after_a_crash_the_steps_whose_checkpoints_had_not_landed_run_again(
    database: Database, tmp_path: Path
) -> None:
    counter = tmp_path / "counter"
    counter.touch()
    args = [database.url]
    if database.kind == "replica":
        args = [f"file:{tmp_path / 'child-replica.db'}", "--sync-url", database.url]
    durably = create_durably(database.open(), polling_interval=0.02, stale_threshold=1.0)
    async with _closing(durably.register(crashy=child.crashy)):
        run = await durably.jobs.crashy.trigger({"counter": str(counter)})
        await _kill_while_hanging(tmp_path, args, counter)
        primary = open_storage(database.url)  # what landed, read where the child wrote it
        try:
            landed = {s.name for s in await primary.get_steps(run.id)}
        finally:
            await primary.close()
        assert landed == {"step0"}  # only the first write got through; steps 1-2 were queued
        async with durably:  # a fresh worker resumes once the dead one's lease expires
            done = await durably.wait_for_run(run.id, timeout=15)
        steps = await durably.get_steps(run.id)
    assert done.status == "completed", done.error
    assert done.output == sum(range(child.STEPS))
    ran = counter.read_text().split()
    for index in range(child.STEPS):
        name = f"step{index}"
        assert ran.count(name) == (1 if name in landed or index > child.HANG_AT else 2), ran
    assert [(s.name, s.status) for s in steps] == [(f"step{i}", "completed") for i in range(child.STEPS)]


async def _kill_while_hanging(tmp_path: Path, args: list[str], counter: Path) -> None:
    """Start the child worker; SIGKILL it once its hanging step runs (its checkpoints held)."""
    command = [sys.executable, "-m", "tests.procs.pipelined", *args]
    with (tmp_path / "child.stderr").open("w") as stderr:
        process = await to_thread.run_sync(lambda: subprocess.Popen(command, cwd=ROOT, stderr=stderr))
        try:
            with anyio.fail_after(20):
                while f"step{child.HANG_AT}" not in (await anyio.Path(counter).read_text()).split():
                    assert process.poll() is None, (tmp_path / "child.stderr").read_text()
                    await anyio.sleep(0.02)
        finally:
            process.send_signal(signal.SIGKILL)
            await to_thread.run_sync(process.wait)


async def _until(condition: Callable[[], bool]) -> None:
    with anyio.fail_after(10):
        while not condition():  # noqa: ASYNC110 - plain flags of the test, no event to wait on
            await anyio.sleep(0.01)


def _tagged(tag: str, ran: list[str]) -> Any:
    async def body(step: StepContext, payload: dict[str, Any]) -> str:
        for index in range(payload["steps"]):
            await step.run(f"s{index}", _mark, ran, f"{tag}{index}")
        return tag

    return define_job(name="fenced", input=dict[str, Any], run=body, checkpoints="pipelined")


async def _mark(ran: list[str], name: str) -> str:
    ran.append(name)
    await anyio.sleep(0.01)
    return name


async def test_a_worker_whose_lease_is_taken_over_runs_at_most_the_bound_and_writes_nothing(
    database: Database,
) -> None:
    steps = MAX_UNACKNOWLEDGED + 6
    ran: list[str] = []
    first, cut = _watched(database, hold_after=1)  # its second checkpoint write never arrives
    second = create_durably(database.open(), polling_interval=0.01, stale_threshold=1.0)
    errors: list[Event] = []
    first.on("worker:error", errors.append)
    async with (
        _closing(first.register(fenced=_tagged("A", ran))),
        _closing(second.register(fenced=_tagged("B", ran))),
    ):
        run = await first.jobs.fenced.trigger({"steps": steps})
        async with first:
            await _until(lambda: cut.cut)
            async with second:  # claims the run once the first worker's lease expires
                done = await second.wait_for_run(run.id, timeout=15)
                await _until(lambda: any("LeaseLostError" in e.error for e in errors))  # type: ignore[attr-defined]
        stored = await second.get_steps(run.id)
    assert done.status == "completed" and done.output == "B"
    by_first = [name for name in ran if name.startswith("A")]
    assert [s.output for s in stored] == ["A0"] + [f"B{i}" for i in range(1, steps)]
    # Step A0 was acknowledged; at most the bound ran after it, then the worker stopped.
    assert 1 < len(by_first) <= 1 + MAX_UNACKNOWLEDGED
    assert by_first == [f"A{i}" for i in range(len(by_first))]
    # After the cut it only retried its held checkpoint (and renewals): no completion, no release.
    assert set(cut.after_cut) <= {"save_steps", "renew_leases", "claim_runs"}
