"""Fan out to child runs and gather their outputs, with a single worker slot.

Run: python examples/server/fan_out.py

`step.run_jobs()` triggers one child run per page in one write; the parent then
waits without holding its slot, so the children run on the same one-slot worker
(no deadlock), and the last child to end wakes the parent. Each child is created
exactly once, however often the parent's body is replayed.
"""

from __future__ import annotations

import asyncio

from durably import StepContext, create_durably, define_job

from lib.database import storage


@define_job(name="count-words", input=str)
async def count_words(step: StepContext, page: str) -> int:
    return await step.run("count", lambda: len(page.split()), type=int)


@define_job(name="book-stats", input=list[str])
async def book_stats(step: StepContext, pages: list[str]) -> dict[str, int]:
    counts = await step.run_jobs("pages", durably.jobs.count_words, pages)
    return {"pages": len(counts), "words": sum(counts)}


durably = create_durably(storage, polling_interval=0.05, max_concurrent_runs=1).register(
    count_words=count_words, book_stats=book_stats
)


async def main() -> None:
    pages = ["it was the best of times", "it was the worst of times", "the end"]
    async with durably:
        result = await durably.jobs.book_stats.trigger_and_wait(pages, timeout=30)
        children = await durably.get_runs(job_name="count-words")
        print(f"book-stats {result.id}: {result.output}")
        ours = all(child.parent_run_id == result.id for child in children)
        print(f"children: {len(children)}, all of parent {result.id}: {ours}")


if __name__ == "__main__":
    asyncio.run(main())
