"""An instance outlives event loops: serverless handlers often call asyncio.run per invocation."""

from __future__ import annotations

import asyncio
from typing import Any

from durably import create_durably

from .conftest import Database
from .jobs import echo


def test_one_instance_serves_one_invocation_after_another(database: Database) -> None:
    durably = create_durably(database.open(), polling_interval=0.01).register(echo=echo)

    async def invocation(n: int) -> int:
        try:
            await durably.jobs.echo.trigger({"n": n})
            return await durably.process_until_idle()
        finally:
            await durably.close()  # the next invocation, on a new loop, opens connections again

    assert asyncio.run(invocation(1)) == 1
    assert asyncio.run(invocation(2)) == 1

    async def outputs() -> list[Any]:
        try:
            return [run.output["n"] for run in await durably.get_runs(status="completed")]
        finally:
            await durably.close()

    assert sorted(asyncio.run(outputs())) == [1, 2]
