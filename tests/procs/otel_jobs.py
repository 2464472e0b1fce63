"""Jobs shared by tests/test_otel*.py and the worker host they start."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from durably import StepContext, define_job


def _second(fail_once: str | None) -> int:
    if fail_once is not None and not Path(fail_once).exists():
        Path(fail_once).touch()
        raise RuntimeError("second failed")
    return 2


@define_job(name="two-steps", input=dict[str, Any])
async def two_steps(step: StepContext, payload: dict[str, Any]) -> Any:
    """Two steps; the second fails the first time when ``payload["fail_once"]`` names a marker file."""
    one = await step.run("one", lambda: 1)
    two = await step.run("two", _second, payload.get("fail_once"))
    return one + two
