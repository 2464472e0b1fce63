"""A durably process for tests/test_processes.py (run with ``sys.executable``).

``worker.py work DB_URL --stop-file PATH [--ready-file PATH] [--concurrency N] [--stale S]``
runs a worker until the stop file exists, then stops gracefully and exits 0.

``worker.py migrate DB_URL START_AT`` sleeps until the Unix time ``START_AT`` (so
several processes start together), runs ``migrate()`` once and exits 0.
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


def append_line(path: str, line: str) -> None:
    """Append one line; a single short ``write`` on an O_APPEND file is atomic across processes."""
    with open(path, "a") as file:
        file.write(line + "\n")


def _step_one(counter: str) -> int:
    append_line(counter, "step1")
    return 1


def _step_two(counter: str) -> int:
    first_time = "step2" not in Path(counter).read_text().split()
    append_line(counter, "step2")
    if first_time:
        time.sleep(60)  # the test kills this process meanwhile
    return 2


def _step_three(counter: str) -> int:
    append_line(counter, "step3")
    return 3


@define_job(name="three-steps", input=dict[str, Any])
async def three_steps(step: StepContext, payload: dict[str, Any]) -> Any:
    """Three steps that record each execution in ``payload["counter"]``; step 2 hangs once."""
    counter = payload["counter"]
    one = await step.run("step1", _step_one, counter)
    two = await step.run("step2", _step_two, counter)
    three = await step.run("step3", _step_three, counter)
    return one + two + three


@define_job(name="keyed", input=dict[str, Any])
async def keyed(step: StepContext, payload: dict[str, Any]) -> Any:
    """Records when it starts and ends in ``payload["log"]``, working a little in between."""
    log = payload["log"]
    await step.run("start", append_line, log, f"start {step.run_id} {os.getpid()}")
    await step.run("work", time.sleep, 0.15)
    await step.run("end", append_line, log, f"end {step.run_id} {os.getpid()}")
    return payload["i"]


PAGES = 8
HANG_AT = 5


def _fetch(step: StepContext, counter: str, page: int) -> int:
    step.log.info(f"fetching {page}")
    first_time = f"page-{page}" not in Path(counter).read_text().split()
    append_line(counter, f"page-{page}")
    if page == HANG_AT and first_time:
        time.sleep(60)  # the test kills this process meanwhile
    return page


@define_job(name="pages", input=dict[str, Any])
async def pages(step: StepContext, payload: dict[str, Any]) -> Any:
    """Logs and reports progress between steps, as a crawler does; hangs once at page 5."""
    counter = payload["counter"]
    total = 0
    for page in range(PAGES):
        step.log.info(f"page {page}")
        step.progress(page, PAGES)
        total += await step.run(f"page-{page}", _fetch, step, counter, page)
    step.progress(PAGES, PAGES)
    return total


async def work(args: argparse.Namespace) -> None:
    durably = create_durably(
        args.db,
        polling_interval=0.02,
        heartbeat_interval=args.stale / 5,
        stale_threshold=args.stale,
        max_concurrent_runs=args.concurrency,
    ).register(three_steps=three_steps, keyed=keyed, pages=pages)
    async with durably:
        if args.ready_file:
            append_line(args.ready_file, f"ready {os.getpid()}")
        stop = AsyncPath(args.stop_file)
        while True:
            if await stop.exists():
                break
            await anyio.sleep(0.05)


async def migrate(args: argparse.Namespace) -> None:
    await anyio.sleep(max(0.0, args.start_at - time.time()))
    storage = open_storage(args.db)
    try:
        await storage.migrate()
    finally:
        await storage.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    worker = commands.add_parser("work")
    worker.add_argument("db")
    worker.add_argument("--stop-file", required=True)
    worker.add_argument("--ready-file")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--stale", type=float, default=1.0)
    migrator = commands.add_parser("migrate")
    migrator.add_argument("db")
    migrator.add_argument("start_at", type=float)
    args = parser.parse_args()
    anyio.run(work if args.command == "work" else migrate, args)


if __name__ == "__main__":
    main()
