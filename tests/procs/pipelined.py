"""A worker process whose checkpoint writes stop landing, for tests/test_pipelined.py.

``pipelined.py DB_URL [--sync-url URL]`` runs a worker of the pipelined job ``crashy``
until it is killed. Only its first checkpoint write reaches the database; the later ones
are held (as by a partition) while the body goes on, so the test can SIGKILL the process
while checkpoints are not acknowledged. Every step execution is appended to the counter file.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import anyio

from durably import StepContext, create_durably, define_job, open_storage
from tests.support.watched import WatchedStorage

STEPS = 5
HANG_AT = 3  # the step that hangs the first time: the test kills the process meanwhile


def _record(counter: str, index: int) -> int:
    first_time = f"step{index}" not in Path(counter).read_text().split()
    with open(counter, "a") as file:  # one short O_APPEND write: atomic across processes
        file.write(f"step{index}\n")
    if index == HANG_AT and first_time:
        time.sleep(60)
    time.sleep(0.02)  # longer than the pipeline's linger: each step's checkpoint leaves alone
    return index


@define_job(name="crashy", input=dict[str, Any], checkpoints="pipelined")
async def crashy(step: StepContext, payload: dict[str, Any]) -> int:
    total = 0
    for index in range(STEPS):
        total += await step.run(f"step{index}", _record, payload["counter"], index)
    return total


async def work(args: argparse.Namespace) -> None:
    storage = WatchedStorage(open_storage(args.db, sync_url=args.sync_url), hold_after=1)
    durably = create_durably(
        storage,  # type: ignore[arg-type]
        polling_interval=0.02,
        heartbeat_interval=0.2,
        stale_threshold=1.0,
    ).register(crashy=crashy)
    async with durably:
        await anyio.sleep(120)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--sync-url")
    anyio.run(work, parser.parse_args())


if __name__ == "__main__":
    main()
