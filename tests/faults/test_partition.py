"""One worker cut off from sqld (its own proxy blackholed) while the others keep working:
its runs are taken over, and once the link heals it writes nothing for them (fencing)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest

from durably import Durably, Run

from ..procs.effects import Effects
from ..support.proxy import TcpProxy
from ..support.sqld import SqldServer
from ._fleet import STALE, Fleet, client, fleet, proxy_to
from ._ledger import Ledger, tally, to_ns
from .conftest import Report

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.faults]

CONCURRENCY, RUNS = 2, 40
# A request forwarded just before the blackhole still lands; nothing sent later does.
IN_FLIGHT_NS = 200_000_000


@dataclass
class Partition:
    """What happened to the cut-off host ``A`` and its runs."""

    ledger: Ledger
    held: list[str]  # runs A had begun and not finished (nor sent its completion) when cut off
    taken_over: int  # of those, finished by another host
    writes_after: list[str]  # rows A stored after it was cut off (must be none)
    lease_lost_reported: int  # LeaseLostError reported by A


async def _partition_one_host(sqld: SqldServer, tmp_path: Path, proxy: TcpProxy) -> Partition:
    """A works through ``proxy``, B and C directly; A is cut off once it runs steps."""
    async with fleet(tmp_path, sqld.http_url) as hosts, client(sqld.http_url) as durably:
        await hosts.spawn("A", concurrency=CONCURRENCY, wait_for_go=True, url=proxy.url)
        for name in ("B", "C"):
            await hosts.spawn(name, concurrency=CONCURRENCY, wait_for_go=True)
        await hosts.wait_ready(3)
        runs = await durably.jobs.effects.batch_trigger([Effects(steps=3, work=0.1)] * RUNS)
        await hosts.go()
        await hosts.started(2, host="A")
        proxy.drop()
        cut_at = time.time_ns()
        await hosts.drain(durably, RUNS, timeout=60)  # B and C finish everything, A's runs too
        proxy.heal()  # A's held requests reach sqld now: every one must be refused
        await anyio.sleep(3 * STALE)
        await hosts.stop()
        return await _account(durably, hosts, runs, cut_at)


async def _account(durably: Durably, hosts: Fleet, runs: list[Run], cut_at: int) -> Partition:
    ledger = await tally(durably, runs, hosts.log)
    began_by_a = {line[0] for line in await hosts.begun("A")}
    held, taken_over, writes_after = [], 0, []
    for run in runs:
        stored = await durably.get_run(run.id)
        assert stored is not None
        # A run that A completed with a request already on its way is not one it lost.
        if run.id not in began_by_a or to_ns(stored.completed_at) <= cut_at + IN_FLIGHT_NS:
            continue
        held.append(run.id)
        taken_over += stored.output["finished_by"] != "A"
        for step in await durably.get_steps(run.id):
            if step.output["host"] == "A" and to_ns(step.completed_at) > cut_at + IN_FLIGHT_NS:
                writes_after.append(f"{run.id}/{step.name}")
        if stored.output["finished_by"] == "A" and to_ns(stored.completed_at) > cut_at + IN_FLIGHT_NS:
            writes_after.append(run.id)
    reported = _lease_lost_reported_by(hosts, "A")
    return Partition(ledger, held, taken_over, writes_after, reported)


def _lease_lost_reported_by(hosts: Fleet, name: str) -> int:
    events = Path(f"{hosts.log}.events")
    lines = [line.split() for line in events.read_text().splitlines()] if events.exists() else []
    return sum(1 for kind, _run, host, _pid, detail in lines if host == name and detail == "LeaseLostError")


@pytest.mark.timeout(120)
async def test_a_partitioned_worker_is_taken_over_and_writes_nothing_afterwards(
    sqld: SqldServer, tmp_path: Path, fault_report: Report
) -> None:
    with proxy_to(sqld) as proxy:
        outcome = await _partition_one_host(sqld, tmp_path, proxy)
    fault_report(
        kills=0,
        restarts=0,
        faults_injected=1,
        faults={"partitions": 1},
        runs_held_when_cut_off=len(outcome.held),
        runs_taken_over=outcome.taken_over,
        writes_after_partition=len(outcome.writes_after),
        lease_lost_reported=outcome.lease_lost_reported,
        **outcome.ledger.record(),
    )
    assert outcome.held, "A held no run when it was cut off: the partition hit nothing"
    assert outcome.taken_over == len(outcome.held)
    assert not outcome.writes_after, f"A wrote after it was cut off: {outcome.writes_after}"
    # Only the steps A was running when it was cut off may run again elsewhere.
    outcome.ledger.check(rerun_bound=CONCURRENCY)


@pytest.mark.timeout(120)
async def test_a_partitioned_worker_reports_each_lease_it_lost(sqld: SqldServer, tmp_path: Path) -> None:
    with proxy_to(sqld) as proxy:
        outcome = await _partition_one_host(sqld, tmp_path, proxy)
    assert outcome.held
    assert outcome.lease_lost_reported >= len(outcome.held), (
        f"A lost {len(outcome.held)} leases and reported {outcome.lease_lost_reported}"
    )
