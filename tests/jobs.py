"""Job definitions shared by the tests."""

from __future__ import annotations

from typing import Any

import msgspec

from durably import StepContext, define_job


class ImageIn(msgspec.Struct):
    filename: str


class ImageOut(msgspec.Struct):
    url: str


def download(filename: str, *, size: int = 1000) -> dict[str, Any]:
    return {"filename": filename, "size": size}


async def upload(size: int) -> dict[str, Any]:
    return {"url": f"https://cdn.example/{size}"}


@define_job(name="process-image", input=ImageIn, output=ImageOut)
async def process_image(step: StepContext, payload: ImageIn) -> ImageOut:
    data = await step.run("download", download, payload.filename, size=1000)
    resized = await step.run("resize", lambda: {"width": 800, "size": data["size"] // 2})
    uploaded = await step.run("upload", upload, resized["size"])
    return ImageOut(url=uploaded["url"])


@define_job(name="echo", input=dict[str, Any])
async def echo(step: StepContext, payload: dict[str, Any]) -> Any:
    return payload


@define_job(name="echo", input=dict[str, Any])
async def stored_echo(step: StepContext, payload: dict[str, Any]) -> Any:
    """``echo`` whose answer is stored as a step: a run that writes once before completing."""
    return await step.run("echo", lambda: payload)
