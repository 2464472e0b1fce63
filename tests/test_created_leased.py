"""Created leased: a trigger from a process whose worker has a free slot creates the run
leased to that worker, so it starts without a claim; never ahead of older or higher-priority
runs, a delayed run, a held concurrency key, or past the worker's free slots."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio import Path as AsyncPath
from anyio import to_thread

from durably import Durably, StepContext, define_job
from durably._events import Event
from durably._models import ClaimedRun, NewRun
from durably._storage import _queries as q
from durably._storage._protocol import Claim, Lease, LeaseOffer, RunFilter, Storage, Telemetry
from durably.adapters import open_storage
from tests.support.runs import new_run

from .support.sqld import SqldServer

pytestmark = pytest.mark.anyio

IDLE = 60.0  # a polling interval no test waits out: the worker claims only when woken


class Gate:
    """Runs of ``held`` wait here until opened; counts how many wait at once."""

    def __init__(self) -> None:
        self.opened = anyio.Event()
        self.inside = 0
        self.most = 0

    async def enter(self) -> None:
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            await self.opened.wait()
        finally:
            self.inside -= 1


GATE = Gate()


@define_job(name="held", input=dict[str, Any])
async def held(step: StepContext, payload: dict[str, Any]) -> Any:
    await step.run("first", lambda: payload)
    await GATE.enter()
    return await step.run("second", lambda: payload)


@define_job(name="quick", input=dict[str, Any])
async def quick(step: StepContext, payload: dict[str, Any]) -> Any:
    for k in range(3):
        await step.run(f"s{k}", dict, k=k)
    return payload


@pytest.fixture(autouse=True)
def fresh_gate() -> Iterator[None]:
    global GATE
    GATE = Gate()
    yield
    GATE.opened.set()


def record_claims(durably: Durably) -> list[str]:
    """The ids of the runs every claim of ``durably``'s worker took, in order: a thin recording
    wrapper around its real storage. A claim that found nothing adds nothing."""
    taken: list[str] = []
    claim = durably.storage.claim_runs

    async def recording(**kwargs: Any) -> Claim:
        claimed = await claim(**kwargs)
        taken.extend(c.run.id for c in claimed.runs)
        return claimed

    durably.storage.claim_runs = recording  # type: ignore[method-assign]
    return taken


def record_events(durably: Durably) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []

    def note(event: Event) -> None:
        run_id = getattr(event, "run_id", None)
        if run_id is not None and event.type in ("run:trigger", "run:start"):
            seen.append((event.type, run_id))

    durably.on("*", note)
    return seen


async def until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``check`` (state of this process, changed by the worker's tasks) until it holds."""
    with anyio.fail_after(timeout):
        while not check():  # noqa: ASYNC110 - no event to wait on: the state is the worker's
            await anyio.sleep(0.01)


async def serving(make_durably: Callable[..., Durably], **options: Any) -> Durably:
    """A started instance that has done its first (empty) claim and now idles."""
    options.setdefault("polling_interval", IDLE)
    durably = make_durably(**options).register(held=held, quick=quick)
    calls = 0
    claim = durably.storage.claim_runs

    async def counting(**kwargs: Any) -> Claim:
        nonlocal calls
        calls += 1
        return await claim(**kwargs)

    durably.storage.claim_runs = counting  # type: ignore[method-assign]
    await durably.init()
    await until(lambda: calls > 0)
    return durably


async def other(make_durably: Callable[..., Durably]) -> Durably:
    """Another instance on the same database that only triggers (never started)."""
    durably = make_durably().register(held=held, quick=quick)
    await durably.migrate()
    return durably


