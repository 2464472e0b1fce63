"""CPU per run of a local drain: what wall-clock figures on a shared machine cannot show.

python -m benchmarks._cpu --workload W3 --url file:/tmp/bw.db [-n 1000]

``_one.drain`` with ``time.process_time()`` (every thread of the process) and
``time.thread_time()`` (the event loop's thread) around the trigger loop and the drain,
in microseconds per run. Run from another tree's root with ``PYTHONPATH=.`` to measure an
older commit the same way (it needs only ``_one.instance`` and ``_one.completions``).
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from benchmarks import _one


async def _measure(args: argparse.Namespace) -> dict[str, float]:
    durably = _one.instance(args)
    try:
        await durably.migrate()
        cpu, started = time.process_time(), time.perf_counter()
        for i in range(args.n):
            await durably.jobs.job.trigger({"i": i})
        trigger = {
            "trigger_runs_per_s": round(args.n / (time.perf_counter() - started)),
            "trigger_cpu_us": round((time.process_time() - cpu) / args.n * 1e6),
        }
        done = _one.completions(durably, args.n)
        cpu, loop_cpu, started = time.process_time(), time.thread_time(), time.perf_counter()
        durably.start()
        await done.wait()
        return {
            **trigger,
            "drain_runs_per_s": round(args.n / (time.perf_counter() - started)),
            "drain_cpu_us": round((time.process_time() - cpu) / args.n * 1e6),
            "drain_loop_thread_us": round((time.thread_time() - loop_cpu) / args.n * 1e6),
        }
    finally:
        await durably.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workload", choices=["W0", "W3"], default="W3")
    parser.add_argument("--url", required=True)
    parser.add_argument("-n", type=int, default=1000)
    args = parser.parse_args()
    args.conc, args.sync_url = 1, None
    path = args.url.removeprefix("file:")
    for stale in (path, f"{path}-wal", f"{path}-shm"):
        if os.path.exists(stale):
            os.remove(stale)
    result = asyncio.run(_measure(args))
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown noise, as _one does


if __name__ == "__main__":
    main()
