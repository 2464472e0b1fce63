"""Job functions that do not fit their declared types: each ``# E: code`` line is one mypy error."""

from __future__ import annotations

from typing import Any

from images import ImageIn, ImageOut

from durably import StepContext, define_job


@define_job(name="wrong-payload", input=ImageIn, output=ImageOut)  # E: arg-type
async def wrong_payload(step: StepContext, payload: ImageOut) -> ImageOut:
    return payload


@define_job(name="wrong-output", input=ImageIn, output=ImageOut)  # E: arg-type
async def wrong_output(step: StepContext, payload: ImageIn) -> dict[str, Any]:
    return {"url": payload.filename}


@define_job(name="not-async", input=ImageIn)  # E: arg-type
def not_async(step: StepContext, payload: ImageIn) -> ImageOut:
    return ImageOut(url=payload.filename)


@define_job(name="no-step", input=ImageIn, output=ImageOut)  # E: arg-type
async def no_step(payload: ImageIn) -> ImageOut:
    return ImageOut(url=payload.filename)


async def _takes_str(step: StepContext, payload: str) -> ImageOut:
    return ImageOut(url=payload)


missing_input = define_job(name="no-input", output=ImageOut, run=_takes_str)  # E: call-overload
eventually = define_job(name="eventually", input=str, run=_takes_str, checkpoints="soon")  # E: call-overload


@define_job(name="typed-steps", input=ImageIn, output=ImageOut)
async def typed_steps(step: StepContext, payload: ImageIn) -> ImageOut:
    url: str = await step.run("fetch", lambda: {"url": "x"}, type=ImageOut)  # E: arg-type
    converted = await step.run("convert", lambda: {"url": "x"}, type=ImageOut)
    return ImageOut(url=url + converted.filename)  # E: attr-defined