async def test_a_trigger_with_a_free_slot_is_executed_without_a_claim(
    make_durably: Callable[..., Durably],
) -> None:
    durably = await serving(make_durably)
    claimed = record_claims(durably)
    events = record_events(durably)
    run = await durably.jobs.quick.trigger({"n": 1})
    assert run.status == "leased" and run.started_at is not None
    assert run.disposition == "created"
    done = await durably.wait_for_run(run.id, timeout=10)
    assert done.status == "completed" and done.attempt == 1
    result = await durably.jobs.quick.trigger_and_wait({"n": 2}, timeout=10)
    assert result.output == {"n": 2}
    assert claimed == []  # neither run was claimed: both started from their trigger
    assert events.index(("run:trigger", run.id)) < events.index(("run:start", run.id))
    assert events.count(("run:start", run.id)) == 1


async def test_older_ready_runs_of_its_jobs_go_first(make_durably: Callable[..., Durably]) -> None:
    durably = await serving(make_durably)
    elsewhere = await other(make_durably)
    older = [await elsewhere.jobs.quick.trigger({"i": i}) for i in range(2)]
    events = record_events(durably)
    new = await durably.jobs.quick.trigger({"i": 2})
    assert new.status == "pending"
    await durably.wait_for_run(new.id, timeout=10)
    started = [run_id for kind, run_id in events if kind == "run:start"]
    assert started == [older[0].id, older[1].id, new.id]


async def test_an_as_high_older_ready_run_goes_first(make_durably: Callable[..., Durably]) -> None:
    durably = await serving(make_durably)
    elsewhere = await other(make_durably)
    older = await elsewhere.jobs.quick.trigger({"i": 0}, priority=5)  # ready, not yet claimed
    same = await durably.jobs.quick.trigger({"i": 1}, priority=5)
    assert same.status == "pending"
    for run in (older, same):
        assert (await durably.wait_for_run(run.id, timeout=10)).status == "completed"


async def test_a_higher_priority_trigger_is_leased_past_lower_ready_runs(
    make_durably: Callable[..., Durably],
) -> None:
    durably = await serving(make_durably)
    elsewhere = await other(make_durably)
    await elsewhere.jobs.quick.trigger({"i": 0}, priority=1)
    higher = await durably.jobs.quick.trigger({"i": 1}, priority=2)
    assert higher.status == "leased"
    assert (await durably.wait_for_run(higher.id, timeout=10)).status == "completed"


async def test_a_due_run_or_a_stale_lease_goes_first(make_durably: Callable[..., Durably]) -> None:
    durably = await serving(make_durably)
    elsewhere = await other(make_durably)
    await elsewhere.jobs.quick.trigger({"i": 0}, delay=0.05)
    await anyio.sleep(0.2)  # due now; the idle worker has not looked
    behind_due = await durably.jobs.quick.trigger({"i": 1})
    assert behind_due.status == "pending"
    await durably.wait_for_run(behind_due.id, timeout=10)
    # Created leased to a worker that is gone, in one write: the serving worker, still
    # claiming after the runs above ended, cannot take it first.
    gone = LeaseOffer(owner="gone/1", job_names=("quick",), slots=1, lease_seconds=0.01)
    [stale], leased = await elsewhere.storage.create_leased_runs([_new("quick")], gone)
    assert [c.run.id for c in leased] == [stale.id]
    await anyio.sleep(0.1)
    behind_stale = await durably.jobs.quick.trigger({"i": 2})
    assert behind_stale.status == "pending"
    for run_id in (stale.id, behind_stale.id):
        assert (await durably.wait_for_run(run_id, timeout=10)).status == "completed"


async def test_a_delayed_run_is_never_created_leased(make_durably: Callable[..., Durably]) -> None:
    durably = await serving(make_durably, polling_interval=0.05)
    delayed = await durably.jobs.quick.trigger({"i": 0}, delay=0.1)
    at = await durably.jobs.quick.trigger({"i": 1}, run_at=datetime.now(UTC) + timedelta(seconds=0.1))
    for run in (delayed, at):
        assert run.status == "pending" and run.wake_at is not None
        assert (await durably.wait_for_run(run.id, timeout=10)).status == "completed"


