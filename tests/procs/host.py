"""A worker host process for tests/test_many_hosts.py (run with ``sys.executable``).

``host.py DB_URL LOG --id NAME --stop-file PATH [--ready-file PATH] [--go-file PATH]
[--stale S] [--heartbeat S] [--polling S] [--concurrency N] [--trigger N]``

Writes ``ready NAME PID`` to the ready file, waits for the go file (if given), then
works the database with ``async with durably`` until the stop file exists or SIGTERM
arrives, and exits 0. Every step execution appends one line to the shared ``LOG``:
``RUN_ID STEP NAME PID`` for the three-step job, ``start|end RUN_ID NAME PID TIME_NS``
for the keyed job; with ``--trigger N`` the host, once serving, triggers N keyed runs at
once and logs ``trigger RUN_ID NAME STATUS`` for each (STATUS: as created). Each line is
one ``write`` on an ``O_APPEND`` descriptor, so lines from several processes never interleave.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from types import FrameType
from typing import Any

import anyio
import msgspec
from anyio import Path as AsyncPath

from durably import Durably, StepContext, create_durably, define_job

STEPS = ("s1", "s2", "s3")

HOST = "test"  # set from --id
LOG = os.devnull  # set from the LOG argument
_terminated = False


def append_line(path: str, line: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())  # one unbuffered write: nothing left to flush
    finally:
        os.close(fd)


class Work(msgspec.Struct):
    """Payload of the three-step job: every step sleeps ``sleep`` seconds, except where
    ``pauses`` ("HOST STEP" -> seconds, e.g. ``{"A s1": 2.0}``) says otherwise."""

    sleep: float = 0.0
    pauses: dict[str, float] = msgspec.field(default_factory=dict)


class Keyed(msgspec.Struct):
    i: int
    work: float = 0.1


def _execute(run_id: str, name: str, sleep: float) -> dict[str, Any]:
    append_line(LOG, f"{run_id} {name} {HOST} {os.getpid()}")
    if sleep > 0:
        time.sleep(sleep)
    return {"host": HOST, "pid": os.getpid()}


@define_job(name="three-steps", input=Work)
async def three_steps(step: StepContext, payload: Work) -> Any:
    hosts: list[str] = []
    for name in STEPS:
        sleep = payload.pauses.get(f"{HOST} {name}", payload.sleep)
        result = await step.run(name, _execute, step.run_id, name, sleep)
        hosts.append(result["host"])
    return {"steps": hosts, "finished_by": HOST}


def _mark(kind: str, run_id: str) -> None:
    append_line(LOG, f"{kind} {run_id} {HOST} {os.getpid()} {time.time_ns()}")


@define_job(name="keyed", input=Keyed)
async def keyed(step: StepContext, payload: Keyed) -> Any:
    await step.run("start", _mark, "start", step.run_id)
    await step.run("work", time.sleep, payload.work)
    await step.run("end", _mark, "end", step.run_id)
    return payload.i


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _terminated
    _terminated = True


async def _wait_for(path: str | None) -> bool:
    """Until ``path`` exists (True) or SIGTERM arrived (False); no path: at once."""
    file = AsyncPath(path) if path else None
    while not _terminated:
        if file is None or await file.exists():
            return True
        await anyio.sleep(0.02)
    return False


async def serve(args: argparse.Namespace) -> None:
    durably = create_durably(
        args.db,
        polling_interval=args.polling,
        heartbeat_interval=args.heartbeat,
        stale_threshold=args.stale,
        max_concurrent_runs=args.concurrency,
    ).register(three_steps=three_steps, keyed=keyed)
    if args.ready_file:
        append_line(args.ready_file, f"ready {HOST} {os.getpid()}")
    if not await _wait_for(args.go_file):
        await durably.close()
        return
    async with durably:
        async with anyio.create_task_group() as triggers:  # --trigger N: N at once, as users would
            for i in range(args.trigger):
                triggers.start_soon(_trigger, durably, i)
        await _wait_for(args.stop_file)


async def _trigger(durably: Durably, i: int) -> None:
    run = await durably.jobs.keyed.trigger(Keyed(i=i))
    append_line(LOG, f"trigger {run.id} {HOST} {run.status}")


def main() -> None:
    global HOST, LOG
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("log")
    parser.add_argument("--id", required=True)
    parser.add_argument("--stop-file", required=True)
    parser.add_argument("--ready-file")
    parser.add_argument("--go-file")
    parser.add_argument("--stale", type=float, default=1.5)
    parser.add_argument("--heartbeat", type=float, default=0.3)
    parser.add_argument("--polling", type=float, default=0.05)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--trigger", type=int, default=0)
    args = parser.parse_args()
    HOST, LOG = args.id, args.log
    signal.signal(signal.SIGTERM, _on_sigterm)
    anyio.run(serve, args)


if __name__ == "__main__":
    main()
