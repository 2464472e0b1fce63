"""One function for a platform's cron or queue: no long-running worker anywhere.

Run: DURABLY_DB=http://127.0.0.1:8080 python examples/serverless/handler.py [BUDGET_SECONDS]

Each invocation triggers the schedules that are due, executes runs until none is
claimable or its time budget is spent (a run still executing then is stopped and its
lease released, so the next invocation resumes it after its last completed step),
and answers a JSON summary whose `next_wake_at` tells the platform when to call
again. Several invocations may run at once: leases keep every run to one of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import timedelta
from typing import Any

from durably import StepContext, create_durably, define_job


@define_job(name="digest", input=dict[str, Any])
async def digest(step: StepContext, payload: dict[str, Any]) -> str:
    items = await step.run("collect", lambda: [f"item-{i}" for i in range(payload.get("items", 3))])
    await step.sleep("cool-down", timedelta(seconds=payload.get("cool_down", 0.2)))
    return await step.run("send", lambda: f"sent {len(items)} items to {payload['to']}", type=str)


def make_durably(url: str) -> Any:
    durably = create_durably(url, polling_interval=0.05).register(digest=digest)
    durably.schedule("0 8 * * *", durably.jobs.digest, {"to": "team@example.com"}, name="daily-digest")
    return durably


async def handle(url: str, budget: float) -> dict[str, Any]:
    """One invocation: due schedules, runs until idle within ``budget`` seconds, the next wake-up."""
    durably = make_durably(url)
    completed: list[str] = []
    durably.on("run:complete", lambda event: completed.append(event.run_id))
    try:
        await durably.migrate()
        triggered = await durably.trigger_due_schedules()
        processed = await durably.process_until_idle(deadline=budget)
        wake = await durably.next_wake_at()
    finally:
        await durably.close()
    return {
        "triggered": triggered,
        "processed": processed,
        "completed": completed,
        "next_wake_at": None if wake is None else wake.isoformat(),
    }


def handler(event: Any = None, context: Any = None) -> dict[str, Any]:
    """The platform's entry point (AWS Lambda's signature; others are alike)."""
    budget = float((event or {}).get("budget", 10.0))
    return asyncio.run(handle(os.environ.get("DURABLY_DB", "file:local.db"), budget))


if __name__ == "__main__":
    print(json.dumps(handler({"budget": float(sys.argv[1])} if len(sys.argv) > 1 else None)))
