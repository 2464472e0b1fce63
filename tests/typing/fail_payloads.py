"""Payloads a checker must refuse: each ``# E: code`` line is one mypy error with that code.

Plain JSON containers stay allowed (msgspec validates them at run time); a scalar or
an instance of another class where a Struct is expected cannot be right.
"""

from __future__ import annotations

from images import ImageIn, ImageOut, durably, process_image

images = durably.job(process_image)


async def wrong_payloads() -> None:
    await images.trigger("photo.jpg")  # E: arg-type
    await images.trigger(42)  # E: arg-type
    await images.trigger(ImageOut(url="x"))  # E: arg-type
    await images.trigger_and_wait(None)  # E: arg-type
    await images.trigger({1: "photo.jpg"})  # E: dict-item
    await images.batch_trigger([ImageIn(filename="a"), 3])  # E: list-item


def wrong_lookups() -> None:
    durably.job(42)  # E: call-overload
    durably.job(images)  # E: call-overload
