"""Trigger a job and wait for its output.

Run: python examples/server/basic.py
"""

from __future__ import annotations

import asyncio

from lib.durably import durably


async def main() -> None:
    # `async with` migrates the schema, starts the worker, and stops it (gracefully) at the end.
    async with durably:
        result = await durably.jobs.process_image.trigger_and_wait({"filename": "photo.jpg"})
        print(f"Run {result.id} completed")
        print(f"Output: {result.output}")

        runs = await durably.get_runs(job_name="process-image", limit=1000)
        completed = sum(run.status == "completed" for run in runs)
        print(f"process-image runs in {durably.storage.url}: {len(runs)} ({completed} completed)")


if __name__ == "__main__":
    asyncio.run(main())
