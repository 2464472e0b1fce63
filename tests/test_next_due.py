"""An idle claim learns when the next run of its jobs becomes due (``Claim.next_due_in``), so
a backed-off worker claims on time runs that another host made wait (durably/_polling.py).

Times are never asserted as limits of speed: each bound below is seconds away from what
the worker would do without the behaviour under test.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from durably import Durably, StepContext, create_durably, define_job, open_storage
from durably._models import NewRun, Run
from durably._storage import _queries as q
from durably._storage._protocol import Claim, Lease, Storage, Telemetry, WaitRequest
from tests.support.proxy import TcpProxy
from tests.support.runs import new_run

from .conftest import Database

pytestmark = pytest.mark.anyio

NAP = 5.0  # seconds a run made to wait elsewhere waits


class TimedClaims:
    """A real storage whose claims are written down: when each was sent, and what came back."""

    def __init__(self, inner: Storage) -> None:
        self._inner = inner
        self.claims: list[tuple[float, Claim]] = []
        self._answered = anyio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def claim_runs(self, **options: Any) -> Claim:
        sent = anyio.current_time()
        claim: Claim = await self._inner.claim_runs(**options)
        self.claims.append((sent, claim))
        self._answered.set()
        self._answered = anyio.Event()
        return claim

    def sent(self) -> list[float]:
        return [sent for sent, _ in self.claims]

    def first_claim_of(self, run_id: str) -> float:
        return min(sent for sent, claim in self.claims if any(c.run.id == run_id for c in claim.runs))

    async def next_answer(self) -> None:
        with anyio.fail_after(60):
            await self._answered.wait()

    async def until_waiting_at_least(self, seconds: float) -> None:
        """Return right after the answer of a claim that followed an idle wait of ``seconds`` or more."""
        while len(self.claims) < 2 or self.claims[-1][0] - self.claims[-2][0] < seconds:
            await self.next_answer()


def timed(storage: Storage, **options: Any) -> tuple[Durably, TimedClaims]:
    claims = TimedClaims(storage)
    options.setdefault("heartbeat_interval", 0.1)
    options.setdefault("stale_threshold", 1.0)
    return create_durably(claims, **options), claims  # type: ignore[arg-type]


@define_job(name="due-echo", input=dict[str, Any])
async def echo(step: StepContext, payload: dict[str, Any]) -> Any:
    return payload


@define_job(name="due-sleeper", input=dict[str, Any])
async def sleeper(step: StepContext, payload: dict[str, Any]) -> Any:
    await step.sleep("nap", NAP)
    return "rested"


def _monotonic(run: Run) -> float:
    """When ``run`` becomes due, as this host's monotonic time (database and test share a clock)."""
    assert run.wake_at is not None
    return anyio.current_time() + run.wake_at.timestamp() - time.time()


# --- the storage contract -------------------------------------------------------------


def _new(job: str = "job", *, delay: float | None = None, key: str | None = None) -> NewRun:
    return new_run(job, concurrency_key=key, delay=delay)


async def _claim(storage: Storage, within: float = 120.0) -> Claim:
    return await storage.claim_runs(
        worker_id="w", job_names=["job"], limit=1, lease_seconds=30, next_due_within=within
    )


async def test_a_claim_tells_when_the_next_run_of_its_jobs_becomes_due(
    database: Database, storage: Storage
) -> None:
    assert await _claim(storage) == Claim([], None)
    await storage.create_runs([_new(delay=60.0), _new("other", delay=10.0), _new()])
    started = time.monotonic()

    def remaining() -> float:
        return 60.0 - (time.monotonic() - started)

    took = await _claim(storage)
    # A local claim that took a run does not read it: the worker looks again soon.
    assert took.next_due_in == (None if database.kind == "local" else pytest.approx(60.0, abs=1.0))
    # A waiting run counts too; once cancelled, it no longer does.
    [held] = took.runs
    nap = WaitRequest(key="nap", index=0, waiting_for="sleep", timer_key="nap", timer=20.0)
    lease = Lease(held.run.id, held.lease_generation)
    assert (await storage.wait(lease, nap, Telemetry())).state == "waiting"
    assert await _claim(storage) == Claim([], pytest.approx(20.0, abs=1.0))
    await storage.cancel_run(held.run.id)
    assert await _claim(storage) == Claim([], pytest.approx(remaining(), abs=1.0))
    assert await _claim(storage, within=30.0) == Claim([], None)  # not within the window asked
    # A run due now but not claimable (its key is held) is not worth waking for.
    await storage.create_runs([_new(key="k")])
    assert len((await _claim(storage)).runs) == 1
    await storage.create_runs([_new(delay=0.1, key="k")])
    await anyio.sleep(0.2)
    assert await _claim(storage) == Claim([], pytest.approx(remaining(), abs=1.0))


