"""Idempotency keys: triggering twice with one key creates one run.

Run: python examples/server/idempotency.py

A webhook provider may deliver the same event twice. Using its delivery id as
the idempotency key turns the second delivery into a no-op that returns the
first run. Only the trigger is deduplicated: a step that was running when its
worker died runs again, so side effects inside steps must tolerate a repeat.
"""

from __future__ import annotations

import asyncio
import secrets

from lib.durably import durably


async def handle_webhook(delivery_id: str, filename: str) -> None:
    run = await durably.jobs.process_image.trigger({"filename": filename}, idempotency_key=delivery_id)
    print(f"delivery {delivery_id}: run {run.id} {run.disposition}")


async def main() -> None:
    delivery_id = f"delivery-{secrets.token_hex(4)}"
    async with durably:
        await handle_webhook(delivery_id, "photo.jpg")  # created
        await handle_webhook(delivery_id, "photo.jpg")  # idempotent: the same run, nothing written

        # trigger_and_wait takes the same options and waits for the existing run.
        result = await durably.jobs.process_image.trigger_and_wait(
            {"filename": "photo.jpg"}, idempotency_key=delivery_id
        )
        print(f"trigger_and_wait: run {result.id} {result.disposition}, output {result.output}")

        runs = await durably.get_runs(job_name="process-image", limit=1000)
        same_key = [run for run in runs if run.idempotency_key == delivery_id]
        print(f"runs with key {delivery_id}: {len(same_key)}")


if __name__ == "__main__":
    asyncio.run(main())
