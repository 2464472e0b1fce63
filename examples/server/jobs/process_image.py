"""process-image: download, resize, upload. Each ``step.run()`` is a checkpoint.

If the process dies after "resize", the next worker to claim the run skips
"download" and "resize" (their stored results are returned) and runs "upload".
The I/O is faked with short sleeps so the examples need no network.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from durably import StepContext, define_job


class ImageIn(msgspec.Struct):
    filename: str


class ImageOut(msgspec.Struct):
    url: str


def download(filename: str) -> dict[str, Any]:
    """A blocking call: durably runs sync step functions in a worker thread."""
    time.sleep(0.1)
    return {"filename": filename, "size": 1_024_000}


def resize(size: int, *, width: int) -> dict[str, Any]:
    time.sleep(0.1)
    return {"width": width, "height": width * 3 // 4, "size": size // 2}


async def upload(filename: str, size: int) -> dict[str, Any]:
    """An async call: awaited on the event loop."""
    await asyncio.sleep(0.1)
    return {"url": f"https://cdn.example.com/{filename}", "size": size}


@define_job(name="process-image", input=ImageIn, output=ImageOut)
async def process_image(step: StepContext, payload: ImageIn) -> ImageOut:
    # Step results come back as JSON values (dicts here), on first run and on resume alike.
    data = await step.run("download", download, payload.filename)
    step.progress(1, 3, "downloaded")

    resized = await step.run("resize", resize, data["size"], width=800)
    step.progress(2, 3, "resized")

    uploaded = await step.run("upload", upload, payload.filename, resized["size"])
    step.progress(3, 3, "uploaded")

    step.log.info("image processed", url=uploaded["url"], size=uploaded["size"])
    return ImageOut(url=uploaded["url"])
