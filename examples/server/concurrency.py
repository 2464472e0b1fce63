"""Concurrency keys: runs that share a key execute one at a time, in trigger order.

Run: python examples/server/concurrency.py

The worker runs up to 4 runs at once (max_concurrent_runs=4 in lib/durably.py),
yet the three runs keyed "user-42" never overlap; "user-7" runs alongside them.
The guarantee holds across every worker and host sharing the database.
"""

from __future__ import annotations

import asyncio
from typing import Any

from lib.durably import durably

timeline: list[tuple[str, str, str]] = []  # (event, concurrency key, filename)


def record(event: Any) -> None:
    what = "start" if event.type == "run:start" else "done "
    key, filename = event.labels["user"], event.labels["file"]
    timeline.append((what, key, filename))
    print(f"{what} {key:8} {filename}")


durably.on("run:start", record)
durably.on("run:complete", record)


async def main() -> None:
    uploads = [("user-42", "a.jpg"), ("user-42", "b.jpg"), ("user-7", "x.jpg"), ("user-42", "c.jpg")]
    async with durably:
        runs = [
            await durably.jobs.process_image.trigger(
                {"filename": filename}, concurrency_key=user, labels={"user": user, "file": filename}
            )
            for user, filename in uploads
        ]
        for run in runs:
            await durably.wait_for_run(run.id)

    user_42 = [(what, filename) for what, key, filename in timeline if key == "user-42"]
    one_at_a_time = user_42 == [(w, f) for f in ("a.jpg", "b.jpg", "c.jpg") for w in ("start", "done ")]
    print(f"user-42 ran one at a time, in trigger order: {one_at_a_time}")


if __name__ == "__main__":
    asyncio.run(main())
