"""Outputs and attributes used wrongly: each ``# E: code`` line is one mypy error with that code."""

from __future__ import annotations

from images import ImageIn, durably, process_image

images = durably.job(process_image)


async def wrong_output_use() -> None:
    result = await images.trigger_and_wait(ImageIn(filename="a.jpg"))
    print(result.output.filename)  # E: attr-defined
    size: int = result.output  # E: assignment
    print(size, result.output.url + 1)  # E: operator
    print(result.id.hex)  # E: attr-defined


async def unknown_attributes() -> None:
    await images.trigger_later({"filename": "a.jpg"})  # E: attr-defined
    print(process_image.input)  # E: attr-defined
