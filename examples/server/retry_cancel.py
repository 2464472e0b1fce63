"""Retry a failed run (it resumes after its last completed step) and cancel a long one.

Run: python examples/server/retry_cancel.py

durably never retries by itself: a step that raises fails the run. `retry()`
puts the run back to pending with its completed steps kept, so only the
failed step and those after it execute again.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from durably import StepContext, define_job

from lib.durably import durably

calls: Counter[str] = Counter()  # how often each step function really ran
upstream_is_down = True


def fetch_invoices(account: str) -> list[int]:
    calls["fetch"] += 1
    return [120, 80, 300]


def push_total(account: str, total: int) -> dict[str, Any]:
    calls["push"] += 1
    if upstream_is_down:
        raise ConnectionError("accounting API unavailable")
    return {"account": account, "total": total}


@define_job(name="sync-invoices", input=dict[str, str])
async def sync_invoices(step: StepContext, payload: dict[str, str]) -> dict[str, Any]:
    amounts = await step.run("fetch", fetch_invoices, payload["account"])
    total = await step.run("sum", sum, amounts)
    return await step.run("push", push_total, payload["account"], total, type=dict[str, Any])


@define_job(name="long-export", input=dict[str, int])
async def long_export(step: StepContext, payload: dict[str, int]) -> int:
    for page in range(payload["pages"]):
        await step.run(f"page-{page}", asyncio.sleep, 0.1)
    return payload["pages"]


durably.register(sync_invoices=sync_invoices, long_export=long_export)
durably.on("step:skip", lambda event: print(f"  [step:skip] {event.step_name} (stored result reused)"))


async def retry_demo() -> None:
    global upstream_is_down
    print("retry:")
    run = await durably.jobs.sync_invoices.trigger({"account": "acme"})
    run = await durably.wait_for_run(run.id, timeout=10)
    print(f"  attempt {run.attempt} {run.status}: {run.error}")
    steps = await durably.get_steps(run.id)
    print(f"  steps: {', '.join(f'{step.name}={step.status}' for step in steps)}")

    upstream_is_down = False
    run = await durably.retry(run.id)
    print(f"  retry(): status={run.status} attempt={run.attempt}")
    run = await durably.wait_for_run(run.id, timeout=10)
    print(f"  attempt {run.attempt} {run.status}: output={run.output}")
    print(f"  calls: fetch={calls['fetch']} push={calls['push']} (fetch ran once, push twice)")


async def cancel_demo() -> None:
    print("cancel:")
    run = await durably.jobs.long_export.trigger({"pages": 50})
    await asyncio.sleep(0.5)  # the worker gets a few pages in
    await durably.cancel(run.id)  # the worker stops the running step within a heartbeat
    run = await durably.wait_for_run(run.id, timeout=10)
    done = [step for step in await durably.get_steps(run.id) if step.status == "completed"]
    print(f"  {run.status} after {len(done)} of 50 pages")


async def main() -> None:
    async with durably:
        await retry_demo()
        await cancel_demo()


if __name__ == "__main__":
    asyncio.run(main())
