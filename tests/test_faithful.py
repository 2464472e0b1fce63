"""Data survives the round trip unchanged, or is refused (SPEC §5): inputs, step results, outputs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from durably import Durably, StepContext, ValidationError, create_durably, define_job

pytestmark = pytest.mark.anyio


class Blob(msgspec.Struct):
    name: str
    data: bytes
    at: datetime
    tags: set[str] = msgspec.field(default_factory=set)
    extra: dict[str, Any] = msgspec.field(default_factory=dict)


@define_job(name="free", input=dict[str, Any])
async def free(step: StepContext, payload: dict[str, Any]) -> Any:
    return payload


@define_job(name="typed", input=Blob, output=Blob)
async def typed(step: StepContext, payload: Blob) -> Blob:
    return payload


@define_job(name="anything", input=Any)
async def anything(step: StepContext, payload: Any) -> Any:
    return payload


@dataclasses.dataclass
class Point:
    x: int
    y: float


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


UNFAITHFUL = {
    "nan": ({"x": math.nan}, "would become null"),
    "infinity": ({"x": math.inf}, "would become null"),
    "-infinity": ({"deep": [{"x": -math.inf}]}, "$.deep[0]"),
    "bytes": ({"x": b"raw"}, "bytes is not JSON-native"),
    "set": ({"x": {1, 2}}, "set is not JSON"),
    "frozenset": ({"x": frozenset()}, "frozenset is not JSON"),
    "int key": ({"x": {1: "a"}}, "the key 1 is not a string"),
    "datetime": ({"at": datetime(2026, 1, 1, tzinfo=UTC)}, "datetime is not JSON-native"),
    "huge int": ({"x": 2**70}, "outside the 64-bit range"),
    "tiny int": ({"x": -(2**63) - 1}, "outside the 64-bit range"),
    "lone surrogate": ({"x": "\ud800"}, "lone surrogate"),
    "surrogate key": ({"\udfff": 1}, "lone surrogate"),
    "deep": ({"x": _nested(5000)}, "nested deeper than"),
    "object": ({"x": object()}, "object is not JSON-native"),
    "nan in a dataclass": ({"p": Point(1, math.nan)}, "$.p.y"),
}


@pytest.fixture
async def durably(tmp_path: Path) -> AsyncIterator[Durably]:
    instance = create_durably(f"file:{tmp_path / 'jobs.db'}", polling_interval=0.01).register(
        free=free, typed=typed, anything=anything
    )
    try:
        yield instance
    finally:
        await instance.close()


@pytest.mark.parametrize("case", sorted(UNFAITHFUL))
async def test_an_input_json_cannot_carry_under_its_declared_type_is_refused_and_nothing_is_written(
    durably: Durably, case: str
) -> None:
    payload, expected = UNFAITHFUL[case]
    for handle in (durably.jobs.free, durably.jobs.anything):
        with pytest.raises(ValidationError, match="cannot be stored faithfully") as refused:
            await handle.trigger(payload)
        assert expected in str(refused.value)
        with pytest.raises(ValidationError):
            await handle.batch_trigger([{"fine": 1}, payload])
    assert await durably.get_runs() == []


async def test_values_the_declared_type_carries_are_allowed_and_come_back_equal(durably: Durably) -> None:
    at = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)
    blob = Blob(name="a", data=b"\x00\xff", at=at, tags={"x", "y"}, extra={"n": 1, "l": [1.5, None]})
    run = await durably.jobs.typed.trigger(blob)
    assert await durably.process_until_idle() == 1
    done = await durably.wait_for_run(run.id)
    assert done.status == "completed", done.error
    assert msgspec.convert(done.output, Blob) == blob
    # Plain JSON data, tuples and objects of plain data are fine under Any.
    payload = {"t": (1, "two"), "p": Point(1, 2.5), "s": "é ✓", "big": 2**63 - 1, "neg": -(2**63)}
    free_run = await durably.jobs.free.trigger(payload)
    assert free_run.input == {
        "t": [1, "two"],
        "p": {"x": 1, "y": 2.5},
        "s": "é ✓",
        "big": 2**63 - 1,
        "neg": -(2**63),
    }


async def test_an_unfaithful_typed_value_inside_a_struct_is_refused_where_it_is_untyped(
    durably: Durably,
) -> None:
    at = datetime(2026, 12, 5, tzinfo=UTC)
    with pytest.raises(ValidationError, match=r"\$\.extra\.b: a bytes"):
        await durably.jobs.typed.trigger(Blob(name="a", data=b"", at=at, extra={"b": b"x"}))
    with pytest.raises(ValidationError, match="would become null"):
        await durably.jobs.typed.trigger(
            {"name": "a", "data": "", "at": at.isoformat(), "extra": {"f": math.nan}}
        )
    assert await durably.get_runs() == []


async def test_a_step_result_json_cannot_carry_fails_the_step_naming_it(durably: Durably) -> None:
    @define_job(name="stepper", input=dict[str, Any])
    async def stepper(step: StepContext, payload: dict[str, Any]) -> Any:
        await step.run("fine", lambda: {"ok": True})
        return await step.run("lossy", lambda: {"ratio": math.nan})

    durably.register(stepper=stepper)
    run = await durably.jobs.stepper.trigger({})
    assert await durably.process_until_idle() == 1
    done = await durably.wait_for_run(run.id)
    assert done.status == "failed"
    assert done.error is not None
    assert done.error.startswith("ValidationError: the result of step 'lossy' cannot be stored faithfully")
    steps = {step.name: step for step in await durably.get_steps(run.id)}
    assert steps["fine"].status == "completed"
    assert steps["lossy"].status == "failed"
    assert steps["lossy"].output is None


async def test_an_output_json_cannot_carry_fails_the_run(durably: Durably) -> None:
    @define_job(name="lossy-output", input=dict[str, Any])
    async def lossy(step: StepContext, payload: dict[str, Any]) -> Any:
        return {1: "int key", "b": b"bytes"}

    durably.register(lossy=lossy)
    run = await durably.jobs.lossy.trigger({})
    assert await durably.process_until_idle() == 1
    done = await durably.wait_for_run(run.id)
    assert done.status == "failed"
    assert done.output is None
    assert done.error is not None
    assert done.error.startswith("ValidationError: output of job 'lossy-output' cannot be stored faithfully")
    assert "the key 1 is not a string" in done.error
