"""A durably worker whose local wall clock is wrong on purpose, for tests/test_clock_skew.py.

``skewed_worker.py DB_URL --offset SECONDS --name NAME --log PATH --go-file PATH --stop-file PATH
[--replica PATH] [--stale S] [--heartbeat S]``

Shifts this process's clock by ``--offset`` seconds (``durably._clock.set_offset``),
writes ``ready NAME OFFSET`` to the log, waits for the go file, then runs a worker
until the stop file exists. Every ``run:start``/``run:complete``/``worker:error`` is
appended to the log as ``EVENT RUN_ID NAME``. With ``--replica`` the worker uses an
embedded replica at that path of the primary ``DB_URL``.

The job ``hold`` runs one step that waits until ``<payload["release_dir"]>/<run_id>``
exists, then a quick second step.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import anyio
from anyio import Path as AsyncPath

from durably import StepContext, create_durably, define_job, open_storage
from durably._clock import now, set_offset
from durably._storage._protocol import Storage


def append_line(path: str, line: str) -> None:
    """Append one line; one short ``write`` on an O_APPEND file is atomic across processes."""
    with open(path, "a") as file:
        file.write(line + "\n")


async def _wait_for_release(release: str) -> str:
    path = AsyncPath(release)
    with anyio.fail_after(60):
        while True:
            if await path.exists():
                return "released"
            await anyio.sleep(0.02)


@define_job(name="hold", input=dict[str, Any])
async def hold(step: StepContext, payload: dict[str, Any]) -> Any:
    release = str(Path(payload["release_dir"]) / step.run_id)
    await step.run("hold", _wait_for_release, release)
    return await step.run("done", lambda: payload["i"])


def _storage(args: argparse.Namespace) -> Storage:
    if args.replica:
        return open_storage(f"file:{args.replica}", sync_url=args.db, sync_interval=0.2)
    return open_storage(args.db)


async def work(args: argparse.Namespace) -> None:
    set_offset(args.offset)
    log: str = args.log
    durably = create_durably(
        _storage(args),
        polling_interval=0.05,
        heartbeat_interval=args.heartbeat,
        stale_threshold=args.stale,
        max_concurrent_runs=4,
    ).register(hold=hold)
    durably.on("run:start", lambda event: append_line(log, f"start {event.run_id} {args.name}"))
    durably.on("run:complete", lambda event: append_line(log, f"complete {event.run_id} {args.name}"))
    durably.on("worker:error", lambda event: append_line(log, f"error {event.run_id} {args.name}"))
    skew = now() - time.time()
    append_line(log, f"ready {args.name} {round(skew)} {os.getpid()}")
    await wait_for_file(args.go_file, timeout=60)
    async with durably:
        append_line(log, f"polling {args.name}")
        await wait_for_file(args.stop_file, timeout=120)


async def wait_for_file(path: str, *, timeout: float) -> None:
    """Until the test process creates ``path`` (bounded, like every wait here)."""
    with anyio.fail_after(timeout):
        while True:
            if await AsyncPath(path).exists():
                return
            await anyio.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--offset", type=float, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--go-file", required=True)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--replica")
    parser.add_argument("--stale", type=float, default=1.0)
    parser.add_argument("--heartbeat", type=float, default=0.2)
    anyio.run(work, parser.parse_args())


if __name__ == "__main__":
    main()
