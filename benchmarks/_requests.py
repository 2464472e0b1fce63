"""Database round trips on the remote adapter, counted by a loopback proxy in front of sqld."""

from __future__ import annotations

from pathlib import Path

from benchmarks._one import completions, make_job
from durably import create_durably
from tests.support.proxy import TcpProxy
from tests.support.sqld import SqldServer


async def _per_run(url: str, proxy: TcpProxy, steps: int, n: int) -> tuple[float, float]:
    durably = create_durably(url, polling_interval=0.001).register(job=make_job(steps))
    await durably.migrate()
    proxy.reset_counters()
    for i in range(n):
        await durably.jobs.job.trigger({"i": i})
    per_trigger = proxy.http_requests / n
    done = completions(durably, n)
    proxy.reset_counters()
    durably.start()
    await done.wait()
    per_run = proxy.http_requests / n
    await durably.close()
    return per_trigger, per_run


async def count_requests(root: Path, n: int) -> dict[str, float]:
    figures: dict[str, float] = {}
    for steps in (3, 0):
        with SqldServer(root / f"sqld-{steps}") as server, TcpProxy("127.0.0.1", server.port) as proxy:
            per_trigger, per_run = await _per_run(proxy.url, proxy, steps, n)
        figures["requests per trigger()"] = per_trigger
        figures[f"requests per {steps}-step run (claim, steps, completion; drain, c=1)"] = per_run
    return figures
