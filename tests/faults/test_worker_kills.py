"""Worker processes SIGKILLed at random moments: every run completes once, no stored step runs again."""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import pytest

from ..procs.effects import Effects
from ..test_many_hosts import Target
from ._fleet import Fleet, client, fleet
from ._ledger import tally
from .conftest import Report

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.faults]

HOSTS, CONCURRENCY, RUNS, KILLS = 3, 2, 80, 6


def _seed() -> int:
    """``FAULTS_SEED`` replays a pattern of kills; otherwise a fresh one, reported with the figures."""
    return int(os.environ.get("FAULTS_SEED") or random.SystemRandom().randrange(2**32))


async def _kill_at_random(hosts: Fleet, rng: random.Random, kills: int) -> None:
    """SIGKILL a random host at random moments, starting a fresh one in its place each time."""
    for i in range(kills):
        await anyio.sleep(rng.uniform(0.2, 0.6))
        await hosts.kill(rng.choice(hosts.hosts))
        await hosts.spawn(f"r{i}", concurrency=CONCURRENCY)


@pytest.mark.timeout(150)
async def test_workers_sigkilled_at_random_moments_lose_no_run_and_rerun_no_stored_step(
    target: Target, tmp_path: Path, fault_report: Report
) -> None:
    seed = _seed()
    async with fleet(tmp_path, target.url) as hosts, client(target.url) as durably:
        for i in range(HOSTS):
            await hosts.spawn(f"h{i}", concurrency=CONCURRENCY, wait_for_go=True)
        await hosts.wait_ready(HOSTS)
        runs = await durably.jobs.effects.batch_trigger([Effects(steps=3, work=0.1)] * RUNS)
        await hosts.go()
        await hosts.started(HOSTS * CONCURRENCY)
        await _kill_at_random(hosts, random.Random(seed), KILLS)
        unfinished_after_kills = await hosts.unfinished(durably, RUNS)
        await hosts.drain(durably, RUNS, timeout=90)
        await hosts.stop()
        ledger = await tally(durably, runs, hosts.log)

    fault_report(
        adapter=target.kind,
        seed=seed,
        kills=hosts.kills,
        restarts=0,
        faults_injected=hosts.kills,
        unfinished_after_kills=unfinished_after_kills,
        **ledger.record(),
    )
    assert hosts.kills == KILLS
    assert unfinished_after_kills > 0, "the workload ended before the last kill: nothing was in flight"
    # A kill interrupts at most the steps its host was running: one per slot.
    ledger.check(rerun_bound=hosts.kills * CONCURRENCY)
    assert ledger.reexecutions > 0, "no kill interrupted a step: the faults did not hit the work"
    # A host killed between storing a completion and emitting it takes the event with it.
    assert ledger.completion_unreported <= hosts.kills
