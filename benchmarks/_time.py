"""What durable time costs (docs/durable-time.md): a claim among 100,000 parked runs, and the
round trips of a run that sleeps. ``python -m benchmarks._time [--parked N]`` prints JSON."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec

from durably import StepContext, create_durably, define_job, open_storage
from durably._ids import new_run_id
from durably._models import NewRun
from durably._storage._protocol import Lease, Telemetry
from tests.support.proxy import TcpProxy
from tests.support.sqld import SqldServer

_NOTHING = Telemetry()


def _new(job: str, delay: float | None = None) -> NewRun:
    return NewRun(
        id=new_run_id(),
        job_name=job,
        input=b"{}",
        labels={},
        idempotency_key=None,
        concurrency_key=None,
        delay=delay,
    )


async def _claim_seconds(url: str, n: int) -> float:
    """Median seconds of one claim (and completion) of a ready run, over ``n`` runs."""
    storage = open_storage(url)
    try:
        await storage.create_runs([_new("ready") for _ in range(n)])
        times = []
        for _ in range(n):
            started = time.perf_counter()
            claim = await storage.claim_runs(worker_id="w", job_names=["ready"], limit=1, lease_seconds=30)
            [claimed] = claim.runs
            times.append(time.perf_counter() - started)
            await storage.complete_run(Lease(claimed.run.id, claimed.lease_generation), b"1", _NOTHING)
        return statistics.median(times)
    finally:
        await storage.close()


async def _park(path: Path, parked: int) -> None:
    """``parked`` runs of the claimed job: half delayed an hour, half waiting for a signal."""
    storage = open_storage(f"file:{path}")
    try:
        await storage.migrate()
        for start in range(0, parked, 5000):
            await storage.create_runs([_new("ready", delay=3600.0) for _ in range(min(5000, parked - start))])
    finally:
        await storage.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "UPDATE durably_runs SET status = 'waiting', waiting_for = 'signal:x', wake_at = NULL"
            " WHERE seq % 2 = 0"
        )
    conn.close()


async def claim_figures(root: Path, parked: int, n: int) -> dict[str, float]:
    empty, full = root / "empty.db", root / "parked.db"
    await _park(empty, 0)
    await _park(full, parked)
    base = await _claim_seconds(f"file:{empty}", n)
    loaded = await _claim_seconds(f"file:{full}", n)
    return {"claim_ms_none_parked": base * 1000, "claim_ms_parked": loaded * 1000, "ratio": loaded / base}


def _jobs() -> dict[str, Any]:
    @define_job(name="plain", input=dict[str, Any])
    async def plain(step: StepContext, payload: dict[str, Any]) -> int:
        return await step.run("s", lambda: 1)

    @define_job(name="sleeper", input=dict[str, Any])
    async def sleeper(step: StepContext, payload: dict[str, Any]) -> int:
        await step.run("s", lambda: 1)
        await step.sleep("nap", timedelta(seconds=0.05))
        return 1

    return {"plain": plain, "sleeper": sleeper}


async def _requests_per_run(url: str, proxy: TcpProxy, job: str, n: int) -> float:
    durably = create_durably(url, polling_interval=0.01).register(**_jobs())
    try:
        await durably.migrate()
        await durably.jobs[job].batch_trigger([{}] * n)
        proxy.reset_counters()
        deadline = time.monotonic() + 60
        while len(await durably.get_runs(status="completed", limit=n)) < n and time.monotonic() < deadline:
            await durably.process_until_idle()
            await asyncio.sleep(0.06)
        # Includes this loop's own reads (one get_runs per pass): a few hundredths per run.
        return proxy.http_requests / n
    finally:
        await durably.close()


async def round_trip_figures(root: Path, n: int) -> dict[str, float]:
    figures = {}
    for job in ("plain", "sleeper"):
        with SqldServer(root / f"sqld-{job}") as server, TcpProxy("127.0.0.1", server.port) as proxy:
            figures[f"requests per run ({job})"] = await _requests_per_run(proxy.url, proxy, job, n)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--parked", type=int, default=100_000)
    parser.add_argument("-n", type=int, default=500)
    args = parser.parse_args()
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    figures = asyncio.run(claim_figures(root, args.parked, args.n))
    figures |= asyncio.run(round_trip_figures(root, min(args.n, 50)))
    print(msgspec.json.encode(figures).decode())


if __name__ == "__main__":
    main()
