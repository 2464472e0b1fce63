"""What an idle worker costs on a remote database: requests and rows read per minute.

    python -m benchmarks --idle [--quick]

One worker (``polling_interval=0.1``) with nothing to do, against a fresh sqld, once per
ceiling: ``max_polling_interval=0.1`` is the worker before the backoff (one claim per
``polling_interval``, forever), then the default ceiling and a longer one. The database
holds ``PARKED`` delayed runs, as a real one holds runs that wait, so a claim reads what it
would read there. Requests are counted by a loopback proxy in front of sqld
(tests/support/proxy.py); rows read and written come from sqld's own statistics
(``GET /v1/namespaces/default/stats`` on its admin port: ``rows_read_count``), what Turso
bills. Measured over a window after the backoff has reached its ceiling, scaled to a minute.

On a local file an idle claim is one statement and, since a serving worker's claim learns
the next due time, a second read: ``local_poll`` times the claim with and without it, on
a file holding the same parked runs.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import anyio.to_thread

from benchmarks._one import make_job
from durably import create_durably, open_storage
from tests.support.proxy import TcpProxy
from tests.support.sqld import SqldServer, free_port

POLLING_INTERVAL = 0.1
CEILINGS = (0.1, 2.0, 10.0)
PARKED = 1000


def _stats(admin_port: int) -> dict[str, float]:
    url = f"http://127.0.0.1:{admin_port}/v1/namespaces/default/stats"
    with urllib.request.urlopen(url, timeout=10) as answer:
        stats = json.load(answer)
    return {"rows_read": float(stats["rows_read_count"]), "rows_written": float(stats["rows_written_count"])}


def _warm_up(ceiling: float) -> float:
    """Seconds until the idle waits have grown to ``ceiling``, plus one of them."""
    waited, wait = 0.0, POLLING_INTERVAL
    while wait < ceiling:
        waited, wait = waited + wait, min(wait * 2, ceiling)
    return waited + ceiling + 0.5


async def _one_ceiling(root: Path, ceiling: float, window: float) -> dict[str, float]:
    admin = free_port()
    extra = ("--admin-listen-addr", f"127.0.0.1:{admin}")
    with SqldServer(root / f"sqld-{ceiling}", extra_args=extra) as server:
        assert server.port is not None
        setup = create_durably(server.http_url).register(job=make_job(3))
        await setup.migrate()
        for first in range(0, PARKED, 500):
            batch = [{"i": i} for i in range(first, min(PARKED, first + 500))]
            await setup.jobs.job.batch_trigger(batch, delay=86_400.0)
        await setup.close()
        with TcpProxy("127.0.0.1", server.port) as proxy:
            worker = create_durably(
                proxy.url, polling_interval=POLLING_INTERVAL, max_polling_interval=ceiling
            ).register(job=make_job(3))
            async with worker:
                await anyio.sleep(_warm_up(ceiling))
                proxy.reset_counters()
                before = await anyio.to_thread.run_sync(_stats, admin)
                started = time.perf_counter()
                await anyio.sleep(max(window, 4 * ceiling))  # a few claims even at 10 s
                seconds = time.perf_counter() - started
                requests, after = proxy.http_requests, await anyio.to_thread.run_sync(_stats, admin)
    per_minute = 60.0 / seconds
    return {
        "requests_per_min": requests * per_minute,
        "rows_read_per_min": (after["rows_read"] - before["rows_read"]) * per_minute,
        "rows_written_per_min": (after["rows_written"] - before["rows_written"]) * per_minute,
        "rows_read_per_request": (after["rows_read"] - before["rows_read"]) / max(requests, 1),
    }


async def measure(root: Path, window: float) -> dict[float, dict[str, float]]:
    """The figures per ceiling, each on a fresh sqld."""
    return {ceiling: await _one_ceiling(root, ceiling, window) for ceiling in CEILINGS}


async def _median_us(polls: int, poll: Callable[[], Awaitable[object]]) -> float:
    times = []
    for _ in range(polls):
        started = time.perf_counter()
        await poll()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


async def local_poll(root: Path, polls: int = 2000) -> dict[str, float]:
    """Median µs of an idle poll on a local file holding ``PARKED`` delayed runs: the claim
    alone (as before) and with the next-due read a serving worker now asks for."""
    storage = open_storage(f"file:{root / 'idle-local.db'}")
    try:
        job = make_job(3)
        setup = create_durably(storage).register(job=job)
        await setup.migrate()
        await setup.jobs.job.batch_trigger([{"i": i} for i in range(PARKED)], delay=86_400.0)

        def poll(within: float | None) -> Callable[[], Awaitable[object]]:
            return lambda: storage.claim_runs(
                worker_id="w", job_names=[job.name], limit=1, lease_seconds=30.0, next_due_within=within
            )

        figures = {}
        for _ in range(2):  # the first pass warms up; the second is kept
            figures = {
                "claim_us": await _median_us(polls, poll(None)),
                "claim_and_next_due_us": await _median_us(polls, poll(2.0)),
            }
        return figures
    finally:
        await storage.close()


def print_local(figures: dict[str, float]) -> None:
    print(
        f"Idle poll on a local file ({PARKED:,} delayed runs parked), median µs: the claim alone"
        f" (before) {figures['claim_us']:.0f}, with the next-due read (now)"
        f" {figures['claim_and_next_due_us']:.0f}"
    )


def print_rows(figures: dict[float, dict[str, float]], window: float) -> None:
    print(
        f"Idle worker on sqld (polling_interval={POLLING_INTERVAL}, {PARKED:,} delayed runs parked;"
        f" measured over {window:.0f} s or 4 ceilings after the backoff settled, scaled to a minute):"
    )
    print("| max_polling_interval | requests / idle worker-minute | rows read / min | rows read / request |")
    print("| --- | --- | --- | --- |")
    for ceiling, f in figures.items():
        name = f"{ceiling:g} s" + (" (no backoff: before)" if ceiling == POLLING_INTERVAL else "")
        print(
            f"| {name} | {f['requests_per_min']:,.0f} | {f['rows_read_per_min']:,.0f}"
            f" | {f['rows_read_per_request']:.1f} |"
        )
    written = max(f["rows_written_per_min"] for f in figures.values())
    print(f"(rows written while idle: at most {written:,.0f} a minute)")
