"""A run that waits for a person: a signal with a timeout.

Run: python examples/server/approval.py [TIMEOUT_SECONDS]

The expense job waits for an "approval" signal. While it waits it is stored as
`waiting`: it holds no lease and no worker slot, so it may wait for days. The
first request is approved by `durably.signal()`; nobody answers the second, so
its durable timeout raises TimeoutError inside the job, which escalates.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from durably import StepContext, define_job

from lib.durably import durably

TIMEOUT = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0


@define_job(name="expense", input=dict[str, Any])
async def expense(step: StepContext, payload: dict[str, Any]) -> str:
    await step.run("notify", lambda: print(f"  asked a manager to approve {payload['amount']} EUR"))
    try:
        decision = await step.wait_for_signal("approval", timeout=TIMEOUT, type=dict[str, Any])
    except TimeoutError:
        return await step.run("escalate", lambda: "escalated: nobody answered", type=str)
    return f"approved by {decision['by']}" if decision["ok"] else f"rejected by {decision['by']}"


durably.register(expense=expense)


async def main() -> None:
    waiting = asyncio.Event()
    durably.on("run:wait", lambda event: waiting.set())
    async with durably:
        answered = await durably.jobs.expense.trigger({"amount": 120})
        ignored = await durably.jobs.expense.trigger({"amount": 9000})
        await asyncio.wait_for(waiting.wait(), timeout=10)  # the first run reached its wait
        run = await durably.get_run(answered.id)
        assert run is not None
        print(f"run {run.id} is {run.status} for {run.waiting_for}")
        await durably.signal(answered.id, "approval", {"ok": True, "by": "grace"})
        for run_id in (answered.id, ignored.id):
            done = await durably.wait_for_run(run_id, timeout=TIMEOUT + 10)
            print(f"run {run_id}: {done.output}")


if __name__ == "__main__":
    asyncio.run(main())
