"""A worker host with side-effect accounting, for tests/faults (run as ``python -m tests.procs.effects``).

``python -m tests.procs.effects DB_URL LOG --id NAME --stop-file PATH --ready-file PATH
[--go-file PATH] [--stale S] [--heartbeat S] [--polling S] [--concurrency N]``
(the arguments of tests/procs/host.py); it stops gracefully once the stop file exists.

The job ``effects`` runs ``steps`` steps. Each step execution appends ``RUN STEP ATTEMPT
NAME PID STARTED_NS`` to ``LOG.begin`` when it starts and ``RUN STEP ATTEMPT PID
STARTED_NS ENDED_NS`` to ``LOG`` (the side effect) just before it returns; the stored result names
``(pid, started_ns)``, so a test can tell the execution whose checkpoint was stored from
every other one. ``run:complete``, ``run:wait`` and ``worker:error`` are appended to ``LOG.events``.
Each line is one ``write`` on an ``O_APPEND`` descriptor (``host.append_line``), so
lines from several processes never interleave and a SIGKILL leaves no half line.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import anyio
import msgspec

from durably import StepContext, create_durably, define_job

from .host import append_line
from .skewed_worker import wait_for_file

_host = {"name": "test", "log": os.devnull}


class Effects(msgspec.Struct):
    """Payload of the ``effects`` job: ``steps`` steps of ``work`` seconds each."""

    steps: int = 3
    work: float = 0.05
    nap: float = 0.0  # a durable step.sleep of this long after each step (none if 0)


def configure(name: str, log: str) -> None:
    """Name this host and point its side-effect log at ``log`` (main() does it from the arguments)."""
    _host.update(name=name, log=log)


def _effect(run_id: str, name: str, attempt: int, work: float) -> dict[str, Any]:
    started = time.time_ns()
    pid, log = os.getpid(), _host["log"]
    append_line(f"{log}.begin", f"{run_id} {name} {attempt} {_host['name']} {pid} {started}")
    if work > 0:
        time.sleep(work)
    append_line(log, f"{run_id} {name} {attempt} {pid} {started} {time.time_ns()}")
    return {"host": _host["name"], "pid": pid, "started_ns": started}


@define_job(name="effects", input=Effects)
async def effects(step: StepContext, payload: Effects) -> Any:
    hosts = []
    # SPEC section 4 promises ``step.attempt``; until StepContext has it, these runs never retry.
    attempt = getattr(step, "attempt", 1)
    for k in range(payload.steps):
        result = await step.run(f"s{k}", _effect, step.run_id, f"s{k}", attempt, payload.work)
        hosts.append(result["host"])
        if payload.nap > 0:
            await step.sleep(f"nap{k}", payload.nap)
    return {"steps": hosts, "finished_by": _host["name"]}


def _record(event: Any) -> None:
    """One events line per run completion or worker error, naming this host and process."""
    run_id = getattr(event, "run_id", None) or "-"
    detail = str(getattr(event, "error", "")).split(":")[0].replace(" ", "_") or "-"
    append_line(f"{_host['log']}.events", f"{event.type} {run_id} {_host['name']} {os.getpid()} {detail}")


async def serve(args: argparse.Namespace) -> None:
    """Work from the go file (if any) until the stop file; both waits are bounded."""
    durably = create_durably(
        args.db,
        polling_interval=args.polling,
        heartbeat_interval=args.heartbeat,
        stale_threshold=args.stale,
        max_concurrent_runs=args.concurrency,
    ).register(effects=effects)
    for event_type in ("run:complete", "worker:error", "run:wait"):
        durably.on(event_type, _record)
    append_line(args.ready_file, f"ready {_host['name']} {os.getpid()}")
    if args.go_file:
        await wait_for_file(args.go_file, timeout=60)
    async with durably:
        await wait_for_file(args.stop_file, timeout=600)


def main() -> None:
    parser = argparse.ArgumentParser()
    for positional in ("db", "log"):
        parser.add_argument(positional)
    for required in ("--id", "--stop-file", "--ready-file"):
        parser.add_argument(required, required=True)
    parser.add_argument("--go-file")
    for option, default in (("--stale", 1.0), ("--heartbeat", 0.2), ("--polling", 0.05)):
        parser.add_argument(option, type=float, default=default)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    configure(args.id, args.log)
    anyio.run(serve, args)


if __name__ == "__main__":
    main()
