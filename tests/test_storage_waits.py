"""The ``Storage`` contract of waits (SPEC §12): ``wait``, ``send_signal``, ``next_wake_at``,
waking parents and cancelling descendants; on every adapter."""

from __future__ import annotations

import time

import anyio
import pytest

from durably import ConflictError, NotFoundError
from durably._codec import decode
from durably._models import ClaimedRun, NewRun
from durably._storage._protocol import Lease, RunFilter, Storage, Telemetry, WaitRequest
from tests.support.runs import new_run

pytestmark = pytest.mark.anyio

NOTHING = Telemetry()


def _new(job: str = "job", *, key: str | None = None, parent: str | None = None) -> NewRun:
    return new_run(job, idempotency_key=key, parent_run_id=parent)


async def _claim_one(storage: Storage, job: str = "job") -> ClaimedRun:
    [claimed] = (await storage.claim_runs(worker_id="w", job_names=[job], limit=1, lease_seconds=30.0)).runs
    return claimed


async def _leased(storage: Storage) -> Lease:
    await storage.create_runs([_new()])
    claimed = await _claim_one(storage)
    return Lease(claimed.run.id, claimed.lease_generation)


def _sleep(seconds: float) -> WaitRequest:
    return WaitRequest(key="nap", index=0, waiting_for="sleep", timer_key="nap", timer=seconds)


async def test_a_sleep_parks_the_run_until_its_deadline(storage: Storage) -> None:
    lease = await _leased(storage)
    result = await storage.wait(lease, _sleep(0.3), NOTHING)
    assert result.state == "waiting" and result.wake_at is not None
    run = await storage.get_run(lease.run_id)
    assert run is not None and (run.status, run.waiting_for) == ("waiting", "sleep")
    assert not await storage.renew_leases([lease], lease_seconds=30.0)  # the lease is released
    assert (await storage.claim_runs(worker_id="w", job_names=["job"], limit=1, lease_seconds=30)).runs == []
    await anyio.sleep(0.4)
    again = await _claim_one(storage)
    assert again.run.wake_at is None and again.run.waiting_for is None
    assert decode(again.steps["nap"][1]) == pytest.approx(result.wake_at)  # the deadline, stored once
    lease = Lease(again.run.id, again.lease_generation)
    assert (await storage.wait(lease, _sleep(0.3), NOTHING)).state == "resolved"  # passed: no new wait


async def test_a_wait_with_a_stale_lease_changes_nothing(storage: Storage) -> None:
    lease = await _leased(storage)
    stale = Lease(lease.run_id, lease.generation - 1)
    assert (await storage.wait(stale, _sleep(5), NOTHING)).state == "lost"
    run = await storage.get_run(lease.run_id)
    assert run is not None and run.status == "leased"
    assert await storage.get_steps(lease.run_id) == []


def _signal_wait(key: str = "signal:go", timer: float | None = None) -> WaitRequest:
    return WaitRequest(
        key=key,
        index=0,
        waiting_for="signal:go",
        timer_key=None if timer is None else f"{key}@deadline",
        timer=timer,
        signal="go",
    )


async def test_signals_are_kept_and_each_is_consumed_by_one_wait(storage: Storage) -> None:
    lease = await _leased(storage)
    await storage.send_signal(lease.run_id, "go", b'"first"')
    await storage.send_signal(lease.run_id, "go", b'"second"')
    first = await storage.wait(lease, _signal_wait(), NOTHING)
    assert (first.state, decode(first.output or b"")["signal"]) == ("resolved", "first")
    # The same wait again (a replay) consumes nothing more.
    assert decode((await storage.wait(lease, _signal_wait(), NOTHING)).output or b"")["signal"] == "first"
    second = await storage.wait(lease, _signal_wait("signal:go#2"), NOTHING)
    assert decode(second.output or b"")["signal"] == "second"
    third = await storage.wait(lease, _signal_wait("signal:go#3"), NOTHING)
    assert (third.state, third.wake_at) == ("waiting", None)
    await storage.send_signal(lease.run_id, "other", b"1")  # another name does not wake it
    assert (await storage.claim_runs(worker_id="w", job_names=["job"], limit=1, lease_seconds=30)).runs == []
    await storage.send_signal(lease.run_id, "go", b'"third"')
    claimed = await _claim_one(storage)
    lease = Lease(claimed.run.id, claimed.lease_generation)
    third = await storage.wait(lease, _signal_wait("signal:go#3"), NOTHING)
    assert decode(third.output or b"")["signal"] == "third"


async def _signals_kept(storage: Storage) -> int:
    [[(count,)]] = await storage._driver.write([("SELECT COUNT(*) FROM durably_signals", ())])  # type: ignore[attr-defined]
    return int(count)


