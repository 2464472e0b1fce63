"""A worker process for tests/test_retries_processes.py (``python -m tests.procs.retrying``).

``python -m tests.procs.retrying DB_URL --stop-file PATH [--ready-file PATH]`` works until the
stop file exists, then stops gracefully. Every step execution appends one line to the file
its payload names (one ``write`` on an O_APPEND file: lines of processes never interleave).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import anyio
from anyio import Path as AsyncPath

from durably import RetryPolicy, StepContext, create_durably, define_job

HANG_AT_CALL = 3


def append_line(path: str, line: str) -> None:
    """Append one line in a single write."""
    with open(path, "a") as file:
        file.write(line + "\n")


def _flaky(log: str) -> str:
    """Fails on every call; the third call hangs the first time (the test kills the process)."""
    call = len(Path(log).read_text().split()) + 1
    append_line(log, f"call-{call}")
    if call == HANG_AT_CALL:
        time.sleep(60)
    raise RuntimeError(f"call {call} failed")


@define_job(name="step-retries", input=dict[str, Any])
async def step_retries(step: StepContext, payload: dict[str, Any]) -> Any:
    """One step with three attempts, each failing; a crash in the third must not restart the count."""
    policy = RetryPolicy(max_attempts=3, initial_delay=0.05, jitter=False)
    return await step.run("flaky", _flaky, payload["log"], retries=policy)


def _attempt(log: str, run_id: str, attempt: int) -> int:
    append_line(log, f"{run_id} {attempt} {os.getpid()}")
    if attempt < 3:
        raise RuntimeError(f"attempt {attempt} failed")
    return attempt


@define_job(
    name="run-retries",
    input=dict[str, Any],
    retries=RetryPolicy(max_attempts=3, initial_delay=0.05, backoff=1.0),
)
async def run_retries(step: StepContext, payload: dict[str, Any]) -> Any:
    """Fails its first two attempts, completes the third; each attempt logs who ran it."""
    return await step.run("work", _attempt, payload["log"], step.run_id, step.attempt)


JOBS = {"step_retries": step_retries, "run_retries": run_retries}


async def work(args: argparse.Namespace) -> None:
    durably = create_durably(
        args.db, polling_interval=0.02, heartbeat_interval=0.2, stale_threshold=1.0, max_concurrent_runs=4
    ).register(**JOBS)
    async with durably:
        if args.ready_file:
            append_line(args.ready_file, f"ready {os.getpid()}")
        stop = AsyncPath(args.stop_file)
        with anyio.fail_after(120):  # bounded: a test that forgets the stop file still ends
            while True:
                if await stop.exists():
                    return
                await anyio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--ready-file")
    anyio.run(work, parser.parse_args())


if __name__ == "__main__":
    main()