async def test_the_next_due_time_reads_only_runs_due_within_the_window(tmp_path: Path) -> None:
    storage = open_storage(f"file:{tmp_path / 'plan.db'}")
    await storage.migrate()
    await storage.close()
    conn = sqlite3.connect(tmp_path / "plan.db")
    try:
        plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {q.NEXT_DUE}", ['["job"]', 2.0])]
    finally:
        conn.close()
    # Bounded on both sides: runs parked for later (of any job) are never read.
    assert "SEARCH durably_runs USING INDEX durably_runs_due (wake_at>? AND wake_at<?)" in plan, plan


# --- the worker -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sleep", "delayed trigger"])
async def test_a_run_made_to_wait_elsewhere_is_claimed_at_its_due_time(database: Database, kind: str) -> None:
    durably, claims = timed(database.open(), polling_interval=0.3, max_polling_interval=30.0)
    elsewhere = create_durably(database.open()).register(sleeper=sleeper, echo=echo)  # never serves
    try:
        async with durably.register(sleeper=sleeper, echo=echo):
            # Claims at +0.3, 0.9, 2.1 s, then 4.5 and 9.3: the run parked now is due at
            # ≈ 7.2 s, and without a due time learned its first claim would be at 9.3 s.
            await claims.until_waiting_at_least(1.2)
            if kind == "sleep":
                run = await elsewhere.jobs.sleeper.trigger({})
                assert await elsewhere.process_one()  # elsewhere claims it and it begins to sleep
            else:
                run = await elsewhere.jobs.echo.trigger({}, delay=NAP)
            parked = await elsewhere.get_run(run.id)
            assert parked is not None and parked.status in ("waiting", "pending"), parked
            due = _monotonic(parked)
            ended = await durably.wait_for_run(run.id, timeout=30)
    finally:
        await elsewhere.close()
    assert ended.status == "completed", ended.error
    late = claims.first_claim_of(run.id) - due
    around = [round(sent - due, 2) for sent in claims.sent()]
    assert -0.1 <= late < 1.0, f"claimed {late:+.2f} s from its due time; claims at {around}"


async def test_a_cancelled_due_time_costs_one_empty_claim(database: Database) -> None:
    durably, claims = timed(database.open(), polling_interval=0.25, max_polling_interval=30.0)
    elsewhere = create_durably(database.open()).register(echo=echo)  # never serves
    try:
        async with durably.register(echo=echo):
            await claims.until_waiting_at_least(0.9)  # claims at +0.25, 0.75, 1.75; then 3.75, 7.75
            run = await elsewhere.jobs.echo.trigger({}, delay=4.0)  # due at ≈ 5.8 s
            due = _monotonic(run)
            await claims.next_answer()  # at 3.75 s the worker learns the due time
            await elsewhere.cancel(run.id)
            await anyio.sleep(due + 4.0 - anyio.current_time())
    finally:
        await elsewhere.close()
    near = [sent - due for sent in claims.sent() if sent > due - 1.0]
    # One claim at the due time (not 7.75 s); then the backoff goes on: the next at ≈ +8 s,
    # where polling from the start would claim again 0.25, 0.75, 1.75 s after it.
    assert len(near) == 1 and -0.1 <= near[0] < 0.6, near


async def test_an_idle_worker_sends_one_request_per_claim_remotely(proxy: TcpProxy) -> None:
    setup = create_durably(proxy.url).register(echo=echo)
    await setup.jobs.echo.trigger({}, delay=3600.0)  # due far beyond the ceiling: changes nothing
    await setup.close()
    durably, claims = timed(open_storage(proxy.url), polling_interval=0.05, max_polling_interval=0.4)
    durably.register(echo=echo)
    await durably.migrate()
    proxy.reset_counters()
    durably.start()
    await anyio.sleep(3.0)
    await durably.close()
    # Claims at once, +0.05, 0.15, 0.35, 0.75, then every 0.4 s.
    assert 7 <= len(claims.claims) <= 12, claims.sent()
    assert all(claim.next_due_in is None for _, claim in claims.claims)
    assert proxy.http_requests == len(claims.claims)
