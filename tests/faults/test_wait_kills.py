"""Durable sleeps under faults: workers SIGKILLed mid-wait and sqld restarted; every sleep is
entered once, by one worker, and every run completes once with no stored step run again."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest
from anyio import to_thread

from durably import Durably

from ..procs.effects import Effects
from ..support.sqld import SqldServer
from ._fleet import client, fleet
from ._ledger import tally
from .conftest import Report

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.faults]

HOSTS, CONCURRENCY, RUNS, STEPS, KILLS = 3, 2, 30, 2, 3


async def _unfinished(durably: Durably) -> int:
    try:
        return len(await durably.get_runs(status=["pending", "leased", "waiting"], limit=RUNS))
    except Exception:  # the database is restarting
        return -1


@pytest.mark.timeout(150)
async def test_sleeping_runs_survive_worker_kills_and_an_sqld_restart(
    sqld: SqldServer, tmp_path: Path, fault_report: Report
) -> None:
    rng = random.Random()
    async with fleet(tmp_path, sqld.http_url) as hosts, client(sqld.http_url) as durably:
        for i in range(HOSTS):
            await hosts.spawn(f"h{i}", concurrency=CONCURRENCY, wait_for_go=True)
        await hosts.wait_ready(HOSTS)
        runs = await durably.jobs.effects.batch_trigger([Effects(steps=STEPS, work=0.05, nap=0.4)] * RUNS)
        await hosts.go()
        await hosts.started(HOSTS)
        waiting_at_faults = len(await durably.get_runs(status="waiting", limit=RUNS))
        # The server first: a host started while it is down cannot migrate and exits.
        await to_thread.run_sync(sqld.kill)
        await anyio.sleep(0.3)
        await to_thread.run_sync(sqld.start)  # the same data directory and port
        for i in range(KILLS):
            await anyio.sleep(rng.uniform(0.1, 0.4))
            await hosts.kill(rng.choice(hosts.hosts))
            await hosts.spawn(f"r{i}", concurrency=CONCURRENCY)

        async def drained() -> bool:
            return await _unfinished(durably) == 0

        await hosts.until(drained, "every run finished", 90)
        await hosts.stop()
        ledger = await tally(durably, runs, hosts.log)
        naps = [len([s for s in await durably.get_steps(run.id) if s.name.startswith("nap")]) for run in runs]

    fault_report(kills=hosts.kills, restarts=1, waiting_at_faults=waiting_at_faults, **ledger.record())
    ledger.check(rerun_bound=hosts.kills * CONCURRENCY + HOSTS * CONCURRENCY)
    assert naps == [STEPS] * RUNS  # every sleep's deadline stored once
    # Each sleep is entered by one worker: never more run:wait events than sleeps (a kill
    # between the write and its event may take one away).
    assert max(ledger.waits.values()) <= STEPS, ledger.waits
    assert sum(ledger.waits.values()) >= RUNS * STEPS - hosts.kills * CONCURRENCY