async def test_consumed_signals_and_those_of_deleted_runs_are_not_kept(storage: Storage) -> None:
    lease = await _leased(storage)
    await storage.send_signal(lease.run_id, "go", b"1")
    await storage.send_signal(lease.run_id, "go", b"2")
    await storage.wait(lease, _signal_wait(), NOTHING)
    assert await _signals_kept(storage) == 1  # the consumed one is gone, in the same write
    assert await storage.complete_run(lease, b"1", NOTHING)
    await storage.delete_run(lease.run_id)
    assert await _signals_kept(storage) == 0


async def test_a_signal_wait_times_out_on_the_database_clock(storage: Storage) -> None:
    lease = await _leased(storage)
    waiting = await storage.wait(lease, _signal_wait(timer=0.2), NOTHING)
    assert waiting.state == "waiting" and waiting.wake_at is not None
    await anyio.sleep(0.3)
    claimed = await _claim_one(storage)
    lease = Lease(claimed.run.id, claimed.lease_generation)
    timed_out = await storage.wait(lease, _signal_wait(timer=0.2), NOTHING)
    assert decode(timed_out.output or b"") == {"timeout": True}


async def test_send_signal_refuses_unknown_and_ended_runs(storage: Storage) -> None:
    with pytest.raises(NotFoundError):
        await storage.send_signal("nope", "go", b"1")
    lease = await _leased(storage)
    assert await storage.complete_run(lease, b"1", NOTHING)
    with pytest.raises(ConflictError, match="completed"):
        await storage.send_signal(lease.run_id, "go", b"1")


async def test_children_are_created_once_and_the_last_to_end_wakes_the_parent(storage: Storage) -> None:
    lease = await _leased(storage)

    def request() -> WaitRequest:  # new ids each replay: the idempotency keys decide
        children = tuple(_new("child", key=f"{lease.run_id}/kids/{i}", parent=lease.run_id) for i in range(2))
        return WaitRequest(key="kids", index=0, waiting_for="runs", children=children)

    assert (await storage.wait(lease, request(), NOTHING)).state == "waiting"
    kids = (await storage.claim_runs(worker_id="w", job_names=["child"], limit=5, lease_seconds=30)).runs
    assert len(kids) == 2 and {k.run.parent_run_id for k in kids} == {lease.run_id}
    parent = await storage.get_run(lease.run_id)
    assert parent is not None and parent.waiting_for == "runs:" + ",".join(k.run.id for k in kids)
    assert await storage.complete_run(Lease(kids[0].run.id, kids[0].lease_generation), b"1", NOTHING)
    assert (await storage.claim_runs(worker_id="w", job_names=["job"], limit=1, lease_seconds=30)).runs == []
    assert await storage.fail_run(Lease(kids[1].run.id, kids[1].lease_generation), "E: x", NOTHING)
    claimed = await _claim_one(storage)  # woken by the last child, in the same write
    lease = Lease(claimed.run.id, claimed.lease_generation)
    outcome = decode((await storage.wait(lease, request(), NOTHING)).output or b"")
    assert outcome == [[kids[0].run.id, "completed", 1, None], [kids[1].run.id, "failed", None, "E: x"]]
    assert len(await storage.get_runs(RunFilter(job_names=("child",)))) == 2  # created once


async def test_cancel_run_cancels_descendants_and_wakes_a_waiting_parent(storage: Storage) -> None:
    lease = await _leased(storage)
    child = _new("child", key="k", parent=lease.run_id)
    assert (
        await storage.wait(
            lease, WaitRequest(key="kid", index=0, waiting_for="runs", children=(child,)), NOTHING
        )
    ).state == "waiting"
    [grandchild] = await storage.create_runs([_new("child", key="g", parent=child.id)])
    await storage.cancel_run(lease.run_id)
    for run_id in (child.id, grandchild.id):
        run = await storage.get_run(run_id)
        assert run is not None and run.status == "cancelled"
    # A cancelled child wakes its waiting parent.
    lease = await _leased(storage)
    other = _new("child", key="k2", parent=lease.run_id)
    await storage.wait(lease, WaitRequest(key="kid", index=0, waiting_for="runs", children=(other,)), NOTHING)
    await storage.cancel_run(other.id)
    assert (await _claim_one(storage)).run.id == lease.run_id


async def test_next_wake_at(storage: Storage) -> None:
    assert await storage.next_wake_at(["job"]) is None
    lease = await _leased(storage)
    expiry = await storage.next_wake_at(["job"])  # the lease's expiry
    assert expiry is not None and expiry > time.time() + 20
    await storage.wait(lease, _sleep(100), NOTHING)
    woken = await storage.next_wake_at(["job"])
    assert woken is not None and 90 < woken - time.time() < 110
    assert await storage.next_wake_at(["other"]) is None
    await storage.create_runs([_new()])
    now = await storage.next_wake_at(["job"])
    assert now is not None and abs(now - time.time()) < 5
