"""The local write-ahead log's peak size while one worker drains many W3 runs.

python -m benchmarks._wal --url file:/tmp/x.db [-n 100000]

Runs are triggered in batches of 1,000, then drained with ``process_until_idle()``;
a thread samples the ``-wal`` file's size every 5 ms throughout. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import threading
import time
from pathlib import Path

import msgspec

from benchmarks._one import make_job
from durably import create_durably


class _Sampler(threading.Thread):
    """The largest size the file reached, sampled off the event loop."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.peak = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.005):
            with contextlib.suppress(FileNotFoundError):
                self.peak = max(self.peak, self.path.stat().st_size)


async def measure(url: str, n: int) -> dict[str, float]:
    db = Path(url.removeprefix("file:"))
    durably = create_durably(url).register(job=make_job(3))
    sampler = _Sampler(Path(f"{db}-wal"))
    sampler.start()
    try:
        await durably.migrate()
        for start in range(0, n, 1000):
            await durably.jobs.job.batch_trigger([{"i": i} for i in range(start, min(n, start + 1000))])
        started = time.perf_counter()
        done = await durably.process_until_idle()
        seconds = time.perf_counter() - started
    finally:
        sampler.stop.set()
        sampler.join()
        await durably.close()
    assert done == n, f"drained {done} of {n} runs"
    return {"runs": n, "wal_peak_mb": sampler.peak / 1e6, "drain_runs_per_s": n / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("-n", type=int, default=100_000)
    args = parser.parse_args()
    result = asyncio.run(measure(args.url, args.n))
    result["db_mb"] = Path(args.url.removeprefix("file:")).stat().st_size / 1e6
    sys.stdout.write(msgspec.json.encode(result).decode() + "\n")
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown noise


if __name__ == "__main__":
    main()
