"""sqld SIGKILLed and restarted under load, and a proxy between the workers and sqld that
adds latency spikes, resets connections and blackholes them for longer than the lease."""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import anyio
import pytest
from anyio import to_thread

from ..procs.effects import Effects
from ..support.proxy import TcpProxy
from ..support.sqld import SqldServer
from ._fleet import STALE, client, fleet, proxy_to
from ._ledger import Ledger, tally
from .conftest import Report

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.faults]

HOSTS, CONCURRENCY, RUNS = 3, 2, 60
SLOTS = HOSTS * CONCURRENCY


Counts = collections.Counter[str]


async def _under_load(
    tmp_path: Path, sqld: SqldServer, url: str, inject: Callable[[Counts], Awaitable[None]], report: Report
) -> Ledger:
    """Start the fleet on ``url``, inject faults once steps run, drain, and check what survived.

    ``inject`` counts each fault it injects; each one may interrupt every step in flight.
    """
    counts: Counts = collections.Counter()
    async with fleet(tmp_path, url) as hosts, client(sqld.http_url) as durably:
        for i in range(HOSTS):
            await hosts.spawn(f"h{i}", concurrency=CONCURRENCY, wait_for_go=True)
        await hosts.wait_ready(HOSTS)
        runs = await durably.jobs.effects.batch_trigger([Effects(steps=3, work=0.1)] * RUNS)
        await hosts.go()
        await hosts.started(SLOTS)
        started = time.monotonic()
        await inject(counts)
        unfinished_after_faults = await hosts.unfinished(durably, RUNS)
        await hosts.drain(durably, RUNS, timeout=90)
        drained = time.monotonic() - started
        await hosts.stop()
        ledger = await tally(durably, runs, hosts.log)
    injected = sum(n for kind, n in counts.items() if kind != "connections_reset")
    report(
        kills=0,
        restarts=counts["restarts"],
        faults_injected=injected,
        faults=dict(counts),
        unfinished_after_faults=unfinished_after_faults,
        drain_seconds=round(drained, 1),
        **ledger.record(),
    )
    assert injected > 0
    assert unfinished_after_faults != 0, "the workload ended before the faults did: they hit nothing"
    ledger.check(rerun_bound=injected * SLOTS)
    # A completion re-sent after a reset is read as done, not as a lost lease.
    assert ledger.completion_unreported == 0
    return ledger


@pytest.mark.timeout(150)
@pytest.mark.parametrize("down_for", [0.3, 2 * STALE], ids=["restarted-at-once", "down-for-two-leases"])
async def test_sqld_sigkilled_and_restarted_under_load_loses_no_run(
    sqld: SqldServer, tmp_path: Path, fault_report: Report, down_for: float
) -> None:
    restarts = 2

    async def restart(counts: Counts) -> None:
        for _ in range(restarts):
            await anyio.sleep(0.5)
            await to_thread.run_sync(sqld.kill)
            await anyio.sleep(down_for)
            await to_thread.run_sync(sqld.start)  # the same data directory and port
            counts["restarts"] += 1

    await _under_load(tmp_path, sqld, sqld.http_url, restart, fault_report)


async def _latency_spikes(proxy: TcpProxy, counts: Counts) -> None:
    for _ in range(4):
        proxy.delay(0.25)  # each way, per chunk: about half a lease per round trip
        counts["latency_spikes"] += 1
        await anyio.sleep(0.6)
        proxy.delay(0)
        await anyio.sleep(0.3)


async def _connection_resets(proxy: TcpProxy, counts: Counts) -> None:
    for _ in range(8):
        await anyio.sleep(0.3)
        counts["connections_reset"] += proxy.active_connections
        proxy.reset()
        counts["resets"] += 1


async def _blackhole(proxy: TcpProxy, counts: Counts) -> None:
    proxy.drop()
    counts["blackholes"] += 1
    await anyio.sleep(2.5 * STALE)  # every lease in flight expires meanwhile
    proxy.heal()


@pytest.mark.timeout(150)
@pytest.mark.parametrize(
    "fault",
    [_latency_spikes, _connection_resets, _blackhole],
    ids=["latency-spikes", "connection-resets", "blackhole-longer-than-the-lease"],
)
async def test_a_faulty_network_between_workers_and_sqld_loses_no_run(
    sqld: SqldServer,
    tmp_path: Path,
    fault_report: Report,
    fault: Callable[[TcpProxy, Counts], Awaitable[None]],
) -> None:
    with proxy_to(sqld) as proxy:
        await _under_load(tmp_path, sqld, proxy.url, partial(fault, proxy), fault_report)


@pytest.mark.timeout(150)
async def test_a_blackhole_longer_than_the_lease_is_reported_by_every_worker(
    sqld: SqldServer, tmp_path: Path, fault_report: Report
) -> None:
    with proxy_to(sqld) as proxy:
        ledger = await _under_load(tmp_path, sqld, proxy.url, partial(_blackhole, proxy), fault_report)
    silent = [f"h{i}" for i in range(HOSTS) if not ledger.errors_by_host[f"h{i}"]]
    assert not silent, f"hosts that waited out a {2.5 * STALE} s blackhole without a word: {silent}"