async def test_a_held_concurrency_key_keeps_the_run_pending(make_durably: Callable[..., Durably]) -> None:
    durably = await serving(make_durably, max_concurrent_runs=3)
    first = await durably.jobs.held.trigger({"i": 0}, concurrency_key="k")
    assert first.status == "leased"
    second = await durably.jobs.held.trigger({"i": 1}, concurrency_key="k")
    assert second.status == "pending"
    other_key = await durably.jobs.held.trigger({"i": 2}, concurrency_key="j")
    assert other_key.status == "leased"
    await until(lambda: GATE.inside == 2)
    await anyio.sleep(0.2)
    assert (await durably.get_run(second.id)).status == "pending"  # type: ignore[union-attr]
    GATE.opened.set()
    ends = [await durably.wait_for_run(run.id, timeout=10) for run in (first, second, other_key)]
    assert all(run.status == "completed" for run in ends)
    assert ends[1].started_at >= ends[0].completed_at  # type: ignore[operator]


async def test_no_free_slot_keeps_the_run_pending(make_durably: Callable[..., Durably]) -> None:
    durably = await serving(make_durably)
    busy = await durably.jobs.held.trigger({"i": 0})
    assert busy.status == "leased"
    waiting = await durably.jobs.held.trigger({"i": 1})
    assert waiting.status == "pending"
    GATE.opened.set()
    assert (await durably.wait_for_run(waiting.id, timeout=10)).status == "completed"


async def test_a_slot_promised_but_not_used_is_given_back(make_durably: Callable[..., Durably]) -> None:
    durably = await serving(make_durably, max_concurrent_runs=3)
    elsewhere = await other(make_durably)
    older = await elsewhere.jobs.held.trigger({"i": 0})
    # Promised a slot each, created pending (an older run is ahead): the slots come back.
    pending = [await durably.jobs.held.trigger({"i": i}) for i in (1, 2)]
    assert [run.status for run in pending] == ["pending", "pending"]
    await until(lambda: GATE.inside == 3)  # full concurrency: every slot came back
    assert GATE.most == 3
    GATE.opened.set()
    for run in (older, *pending):
        assert (await durably.wait_for_run(run.id, timeout=10)).status == "completed"


async def test_a_claim_that_overlapped_a_created_leased_run_gives_back_what_has_no_slot(
    make_durably: Callable[..., Durably],
) -> None:
    # A long lease: the held claim answer must not time out (storage_timeout) under load.
    durably = await serving(make_durably, polling_interval=0.02, stale_threshold=10.0, heartbeat_interval=1.0)
    elsewhere = await other(make_durably)
    claim, answered, hold = durably.storage.claim_runs, anyio.Event(), anyio.Event()
    idle_claims = 0

    async def slow_answer(**kwargs: Any) -> Claim:
        nonlocal idle_claims
        claimed = await claim(**kwargs)
        if claimed.runs:
            answered.set()
            await hold.wait()  # the answer is on its way while the trigger below runs
        else:
            idle_claims += 1
        return claimed

    durably.storage.claim_runs = slow_answer  # type: ignore[method-assign]
    # A claim sent before the wrapper was in place could take the run below unseen: wait
    # for one that went through it (an idle worker has one claim in flight at a time).
    await until(lambda: idle_claims > 0)
    older = await elsewhere.jobs.held.trigger({"i": 0})  # the worker's next poll claims it
    with anyio.fail_after(10):
        await answered.wait()
    new = await durably.jobs.held.trigger({"i": 1})
    assert new.status == "leased"  # nothing ahead any more, and the claim's run has not started
    hold.set()
    await until(lambda: GATE.inside == 1)
    await anyio.sleep(0.2)
    assert GATE.most == 1  # the claimed run went back to pending: one slot, one run
    GATE.opened.set()
    for run in (older, new):
        assert (await durably.wait_for_run(run.id, timeout=10)).status == "completed"


