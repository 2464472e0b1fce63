"""The job the other programs here use: SPEC §2's ``process-image``, registered on an instance."""

from __future__ import annotations

import msgspec

from durably import StepContext, create_durably, define_job


class ImageIn(msgspec.Struct):
    filename: str


class ImageOut(msgspec.Struct):
    url: str


@define_job(name="process-image", input=ImageIn, output=ImageOut)
async def process_image(step: StepContext, payload: ImageIn) -> ImageOut:
    return ImageOut(url=f"https://cdn.example.com/{payload.filename}")


durably = create_durably("file:typing.db").register(process_image=process_image)
