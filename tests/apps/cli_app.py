"""A durably app for the CLI tests; its database is ``$DURABLY_TEST_DB``."""

from __future__ import annotations

import os
from typing import Any

import anyio
import msgspec

from durably import StepContext, create_durably, define_job
from tests.jobs import echo, process_image


class CountIn(msgspec.Struct):
    n: int


def explode(message: str) -> None:
    raise RuntimeError(message)


@define_job(name="count", input=CountIn)
async def count(step: StepContext, payload: CountIn) -> dict[str, int]:
    for i in range(payload.n):
        await step.run(f"item-{i}", lambda i=i: i * i)
        step.progress(i + 1, payload.n, f"item {i + 1}")
    step.log.info("counted", n=payload.n)
    return {"counted": payload.n}


@define_job(name="fail", input=dict[str, Any])
async def fail(step: StepContext, payload: dict[str, Any]) -> None:
    await step.run("fine", lambda: "ok")
    await step.run("explode", explode, payload.get("message", "boom"))


@define_job(name="slow", input=dict[str, Any])
async def slow(step: StepContext, payload: dict[str, Any]) -> dict[str, float]:
    seconds = float(payload.get("seconds", 1.0))
    await step.run("sleep", anyio.sleep, seconds)
    return {"slept": seconds}


durably = create_durably(
    os.environ["DURABLY_TEST_DB"], polling_interval=0.02, heartbeat_interval=0.2, stale_threshold=2.0
).register(echo=echo, process_image=process_image, count=count, fail=fail, slow=slow)