async def test_a_batch_is_leased_up_to_the_free_slots(make_durably: Callable[..., Durably]) -> None:
    durably = await serving(make_durably, max_concurrent_runs=2)
    runs = await durably.jobs.held.batch_trigger([{"i": i} for i in range(3)])
    assert [run.status for run in runs] == ["leased", "leased", "pending"]
    await until(lambda: GATE.inside == 2)
    GATE.opened.set()
    for run in runs:
        assert (await durably.wait_for_run(run.id, timeout=10)).status == "completed"
    assert GATE.most == 2


async def test_an_idempotent_duplicate_is_not_started_twice(make_durably: Callable[..., Durably]) -> None:
    durably = await serving(make_durably, max_concurrent_runs=2)
    events = record_events(durably)
    first = await durably.jobs.held.trigger({"i": 0}, idempotency_key="once")
    again = await durably.jobs.held.trigger({"i": 0}, idempotency_key="once")
    assert first.status == again.status == "leased"
    assert again.id == first.id and again.disposition == "idempotent"
    await until(lambda: GATE.inside == 1)
    await anyio.sleep(0.2)
    assert GATE.most == 1
    GATE.opened.set()
    assert (await durably.wait_for_run(first.id, timeout=10)).status == "completed"
    assert events.count(("run:start", first.id)) == 1


async def test_a_run_created_leased_to_a_worker_that_stopped_meanwhile_goes_back_to_pending(
    make_durably: Callable[..., Durably],
) -> None:
    durably = await serving(make_durably)
    create = durably.storage.create_leased_runs

    async def stop_meanwhile(runs: Any, offer: LeaseOffer) -> tuple[list[Any], list[ClaimedRun]]:
        answer = await create(runs, offer)
        await durably.stop()  # before the trigger hands the run to the worker
        return answer

    durably.storage.create_leased_runs = stop_meanwhile  # type: ignore[method-assign]
    run = await durably.jobs.quick.trigger({"i": 0})
    assert run.status == "leased"
    stored = await durably.get_run(run.id)
    assert stored is not None and stored.status == "pending"  # released at once, not left to expire
    assert await durably.process_until_idle() == 1


async def test_an_instance_that_is_not_serving_creates_runs_pending(
    make_durably: Callable[..., Durably],
) -> None:
    durably = make_durably().register(quick=quick)
    run = await durably.jobs.quick.trigger({"i": 0})
    assert run.status == "pending"
    assert await durably.process_until_idle() == 1


def _new(job_name: str) -> NewRun:
    return new_run(job_name)


def _offer(owner: str) -> LeaseOffer:
    return LeaseOffer(owner=owner, job_names=("quick",), slots=1, lease_seconds=30.0)


async def test_a_resent_trigger_starts_the_run_only_if_leased_to_its_own_offer(storage: Storage) -> None:
    run = _new("quick")
    created, claimed = await storage.create_leased_runs([run], _offer("w/1"))
    assert created[0].status == "leased" and [c.run.id for c in claimed] == [run.id]
    assert claimed[0].lease_generation == 1 and claimed[0].steps == {}
    # The same request sent again (its first answer lost): the run is this offer's still.
    again, claimed_again = await storage.create_leased_runs([run], _offer("w/1"))
    assert again[0].disposition == "created" and [c.run.id for c in claimed_again] == [run.id]
    # Under another offer, or once released and claimed anew (generation 2), it is not.
    assert (await storage.create_leased_runs([run], _offer("w/2")))[1] == []
    assert await storage.release_lease(Lease(run.id, 1), Telemetry())
    await storage.claim_runs(worker_id="w", job_names=["quick"], limit=1, lease_seconds=30.0)
    assert (await storage.create_leased_runs([run], _offer("w/1")))[1] == []


