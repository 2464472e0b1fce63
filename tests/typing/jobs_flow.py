"""Types flow from ``define_job`` to handles, payloads and outputs, as a user writes them."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any, Literal, TypedDict, assert_type

from images import ImageIn, ImageOut, process_image

from durably import (
    Durably,
    JobDefinition,
    JobHandle,
    RetryPolicy,
    Run,
    RunResult,
    StepContext,
    create_durably,
    define_job,
)


class Order(TypedDict):
    order_id: str
    amount: int


@dataclasses.dataclass
class Receipt:
    total: int


assert_type(process_image, JobDefinition[ImageIn, ImageOut])


async def _bill(step: StepContext, payload: Order) -> Receipt:
    return Receipt(total=payload["amount"])


bill = define_job(name="bill", input=Order, output=Receipt, run=_bill)
assert_type(bill, JobDefinition[Order, Receipt])
# checkpoints= (SPEC §3) keeps the types, in both forms.
assert_type(
    define_job(name="bill-fast", input=Order, output=Receipt, run=_bill, checkpoints="pipelined"),
    JobDefinition[Order, Receipt],
)


@define_job(name="free-form", input=dict[str, Any], retries=RetryPolicy(initial_delay=timedelta(seconds=2)))
async def free_form(step: StepContext, payload: dict[str, Any]) -> list[str]:
    return sorted(payload)


# output=None: the output is any JSON value.
assert_type(free_form, JobDefinition[dict[str, Any], Any])


@define_job(name="counts", input=list[int], output=dict[str, int], checkpoints="sync")
async def counts(step: StepContext, payload: list[int]) -> dict[str, int]:
    return {"n": len(payload)}


assert_type(counts, JobDefinition[list[int], dict[str, int]])


# Not a class: a union or a Literal gives Any on that side, and still type-checks.
@define_job(name="maybe", input=int | None, output=ImageOut)
async def maybe(step: StepContext, payload: int | None) -> ImageOut:
    return ImageOut(url=str(payload))


assert_type(maybe, JobDefinition[Any, ImageOut])


@define_job(name="mode", input=ImageIn, output=Literal["ok", "skipped"])
async def mode(step: StepContext, payload: ImageIn) -> Literal["ok", "skipped"]:
    return "ok"


assert_type(mode, JobDefinition[ImageIn, Any])


async def _either(step: StepContext, payload: int | str) -> None:
    return None


either = define_job(name="either", input=int | str, run=_either)
assert_type(either, JobDefinition[Any, Any])


durably = create_durably("file:typing.db").register(
    process_image=process_image, bill=bill, free_form=free_form, counts=counts
)
assert_type(durably, Durably)


async def trigger_typed() -> None:
    images = durably.job(process_image)
    assert_type(images, JobHandle[ImageIn, ImageOut])
    assert_type(await images.trigger(ImageIn(filename="a.jpg")), Run)
    # Plain JSON-like data is a payload too; msgspec validates it at run time.
    await images.trigger({"filename": "a.jpg"}, labels={"source": "typing"})
    await images.batch_trigger([ImageIn(filename="a.jpg"), {"filename": "b.jpg"}])

    result = await images.trigger_and_wait(ImageIn(filename="a.jpg"), timeout=10)
    assert_type(result, RunResult[ImageOut])
    assert_type(result.output, ImageOut)
    assert_type(result.output.url, str)

    receipt = await durably.job(bill).trigger_and_wait({"order_id": "o-1", "amount": 3})
    assert_type(receipt.output, Receipt)
    await durably.job(bill).trigger(Order(order_id="o-1", amount=3))

    assert_type((await durably.job(counts).trigger_and_wait([1, 2])).output, dict[str, int])
    assert_type((await durably.job(free_form).trigger_and_wait({"a": 1})).output, Any)
    await durably.job(free_form).trigger(Order(order_id="o-2", amount=1))  # a TypedDict is a dict


async def trigger_by_name() -> None:
    # By name, or as an attribute, a handle cannot be typed: both are JobHandle[Any, Any].
    assert_type(durably.job("process-image"), JobHandle[Any, Any])
    assert_type(durably.jobs.process_image, JobHandle[Any, Any])
    assert_type(durably.jobs["process_image"], JobHandle[Any, Any])
    result = await durably.jobs.process_image.trigger_and_wait("anything goes here")
    assert_type(result.output, Any)


def fetch(url: str, *, mirrors: int = 0) -> dict[str, Any]:
    return {"url": url, "size": 3}


async def upload(data: bytes) -> dict[str, str]:
    return {"url": "https://cdn.example.com/x"}


@define_job(name="steps", input=ImageIn, output=ImageOut)
async def steps(step: StepContext, payload: ImageIn) -> ImageOut:
    # Without type=, a step's result is decoded JSON: Any.
    data = await step.run("fetch", fetch, payload.filename, mirrors=2)
    assert_type(data, Any)
    # retries= and timeout= belong to step.run, not to the function (SPEC section 12).
    retried = await step.run(
        "retried", upload, b"x", type=ImageOut, retries=RetryPolicy(max_attempts=5), timeout=30
    )
    assert_type(retried, ImageOut)
    typed = await step.run("upload", upload, b"x", type=ImageOut)
    assert_type(typed, ImageOut)
    sizes = await step.run("sizes", lambda: [1, 2], type=list[int])
    assert_type(sizes, list[int])
    as_dict = await step.run("dict", fetch, "u", type=dict[str, Any])
    assert_type(as_dict, dict[str, Any])
    # Not a class: mypy gives Any, pyright int | None; either fits the annotation.
    optional: int | None = await step.run("optional", fetch, "u", type=int | None)
    assert optional is None or optional > 0
    assert_type(step.run_id, str)
    assert_type(step.job_name, str)
    step.progress(1, 3, "fetched")
    step.log.info("fetched", size=data["size"])
    return typed


async def durable_waits(step: StepContext, durably: Durably) -> None:
    """Durable waits keep the child's output type (SPEC §12)."""
    await step.sleep("nap", 1.5)
    approval = await step.wait_for_signal("approve", timeout=60)
    assert_type(approval, Any)
    receipt = await step.run_job("bill", durably.job(bill), {"order_id": "o", "amount": 3}, priority=2)
    assert_type(receipt, Receipt)
    receipts = await step.run_jobs("bills", durably.job(bill), [{"order_id": "o", "amount": 3}])
    assert_type(receipts, list[Receipt])
    run = await durably.job(bill).trigger({"order_id": "o", "amount": 1}, delay=5, priority=1)
    assert_type(run, Run)
