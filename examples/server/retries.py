"""Retry a flaky step with backoff, time out a slow one, retry a whole run, and give up at once.

Run: python examples/server/retries.py

Retries are opt-in: a `RetryPolicy` on `step.run(..., retries=)` tries the step function
again inside the run; one on `define_job(..., retries=)` puts a failed run back to pending
until its next attempt. `NonRetryableError` fails at once, whatever the policy.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from durably import NonRetryableError, RetryPolicy, StepContext, define_job

from lib.durably import durably

calls: Counter[str] = Counter()  # how often each function really ran

QUICK = RetryPolicy(max_attempts=4, initial_delay=0.05, backoff=2.0, max_delay=1.0)


def charge_card(order: str) -> dict[str, Any]:
    calls["charge"] += 1
    if calls["charge"] < 3:  # the payment gateway is flaky: two failures, then it works
        raise ConnectionError("payment gateway timed out")
    return {"order": order, "charged": True}


async def slow_quote(order: str) -> float:
    calls["quote"] += 1
    if calls["quote"] == 1:
        await asyncio.sleep(10)  # hangs the first time; the timeout cuts it short
    return 9.99


def reserve_stock(order: str) -> str:
    calls["reserve"] += 1
    if calls["reserve"] == 1:
        raise RuntimeError("warehouse busy")  # fails the run's first attempt
    return "reserved"


def validate(order: str) -> str:
    raise NonRetryableError(f"order {order} has no items")  # retrying cannot help


@define_job(name="checkout", input=dict[str, str])
async def checkout(step: StepContext, payload: dict[str, str]) -> dict[str, Any]:
    order = payload["order"]
    price = await step.run("quote", slow_quote, order, timeout=0.3, retries=QUICK)
    charged = await step.run("charge", charge_card, order, retries=QUICK)
    return {"price": price, **charged}


@define_job(
    name="ship",
    input=dict[str, str],
    retries=RetryPolicy(max_attempts=3, initial_delay=0.2, jitter=False),
)
async def ship(step: StepContext, payload: dict[str, str]) -> str:
    print(f"  ship: attempt {step.attempt}")
    await step.run("reserve", reserve_stock, payload["order"])
    if payload["order"] == "empty":
        await step.run("validate", validate, payload["order"])
    return "shipped"


durably.register(checkout=checkout, ship=ship)
durably.on(
    "run:retry", lambda e: print(f"  [run:retry] attempt {e.attempt} at {e.next_attempt_at:%H:%M:%S.%f}")
)
durably.on("run:fail", lambda e: print(f"  [run:fail] {e.error}"))


async def main() -> None:
    async with durably:
        print("step retries and a timeout:")
        result = await durably.jobs.checkout.trigger_and_wait({"order": "A-1"}, timeout=20)
        print(f"  output={result.output}")
        print(f"  calls: quote={calls['quote']} charge={calls['charge']}")

        print("run retries:")
        result = await durably.jobs.ship.trigger_and_wait({"order": "A-1"}, timeout=20)
        print(f"  output={result.output} reserve calls={calls['reserve']}")

        print("non-retryable:")
        run = await durably.jobs.ship.trigger({"order": "empty"})
        run = await durably.wait_for_run(run.id, timeout=20)
        print(f"  {run.status} on attempt {run.attempt}: {run.error}")


if __name__ == "__main__":
    asyncio.run(main())
