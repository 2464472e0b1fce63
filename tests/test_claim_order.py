"""The claim with durable time: priority first, then trigger order; runs due later are never read."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import anyio
import pytest

from durably import open_storage
from durably._models import NewRun, Run
from durably._storage import _queries as q
from durably._storage._protocol import RunFilter, Storage
from tests.support.runs import new_run

pytestmark = pytest.mark.anyio


def _new(
    *, priority: int = 0, delay: float | None = None, run_at: float | None = None, key: str | None = None
) -> NewRun:
    return new_run(concurrency_key=key, priority=priority, delay=delay, run_at=run_at)


async def _claim_ids(storage: Storage, limit: int = 10) -> list[str]:
    claim = await storage.claim_runs(worker_id="w", job_names=["job"], limit=limit, lease_seconds=30.0)
    return [c.run.id for c in claim.runs]


async def test_higher_priority_is_claimed_first_then_trigger_order(storage: Storage) -> None:
    low, high, low2, high2 = await storage.create_runs([_new(), _new(priority=5), _new(), _new(priority=5)])
    claimed = (await storage.claim_runs(worker_id="w", job_names=["job"], limit=3, lease_seconds=30.0)).runs
    assert [c.run.id for c in claimed] == sorted([high.id, high2.id, low.id])
    assert {c.run.priority for c in claimed} == {5, 0}
    assert await _claim_ids(storage) == [low2.id]


async def test_a_delayed_run_is_not_claimable_before_its_time(storage: Storage) -> None:
    [delayed] = await storage.create_runs([_new(delay=0.4)])
    [at] = await storage.create_runs([_new(run_at=time.time() + 0.4)])
    assert delayed.status == "pending"
    assert delayed.wake_at is not None and at.wake_at is not None
    assert await _claim_ids(storage) == []
    await anyio.sleep(0.6)
    assert sorted(await _claim_ids(storage)) == sorted([delayed.id, at.id])
    run = await storage.get_run(delayed.id)
    assert run is not None and run.wake_at is None and run.status == "leased"


async def test_a_due_run_keeps_its_priority_against_ready_ones(storage: Storage) -> None:
    [ready] = await storage.create_runs([_new()])
    [due] = await storage.create_runs([_new(delay=0.05, priority=9)])
    await anyio.sleep(0.2)
    assert await _claim_ids(storage, limit=1) == [due.id]
    assert await _claim_ids(storage, limit=1) == [ready.id]


async def test_a_delayed_keyed_run_does_not_hold_back_its_key_until_due(storage: Storage) -> None:
    [later] = await storage.create_runs([_new(delay=60.0, key="k")])
    [now] = await storage.create_runs([_new(key="k")])
    assert await _claim_ids(storage) == [now.id]
    assert later.id not in await _claim_ids(storage)


async def test_cancel_takes_a_waiting_or_delayed_run(storage: Storage) -> None:
    [delayed] = await storage.create_runs([_new(delay=60.0)])
    run, changed = await storage.cancel_run(delayed.id)
    assert changed and run.status == "cancelled" and run.wake_at is None


def _plan(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("EXPLAIN QUERY PLAN " + q.CLAIM_RUNS, ("w", 30.0, '["job"]', 8)).fetchall()
    finally:
        conn.close()
    return "\n".join(str(row[-1]) for row in rows)


async def test_the_claim_reads_ready_and_due_runs_through_their_indexes(tmp_path: Path) -> None:
    path = tmp_path / "plan.db"
    store = open_storage(f"file:{path}")
    await store.migrate()
    # Many runs due later and many waiting without a time: the plan must not scan them.
    await store.create_runs([_new(delay=3600.0) for _ in range(200)])
    await store.close()
    plan = _plan(path)
    assert "durably_runs_ready" in plan and "durably_runs_due" in plan, plan
    assert "SCAN durably_runs" not in plan.replace("SCAN durably_runs AS o", ""), plan


async def test_existing_runs_upgrade_with_defaults(tmp_path: Path) -> None:
    fixture = Path(__file__).parent / "fixtures" / "durably-0.1.0.db"
    path = tmp_path / "old.db"
    path.write_bytes(fixture.read_bytes())
    store = open_storage(f"file:{path}")
    try:
        await store.migrate()
        runs: list[Run] = await store.get_runs(RunFilter())
    finally:
        await store.close()
    assert len(runs) == 5
    assert {run.priority for run in runs} == {0}
    assert all(run.wake_at is None and run.waiting_for is None and run.parent_run_id is None for run in runs)
