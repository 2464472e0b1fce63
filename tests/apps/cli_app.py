"""A durably app for the CLI tests; its database is ``$DURABLY_TEST_DB``."""

from __future__ import annotations

import os
import sys
from typing import Any

import anyio
import msgspec
import structlog

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


class ChattyIn(msgspec.Struct):
    n: int
    fail_at: int | None = None
    print_to: str | None = None  # "stdout" or "stderr": the job prints a line there


@define_job(name="chatty", input=ChattyIn)
async def chatty(step: StepContext, payload: ChattyIn) -> dict[str, int]:
    """Progress and log lines interleaved, for the terminal tests."""
    structlog.get_logger("cli_app").info("starting to count")  # the app's own logging
    for i in range(1, payload.n + 1):
        if i == 2 and payload.print_to:
            print("a line printed by the job", file=getattr(sys, payload.print_to))
        if i == payload.fail_at:
            await step.run(f"item-{i}", explode, f"failed at item {i}")
        await step.run(f"item-{i}", lambda i=i: i)
        step.progress(i, payload.n, f"item {i}")
        step.log.info(f"did item {i}", i=i)
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


if os.environ.get("CLI_APP_CONFIGURES_STRUCTLOG"):
    # As examples/server/lib/durably.py does: the app sends structlog's lines to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

durably = create_durably(
    os.environ["DURABLY_TEST_DB"], polling_interval=0.02, heartbeat_interval=0.2, stale_threshold=2.0
).register(echo=echo, process_image=process_image, count=count, chatty=chatty, fail=fail, slow=slow)
