"""One measurement in a fresh process; prints one JSON line.

python -m benchmarks._one --workload W3 --conc 1 --url file:/tmp/x.db [--sync-url URL] [-n 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from typing import Any

import anyio
import msgspec

from durably import Durably, StepContext, create_durably, define_job, open_storage

STEPS = {"W3": 3, "W0": 0, "L": 3, "MEM": 3}


def make_job(steps: int, checkpoints: Any = "sync") -> Any:
    @define_job(name=f"w{steps}", input=dict[str, Any], checkpoints=checkpoints)
    async def job(step: StepContext, payload: dict[str, Any]) -> dict[str, Any]:
        for k in range(steps):
            await step.run(f"s{k}", lambda k=k: {"i": k})
        return {"ok": True}

    return job


def instance(args: argparse.Namespace) -> Durably:
    storage = open_storage(args.url, sync_url=args.sync_url)
    job = make_job(STEPS[args.workload])
    return create_durably(storage, polling_interval=0.001, max_concurrent_runs=args.conc).register(job=job)


def completions(durably: Durably, n: int) -> anyio.Event:
    """An event set when ``n`` runs have completed in this process (as the Node bench times)."""
    done = anyio.Event()
    completed = 0

    def on_complete(_: object) -> None:
        nonlocal completed
        completed += 1
        if completed == n:
            done.set()

    durably.on("run:complete", on_complete)
    return done


async def drain(durably: Durably, n: int) -> dict[str, float]:
    """Trigger ``n`` runs one by one (worker stopped), then time one worker draining them."""
    await durably.migrate()
    started = time.perf_counter()
    for i in range(n):
        await durably.jobs.job.trigger({"i": i})
    trigger_seconds = time.perf_counter() - started
    done = completions(durably, n)
    started = time.perf_counter()
    durably.start()
    await done.wait()
    drain_seconds = time.perf_counter() - started
    await durably.stop()
    return {"trigger_runs_per_s": n / trigger_seconds, "drain_runs_per_s": n / drain_seconds}


async def latency(durably: Durably, n: int) -> dict[str, float]:
    """``n`` sequential trigger_and_wait with an idle worker in this process (5 warm-up calls)."""
    await durably.init()
    await anyio.sleep(0.3)
    for i in range(5):
        await durably.jobs.job.trigger_and_wait({"i": i})
    samples = []
    for i in range(n):
        started = time.perf_counter()
        await durably.jobs.job.trigger_and_wait({"i": i})
        samples.append((time.perf_counter() - started) * 1000)
    await durably.stop()
    samples.sort()
    # Nearest rank, as the Node original's bench does.
    return {"p50_ms": samples[int(0.5 * n) - 1], "p95_ms": samples[int(0.95 * n) - 1]}


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def memory(durably: Durably, n: int) -> dict[str, float]:
    """RSS after a 1,000-run warm-up and after ``n`` more runs through one worker."""
    await durably.init()
    batch = [{"i": i} for i in range(1000)]

    async def run_batches(count: int) -> None:
        for _ in range(count // 1000):
            runs = await durably.jobs.job.batch_trigger(batch)
            await durably.wait_for_run(runs[-1].id, timeout=120)

    await run_batches(1000)
    before = rss_mb()
    await run_batches(n)
    after = rss_mb()
    await durably.stop()
    return {"rss_before_mb": before, "rss_after_mb": after, "rss_growth_mb": after - before}


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=sorted(STEPS), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--sync-url")
    parser.add_argument("--conc", type=int, default=1)
    parser.add_argument("-n", type=int, default=1000)
    args = parser.parse_args()
    durably = instance(args)
    try:
        if args.workload == "L":
            result = await latency(durably, args.n)
        elif args.workload == "MEM":
            result = await memory(durably, args.n)
        else:
            result = await drain(durably, args.n)
    finally:
        await durably.close()
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown noise


if __name__ == "__main__":
    asyncio.run(main())
