"""Jobs for the web tests, and a worker process: ``python app.py DB_URL STOP_FILE``.

The worker runs until ``STOP_FILE`` exists; it is the "other host" whose runs the
dashboard must show live.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import msgspec

from durably import Durably, StepContext, create_durably, define_job


class GreetIn(msgspec.Struct):
    name: str
    times: int = 1
    shout: bool = False


@define_job(name="greet", input=GreetIn)
async def greet(step: StepContext, payload: GreetIn) -> str:
    text = await step.run("compose", lambda: f"hello {payload.name}" * payload.times)
    step.log.info("composed", length=len(text))
    return text.upper() if payload.shout else text


@define_job(name="count", input=dict[str, Any])
async def count(step: StepContext, payload: dict[str, Any]) -> int:
    """``steps`` steps of ``pause`` seconds each, reporting progress after each."""
    total = int(payload.get("steps", 5))
    for i in range(total):
        await step.run(f"tick-{i}", anyio.sleep, float(payload.get("pause", 0.2)))
        step.progress(i + 1, total, f"tick {i + 1}")
        step.log.info(f"tick {i + 1} of {total}")
    return total


@define_job(name="approve", input=dict[str, Any])
async def approve(step: StepContext, payload: dict[str, Any]) -> Any:
    """Waits (holding no slot) for the ``approval`` signal and returns its payload."""
    return await step.wait_for_signal("approval")


def make(db: str, **options: Any) -> Durably:
    options.setdefault("polling_interval", 0.02)
    options.setdefault("heartbeat_interval", 0.2)
    options.setdefault("stale_threshold", 2.0)
    return create_durably(db, **options).register(greet=greet, count=count, approve=approve)


async def _work(db: str, stop_file: str) -> None:
    async with make(db):
        stop = anyio.Path(stop_file)
        while True:
            if await stop.exists():
                break
            await anyio.sleep(0.05)


if __name__ == "__main__":
    anyio.run(_work, sys.argv[1], str(Path(sys.argv[2])))