async def test_the_insert_reads_ready_and_due_runs_through_their_indexes(tmp_path: Path) -> None:
    path = tmp_path / "plan.db"
    store = open_storage(f"file:{path}")
    await store.migrate()
    await store.create_runs([_new("quick") for _ in range(50)])
    await store.close()
    conn = sqlite3.connect(path)
    try:
        params = (
            "id",
            "quick",
            "{}",
            "{}",
            None,
            "k",
            0,
            None,
            None,
            None,
            None,
            "w/1",
            30.0,
            '["quick"]',
            1,
        )
        rows = conn.execute("EXPLAIN QUERY PLAN " + q.INSERT_OFFERED_RUN, params).fetchall()
    finally:
        conn.close()
    plan = "\n".join(str(row[-1]) for row in rows)
    assert "durably_runs_ready" in plan and "durably_runs_due" in plan, plan
    assert "SCAN durably_runs" not in plan, plan
    assert plan.count("durably_runs_ready") == 1, plan  # decided once, not once per column


# --- across processes ------------------------------------------------------------------------

HOST = Path(__file__).parent / "procs" / "host.py"


@pytest.fixture(params=["local", "remote"])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield f"file:{tmp_path / 'hosts.db'}"
        return
    with SqldServer(tmp_path / "sqld") as server:
        yield server.http_url


def _spawn(url: str, tmp_path: Path, name: str, runs: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, str(HOST), url, str(tmp_path / "log"), "--id", name]
    command += ["--stop-file", str(tmp_path / "stop"), "--ready-file", str(tmp_path / "ready")]
    command += ["--go-file", str(tmp_path / "go"), "--concurrency", "2", "--trigger", str(runs)]
    with (tmp_path / f"{name}.out").open("w") as output:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _most_at_once(marks: list[tuple[int, int]]) -> int:
    """The most runs executing at once, from (time, +1 start / -1 end) marks."""
    most = inside = 0
    for _, change in sorted(marks):
        inside += change
        most = max(most, inside)
    return most


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_two_hosts_triggering_at_once_lease_within_their_slots_and_run_each_once(
    shared_url: str, tmp_path: Path
) -> None:
    store = open_storage(shared_url)
    await store.migrate()
    log = AsyncPath(tmp_path / "log")
    await log.touch()
    await AsyncPath(tmp_path / "ready").touch()
    hosts = [_spawn(shared_url, tmp_path, name, 8) for name in ("A", "B")]
    try:
        with anyio.fail_after(30):
            while len((await AsyncPath(tmp_path / "ready").read_text()).split("\n")) < 3:
                assert all(host.poll() is None for host in hosts)
                await anyio.sleep(0.05)
        await AsyncPath(tmp_path / "go").touch()
        with anyio.fail_after(60):
            while sum(line.startswith("end ") for line in (await log.read_text()).splitlines()) < 16:
                assert all(host.poll() is None for host in hosts)
                await anyio.sleep(0.1)
        await AsyncPath(tmp_path / "stop").touch()
        codes = [await to_thread.run_sync(host.wait, 30) for host in hosts]
    finally:
        for host in hosts:
            if host.poll() is None:
                host.kill()
                await to_thread.run_sync(host.wait)
    assert codes == [0, 0]
    lines = [line.split() for line in (await log.read_text()).splitlines()]
    triggered = {fields[1]: (fields[2], fields[3]) for fields in lines if fields[0] == "trigger"}
    starts = {fields[1]: fields[2] for fields in lines if fields[0] == "start"}
    assert len(triggered) == 16 and set(starts) == set(triggered)
    assert len([fields for fields in lines if fields[0] == "start"]) == 16  # each run once
    leased = [run_id for run_id, (_, status) in triggered.items() if status == "leased"]
    assert leased  # the first trigger to land has nothing ahead of it
    assert all(starts[run_id] == triggered[run_id][0] for run_id in leased)  # run where created
    for name in ("A", "B"):
        marks = [
            (int(f[4]), 1 if f[0] == "start" else -1)
            for f in lines
            if f[0] in ("start", "end") and f[2] == name
        ]
        assert _most_at_once(marks) <= 2, name
    runs = await store.get_runs(RunFilter(limit=20))
    await store.close()
    assert len(runs) == 16 and all(run.status == "completed" for run in runs)
