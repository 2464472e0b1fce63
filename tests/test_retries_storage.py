"""The Storage contract of retries (``retry_run_later``, ``postpone_run``) on every adapter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import anyio
import pytest

from durably._ids import new_run_id
from durably._models import ClaimedRun, NewRun, Run
from durably._storage._protocol import Lease, StepRecord, Storage, Telemetry

pytestmark = pytest.mark.anyio

JOBS = ["job"]


async def _claimed(storage: Storage, *, lease_seconds: float = 30.0) -> list[ClaimedRun]:
    claim = await storage.claim_runs(worker_id="w", job_names=JOBS, limit=10, lease_seconds=lease_seconds)
    return claim.runs


async def _leased(storage: Storage) -> tuple[Run, Lease]:
    new = NewRun(
        id=new_run_id(), job_name="job", input=b"{}", labels={}, idempotency_key=None, concurrency_key=None
    )
    [run] = await storage.create_runs([new])
    [claimed] = await _claimed(storage)
    return run, Lease(run.id, claimed.lease_generation)


def _record(name: str, *, output: bytes | None = None, attempts: int = 1) -> StepRecord:
    now = datetime.now(UTC).timestamp()
    error = None if output is not None else "RuntimeError: boom"
    completed = now if output is not None else None
    return StepRecord(
        name=name,
        index=0,
        output=output,
        error=error,
        started_at=now,
        completed_at=completed,
        attempts=attempts,
    )


async def test_retry_run_later_makes_the_run_pending_for_its_next_attempt_at_the_wake_time(
    storage: Storage,
) -> None:
    run, lease = await _leased(storage)
    assert await storage.save_step(lease, _record("done", output=b'"x"'), Telemetry())
    before = datetime.now(UTC)
    # Long enough that even a loaded machine claims again before it: the claim must wait.
    wake_at = await storage.retry_run_later(lease, "RuntimeError: boom", 1.5, Telemetry())
    assert wake_at is not None
    assert before + timedelta(seconds=1.3) < wake_at < before + timedelta(seconds=10)  # database clock
    stored = await storage.get_run(run.id)
    assert stored is not None
    assert (stored.status, stored.attempt, stored.error, stored.wake_at) == (
        "pending",
        2,
        "RuntimeError: boom",
        wake_at,
    )
    assert await _claimed(storage) == []  # not before wake_at
    assert not await storage.renew_leases([lease], lease_seconds=30)  # the lease is released
    await anyio.sleep(max(0.0, (wake_at - datetime.now(UTC)).total_seconds()) + 0.3)
    [again] = await _claimed(storage)
    assert again.run.attempt == 2 and again.run.wake_at is None
    assert set(again.steps) == {"done"}  # completed steps are kept
    assert await storage.complete_run(Lease(run.id, again.lease_generation), b"1", Telemetry())
    done = await storage.get_run(run.id)
    assert done is not None and done.error is None  # the last failure is cleared on completion


async def test_postpone_run_stores_the_failed_attempt_and_a_resumed_claim_counts_on(storage: Storage) -> None:
    run, lease = await _leased(storage)
    wake_at = await storage.postpone_run(lease, _record("flaky", attempts=2), 1.5, Telemetry())
    assert wake_at is not None
    stored = await storage.get_run(run.id)
    assert stored is not None
    assert (stored.status, stored.attempt, stored.error) == ("pending", 1, None)
    [step] = await storage.get_steps(run.id)
    assert (step.name, step.status, step.completed_at) == ("flaky", "failed", None)
    assert await _claimed(storage) == []
    await anyio.sleep(max(0.0, (wake_at - datetime.now(UTC)).total_seconds()) + 0.3)
    [claimed] = await _claimed(storage)
    assert claimed.step_attempts == {"flaky": 2}
    assert claimed.steps == {}


async def test_a_step_that_failed_for_good_is_not_counted_on(storage: Storage) -> None:
    _, lease = await _leased(storage)
    ended = _record("flaky", attempts=3)
    ended.completed_at = ended.started_at  # the final failure: the step ended
    assert await storage.save_step(lease, ended, Telemetry())
    assert await storage.release_lease(lease, Telemetry())
    [claimed] = await _claimed(storage)
    assert claimed.step_attempts == {}


async def test_retry_writes_under_a_lost_lease_change_nothing(storage: Storage) -> None:
    run, lease = await _leased(storage)
    assert await storage.release_lease(lease, Telemetry())
    [claimed] = await _claimed(storage)
    assert await storage.retry_run_later(lease, "E: x", 0.1, Telemetry()) is None
    assert await storage.postpone_run(lease, _record("s", attempts=2), 0.1, Telemetry()) is None
    stored = await storage.get_run(run.id)
    assert stored is not None
    assert (stored.status, stored.attempt, stored.error, stored.wake_at) == ("leased", 1, None, None)
    assert await storage.get_steps(run.id) == []
    assert claimed.lease_generation == lease.generation + 1
