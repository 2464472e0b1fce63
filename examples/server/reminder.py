"""A durable reminder: a long sleep that survives restarts and costs nothing meanwhile.

Run: python examples/server/reminder.py [SLEEP_SECONDS]

In production the sleep would be days (`timedelta(days=3)`); the demo takes the
duration from the command line (default 1 s). While it sleeps the run is stored
`waiting` with `wake_at`; any worker claims it when the database's clock passes
that time, and the body replays to the sleep and goes on.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from durably import StepContext, define_job

from lib.durably import durably


@define_job(name="reminder", input=dict[str, Any])
async def reminder(step: StepContext, payload: dict[str, Any]) -> str:
    await step.run("welcome", lambda: print(f"  welcome mail to {payload['email']}"))
    await step.sleep("wait-before-reminder", payload["seconds"])
    return await step.run("remind", lambda: f"reminded {payload['email']}", type=str)


durably.register(reminder=reminder)


async def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 1.0
    asleep = asyncio.Event()
    durably.on("run:wait", lambda event: asleep.set())
    async with durably:
        run = await durably.jobs.reminder.trigger({"email": "ada@example.com", "seconds": seconds})
        await asyncio.wait_for(asleep.wait(), timeout=10)
        waiting = await durably.get_run(run.id)
        assert waiting is not None
        print(f"run {run.id} is {waiting.status} ({waiting.waiting_for}) until {waiting.wake_at}")
        done = await durably.wait_for_run(run.id, timeout=seconds + 30)
        print(f"run {run.id} {done.status}: {done.output}")


if __name__ == "__main__":
    asyncio.run(main())
