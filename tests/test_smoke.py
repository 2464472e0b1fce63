from __future__ import annotations

from collections.abc import Callable

import pytest

from durably import Durably

from .jobs import ImageOut, process_image

pytestmark = pytest.mark.anyio


async def test_a_job_of_three_steps_runs_to_completion(make_durably: Callable[..., Durably]) -> None:
    durably = make_durably().register(process_image=process_image)
    async with durably:
        result = await durably.jobs.process_image.trigger_and_wait({"filename": "cat.png"}, timeout=10)
        steps = await durably.get_steps(result.id)
    assert result.output == ImageOut(url="https://cdn.example/500")
    assert result.disposition == "created"
    assert [(s.name, s.index, s.status, s.output) for s in steps] == [
        ("download", 0, "completed", {"filename": "cat.png", "size": 1000}),
        ("resize", 1, "completed", {"width": 800, "size": 500}),
        ("upload", 2, "completed", {"url": "https://cdn.example/500"}),
    ]
