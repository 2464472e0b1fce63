"""Watch a run through its events: run, step and log events as they happen.

Run: python examples/server/events.py

Handlers run in the process that executes the run; they may be sync or async,
and one that raises is reported as `worker:error` without affecting the run.
"""

from __future__ import annotations

import asyncio
from typing import Any

from lib.durably import durably


def on_run_start(event: Any) -> None:
    print(f"[run:start] {event.job_name} attempt={event.attempt} input={event.input}")


def on_step_complete(event: Any) -> None:
    print(f"[step:complete] #{event.step_index} {event.step_name} output={event.output}")


def on_log(event: Any) -> None:
    print(f"[log:write] {event.level}: {event.message} {event.data}")


def on_run_complete(event: Any) -> None:
    print(f"[run:complete] output={event.output} duration={event.duration:.2f}s")


def on_run_fail(event: Any) -> None:
    print(f"[run:fail] {event.error} (step {event.failed_step_name})")


durably.on("run:start", on_run_start)
durably.on("step:start", lambda event: print(f"[step:start] #{event.step_index} {event.step_name}"))
durably.on("step:complete", on_step_complete)
durably.on("run:progress", lambda event: print(f"[run:progress] {event.progress}"))
durably.on("log:write", on_log)
durably.on("run:complete", on_run_complete)
durably.on("run:fail", on_run_fail)


async def main() -> None:
    # "*" receives every event; `on()` returns a function that unsubscribes.
    seen: list[str] = []
    unsubscribe = durably.on("*", lambda event: seen.append(event.type))
    async with durably:
        await durably.jobs.process_image.trigger_and_wait({"filename": "photo.jpg"})
    unsubscribe()
    print(f"{len(seen)} events in all: {', '.join(sorted(set(seen)))}")


if __name__ == "__main__":
    asyncio.run(main())
