"""Triggering runs: validation, idempotency, batches, concurrency keys, labels, waiting."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

import anyio
import msgspec
import pytest

from durably import (
    Durably,
    LogEntry,
    Progress,
    Run,
    RunCancelledError,
    RunFailedError,
    RunResult,
    StepContext,
    ValidationError,
    define_job,
)

pytestmark = pytest.mark.anyio


class Order(msgspec.Struct):
    sku: str
    quantity: int
    gift: bool = False


class Receipt(msgspec.Struct):
    total: int
    note: str


class Slot(msgspec.Struct):
    index: int
    hold: float = 0.05


class Behaviour:
    """What the jobs below do; reset before every test."""

    intervals: list[tuple[int, float, float]]
    parallel_started: int
    parallel_ready: anyio.Event | None
    parallel_target: int

    def reset(self) -> None:
        self.intervals = []
        self.parallel_started = 0
        self.parallel_ready = None
        self.parallel_target = 0


behaviour = Behaviour()


@pytest.fixture(autouse=True)
def _reset_behaviour() -> None:
    behaviour.reset()


@define_job(name="order", input=Order, output=Receipt)
async def order_job(step: StepContext, payload: Order) -> Receipt:
    total = await step.run("price", lambda: payload.quantity * 10)
    return Receipt(total=total, note="gift" if payload.gift else "plain")


@define_job(name="order-copy", input=Order, output=Receipt)
async def order_copy_job(step: StepContext, payload: Order) -> Receipt:
    return Receipt(total=0, note="copy")


@define_job(name="slot", input=Slot)
async def slot_job(step: StepContext, payload: Slot) -> int:
    started = time.monotonic()
    await anyio.sleep(payload.hold)
    behaviour.intervals.append((payload.index, started, time.monotonic()))
    return payload.index


@define_job(name="together", input=Slot)
async def together_job(step: StepContext, payload: Slot) -> int:
    # Completes only if `parallel_target` runs are executing at the same time.
    assert behaviour.parallel_ready is not None
    behaviour.parallel_started += 1
    if behaviour.parallel_started >= behaviour.parallel_target:
        behaviour.parallel_ready.set()
    with anyio.fail_after(5):
        await behaviour.parallel_ready.wait()
    return payload.index


@define_job(name="explode", input=dict[str, Any])
async def explode_job(step: StepContext, payload: dict[str, Any]) -> None:
    await step.run("first", lambda: 1)
    raise RuntimeError(f"boom {payload['n']}")


@define_job(name="sleepy", input=dict[str, Any])
async def sleepy_job(step: StepContext, payload: dict[str, Any]) -> dict[str, Any]:
    await step.run("nap", anyio.sleep, payload["seconds"])
    return {"slept": payload["seconds"]}


@define_job(name="chatty", input=dict[str, Any])
async def chatty_job(step: StepContext, payload: dict[str, Any]) -> str:
    step.progress(1, 2, "halfway")
    step.log.info("hello", who="world")

    def inside() -> str:
        return "done"

    await step.run("inside", inside)
    step.progress(2, 2, "finished")
    step.log.warn("careful", level=3)
    return "ok"


@define_job(name="liar", input=dict[str, Any], output=Receipt)
async def liar_job(step: StepContext, payload: dict[str, Any]) -> Any:
    return {"total": "not a number", "note": "x"}


ALL_JOBS = {
    "order": order_job,
    "order_copy": order_copy_job,
    "slot": slot_job,
    "together": together_job,
    "explode": explode_job,
    "sleepy": sleepy_job,
    "chatty": chatty_job,
    "liar": liar_job,
}


async def _count_runs(instance: Durably) -> int:
    return len(await instance.get_runs(limit=1000))


# --- trigger --------------------------------------------------------------------------------


async def test_trigger_returns_a_pending_created_run_with_canonical_input(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    run = await instance.jobs.order.trigger({"sku": "A-1", "quantity": 3})
    assert isinstance(run, Run)
    assert run.status == "pending"
    assert run.disposition == "created"
    assert run.job_name == "order"
    assert run.attempt == 1
    assert run.input == {"sku": "A-1", "quantity": 3, "gift": False}
    stored = await instance.get_run(run.id)
    assert stored is not None
    assert stored.input == run.input
    assert stored.status == "pending"


async def test_payload_as_struct_or_as_dict_gives_the_same_input(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    from_struct = await instance.jobs.order.trigger(Order(sku="B", quantity=2, gift=True))
    from_dict = await instance.jobs.order.trigger({"sku": "B", "quantity": 2, "gift": True})
    assert from_struct.input == from_dict.input == {"sku": "B", "quantity": 2, "gift": True}
    await instance.process_until_idle()
    for run in (from_struct, from_dict):
        done = await instance.wait_for_run(run.id, timeout=5)
        assert done.status == "completed"
        assert done.output == {"total": 20, "note": "gift"}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"sku": "A", "quantity": "three"}, "quantity"),
        ({"sku": "A"}, "quantity"),
        ({"quantity": 1}, "sku"),
        ({"sku": 7, "quantity": 1}, "sku"),
    ],
)
async def test_an_invalid_payload_names_the_field_and_writes_nothing(
    make_durably: Callable[..., Durably], payload: dict[str, Any], field: str
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    with pytest.raises(ValidationError, match=field):
        await instance.jobs.order.trigger(payload)
    assert await instance.get_runs() == []


async def test_a_payload_that_is_not_json_is_refused(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    with pytest.raises(ValidationError):
        await instance.jobs.order.trigger(object())
    assert await instance.get_runs() == []


# --- idempotency -------------------------------------------------------------------------


async def test_an_idempotency_key_returns_the_existing_run(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    first = await instance.jobs.order.trigger({"sku": "A", "quantity": 1}, idempotency_key="k-1")
    again = await instance.jobs.order.trigger({"sku": "A", "quantity": 1}, idempotency_key="k-1")
    other_payload = await instance.jobs.order.trigger(
        {"sku": "Z", "quantity": 9}, idempotency_key="k-1", labels={"late": "label"}
    )
    assert first.disposition == "created"
    assert again.disposition == other_payload.disposition == "idempotent"
    assert again.id == other_payload.id == first.id
    assert other_payload.input == first.input
    assert first.idempotency_key == "k-1"
    assert other_payload.labels == {}
    assert await instance.get_runs(labels={"late": "label"}) == []
    assert await _count_runs(instance) == 1


async def test_an_idempotency_key_holds_after_the_run_completed(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    first = await instance.jobs.order.trigger({"sku": "A", "quantity": 1}, idempotency_key="once")
    assert await instance.process_until_idle() == 1
    again = await instance.jobs.order.trigger({"sku": "A", "quantity": 1}, idempotency_key="once")
    assert again.id == first.id
    assert again.disposition == "idempotent"
    assert again.status == "completed"
    assert again.output == {"total": 10, "note": "plain"}
    assert await _count_runs(instance) == 1
    assert await instance.process_until_idle() == 0


async def test_idempotency_keys_are_per_job(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    one = await instance.jobs.order.trigger({"sku": "A", "quantity": 1}, idempotency_key="shared")
    two = await instance.jobs.order_copy.trigger({"sku": "A", "quantity": 1}, idempotency_key="shared")
    assert one.id != two.id
    assert one.disposition == two.disposition == "created"
    assert await _count_runs(instance) == 2


async def test_trigger_and_wait_with_a_known_key_returns_the_existing_result(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    await instance.init()
    first = await instance.jobs.order.trigger_and_wait(
        {"sku": "A", "quantity": 4}, idempotency_key="k", timeout=5
    )
    again = await instance.jobs.order.trigger_and_wait(
        {"sku": "A", "quantity": 4}, idempotency_key="k", timeout=5
    )
    assert first.disposition == "created"
    assert again.disposition == "idempotent"
    assert again.id == first.id
    assert again.output == first.output == Receipt(total=40, note="plain")


# --- batch_trigger -----------------------------------------------------------------------


async def test_batch_trigger_writes_every_run_in_order(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    payloads: list[Any] = [{"sku": f"S{i}", "quantity": i} for i in range(5)]
    payloads[2] = Order(sku="S2", quantity=2)
    runs = await instance.jobs.order.batch_trigger(payloads, labels={"batch": "b1"})
    assert [run.input["sku"] for run in runs] == [f"S{i}" for i in range(5)]
    assert all(run.status == "pending" and run.disposition == "created" for run in runs)
    assert all(run.labels == {"batch": "b1"} for run in runs)
    assert len({run.id for run in runs}) == 5
    assert [run.id for run in runs] == sorted(run.id for run in runs)
    stored = await instance.get_runs(labels={"batch": "b1"})
    assert [run.id for run in stored] == [run.id for run in reversed(runs)]


async def test_batch_trigger_validates_everything_before_writing(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    payloads = [{"sku": "ok", "quantity": 1}, {"sku": "ok", "quantity": 2}, {"sku": "bad"}]
    with pytest.raises(ValidationError, match="quantity"):
        await instance.jobs.order.batch_trigger(payloads)
    assert await instance.get_runs() == []


async def test_an_empty_batch_writes_nothing(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    assert await instance.jobs.order.batch_trigger([]) == []
    assert await instance.get_runs() == []


# --- concurrency keys ----------------------------------------------------------------------


async def test_runs_sharing_a_concurrency_key_never_overlap_across_workers(
    make_durably: Callable[..., Durably],
) -> None:
    workers = [make_durably(max_concurrent_runs=4).register(**ALL_JOBS) for _ in range(2)]
    trigger_side = workers[0]
    await trigger_side.migrate()
    runs = [
        await trigger_side.jobs.slot.trigger({"index": i, "hold": 0.03}, concurrency_key="serial")
        for i in range(6)
    ]
    assert all(run.concurrency_key == "serial" for run in runs)
    for worker in workers:
        await worker.init()
    for run in runs:
        done = await trigger_side.wait_for_run(run.id, timeout=10)
        assert done.status == "completed"
    intervals = behaviour.intervals
    assert len(intervals) == 6
    assert [index for index, _, _ in sorted(intervals, key=lambda i: i[1])] == list(range(6))
    ordered = sorted(intervals, key=lambda i: i[1])
    for (_, _, previous_end), (index, start, _) in itertools.pairwise(ordered):
        assert start >= previous_end, f"run {index} started before the previous one ended"


async def test_a_concurrency_key_runs_in_trigger_order_when_claimed_later(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably(max_concurrent_runs=4).register(**ALL_JOBS)
    for i in range(4):
        await instance.jobs.slot.trigger({"index": i, "hold": 0}, concurrency_key="k")
    # One claim may take only the oldest run of a key, however many slots are free.
    assert await instance.process_one() is True
    assert [index for index, _, _ in behaviour.intervals] == [0]
    assert await instance.process_until_idle() == 3
    assert [index for index, _, _ in behaviour.intervals] == [0, 1, 2, 3]


async def test_runs_without_a_key_run_in_parallel_across_workers(
    make_durably: Callable[..., Durably],
) -> None:
    behaviour.parallel_ready = anyio.Event()
    behaviour.parallel_target = 6
    workers = [make_durably(max_concurrent_runs=4).register(**ALL_JOBS) for _ in range(2)]
    await workers[0].migrate()
    runs = await workers[0].jobs.together.batch_trigger([{"index": i} for i in range(6)])
    for worker in workers:
        await worker.init()
    for run in runs:
        done = await workers[0].wait_for_run(run.id, timeout=10)
        assert done.status == "completed", done.error


async def test_different_concurrency_keys_do_not_wait_for_each_other(
    make_durably: Callable[..., Durably],
) -> None:
    behaviour.parallel_ready = anyio.Event()
    behaviour.parallel_target = 3
    instance = make_durably(max_concurrent_runs=4).register(**ALL_JOBS)
    await instance.migrate()
    runs = [await instance.jobs.together.trigger({"index": i}, concurrency_key=f"key-{i}") for i in range(3)]
    await instance.init()
    for run in runs:
        done = await instance.wait_for_run(run.id, timeout=10)
        assert done.status == "completed", done.error


# --- labels and keys ---------------------------------------------------------------------------


async def test_labels_are_stored_and_every_filter_label_must_match(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    both = await instance.jobs.order.trigger(
        {"sku": "A", "quantity": 1}, labels={"team": "red", "env": "prod"}
    )
    red_only = await instance.jobs.order.trigger({"sku": "B", "quantity": 1}, labels={"team": "red"})
    other = await instance.jobs.order.trigger(
        {"sku": "C", "quantity": 1}, labels={"team": "blue", "env": "prod"}
    )
    await instance.jobs.order.trigger({"sku": "D", "quantity": 1})
    assert both.labels == {"team": "red", "env": "prod"}
    stored = await instance.get_run(both.id)
    assert stored is not None
    assert stored.labels == {"team": "red", "env": "prod"}

    def ids(runs: list[Run]) -> set[str]:
        return {run.id for run in runs}

    assert ids(await instance.get_runs(labels={"team": "red"})) == {both.id, red_only.id}
    assert ids(await instance.get_runs(labels={"env": "prod"})) == {both.id, other.id}
    assert ids(await instance.get_runs(labels={"team": "red", "env": "prod"})) == {both.id}
    assert await instance.get_runs(labels={"team": "red", "env": "dev"}) == []
    assert await instance.get_runs(labels={"team": "green"}) == []


@pytest.mark.parametrize(
    "labels",
    [{"team": 1}, {1: "x"}, ["team"], "team=red", {"team": None}],
)
async def test_bad_labels_are_refused(make_durably: Callable[..., Durably], labels: Any) -> None:
    instance = make_durably().register(**ALL_JOBS)
    with pytest.raises(ValidationError, match="labels"):
        await instance.jobs.order.trigger({"sku": "A", "quantity": 1}, labels=labels)
    with pytest.raises(ValidationError, match="labels"):
        await instance.get_runs(labels=labels)
    assert await instance.get_runs() == []


@pytest.mark.parametrize("option", ["idempotency_key", "concurrency_key"])
@pytest.mark.parametrize("key", ["", 5, b"bytes"])
async def test_bad_keys_are_refused(make_durably: Callable[..., Durably], option: str, key: Any) -> None:
    instance = make_durably().register(**ALL_JOBS)
    with pytest.raises(ValidationError, match=option):
        await instance.jobs.order.trigger({"sku": "A", "quantity": 1}, **{option: key})
    assert await instance.get_runs() == []


# --- trigger_and_wait ------------------------------------------------------------------------


async def test_trigger_and_wait_returns_the_typed_output(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    await instance.init()
    result = await instance.jobs.order.trigger_and_wait({"sku": "A", "quantity": 3}, timeout=5)
    assert isinstance(result, RunResult)
    assert isinstance(result.output, Receipt)
    assert result.output == Receipt(total=30, note="plain")
    assert result.disposition == "created"
    run = await instance.get_run(result.id)
    assert run is not None
    assert run.status == "completed"


async def test_trigger_and_wait_raises_run_failed_error(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    await instance.init()
    with pytest.raises(RunFailedError) as info:
        await instance.jobs.explode.trigger_and_wait({"n": 7}, timeout=5)
    assert info.value.error == "RuntimeError: boom 7"
    run = await instance.get_run(info.value.run_id)
    assert run is not None
    assert run.status == "failed"
    assert run.error == "RuntimeError: boom 7"


async def test_trigger_and_wait_raises_run_cancelled_error(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    outcome: list[BaseException] = []

    async def wait() -> None:
        try:
            await instance.jobs.sleepy.trigger_and_wait({"seconds": 30}, timeout=10)
        except RunCancelledError as exc:
            outcome.append(exc)

    napping = anyio.Event()
    instance.on("step:start", lambda event: napping.set())
    await instance.init()
    async with anyio.create_task_group() as tg:
        tg.start_soon(wait)
        with anyio.fail_after(5):
            await napping.wait()
        [run] = await instance.get_runs(job_name="sleepy")
        assert run.status == "leased"
        await instance.cancel(run.id)
    assert len(outcome) == 1
    assert isinstance(outcome[0], RunCancelledError)
    assert outcome[0].run_id == run.id
    cancelled = await instance.get_run(run.id)
    assert cancelled is not None
    assert cancelled.status == "cancelled"


async def test_trigger_and_wait_times_out_and_the_run_goes_on(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    await instance.init()
    with pytest.raises(TimeoutError):
        await instance.jobs.sleepy.trigger_and_wait({"seconds": 0.4}, timeout=0.05)
    [run] = await instance.get_runs(job_name="sleepy")
    assert run.status in ("pending", "leased")
    done = await instance.wait_for_run(run.id, timeout=5)
    assert done.status == "completed"
    assert done.output == {"slept": 0.4}


async def test_trigger_and_wait_works_when_another_instance_executes(
    make_durably: Callable[..., Durably],
) -> None:
    waiter = make_durably().register(**ALL_JOBS)
    executor = make_durably().register(**ALL_JOBS)
    started_on_executor: list[str] = []
    executor.on("run:start", lambda event: started_on_executor.append(event.run_id))
    await waiter.migrate()  # no worker on this instance
    await executor.init()
    result = await waiter.jobs.order.trigger_and_wait({"sku": "R", "quantity": 5}, timeout=5)
    assert result.output == Receipt(total=50, note="plain")
    assert started_on_executor == [result.id]
    with pytest.raises(RunFailedError) as info:
        await waiter.jobs.explode.trigger_and_wait({"n": 2}, timeout=5)
    assert info.value.error == "RuntimeError: boom 2"


async def test_on_progress_and_on_log_receive_progress_and_log_entries(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(**ALL_JOBS)
    progress: list[Progress] = []
    logs: list[LogEntry] = []
    await instance.init()
    result = await instance.jobs.chatty.trigger_and_wait(
        {}, timeout=5, on_progress=progress.append, on_log=logs.append
    )
    assert result.output == "ok"
    assert all(isinstance(p, Progress) for p in progress)
    assert progress[-1] == Progress(current=2, total=2, message="finished")
    assert Progress(current=1, total=2, message="halfway") in progress
    stored = await instance.get_run(result.id)
    assert stored is not None
    assert stored.progress == Progress(current=2, total=2, message="finished")
    assert all(isinstance(entry, LogEntry) for entry in logs)
    assert [(e.level, e.message, e.data, e.step_name) for e in logs] == [
        ("info", "hello", {"who": "world"}, None),
        ("warn", "careful", {"level": 3}, None),
    ]


async def test_on_progress_and_on_log_work_when_another_instance_executes(
    make_durably: Callable[..., Durably],
) -> None:
    waiter = make_durably().register(**ALL_JOBS)
    executor = make_durably().register(**ALL_JOBS)
    await waiter.migrate()
    await executor.init()
    progress: list[Progress] = []
    logs: list[LogEntry] = []
    result = await waiter.jobs.chatty.trigger_and_wait(
        {}, timeout=5, on_progress=progress.append, on_log=logs.append
    )
    assert result.output == "ok"
    assert progress
    assert all(isinstance(p, Progress) for p in progress)
    assert progress[-1] == Progress(current=2, total=2, message="finished")
    assert [(e.level, e.message, e.data) for e in logs] == [
        ("info", "hello", {"who": "world"}),
        ("warn", "careful", {"level": 3}),
    ]
    assert all(isinstance(entry, LogEntry) for entry in logs)


async def test_an_output_that_does_not_fit_fails_the_run(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(**ALL_JOBS)
    await instance.init()
    with pytest.raises(RunFailedError) as info:
        await instance.jobs.liar.trigger_and_wait({}, timeout=5)
    run = await instance.get_run(info.value.run_id)
    assert run is not None
    assert run.status == "failed"
    assert run.error is not None
    assert run.error.startswith("ValidationError:")
    assert "total" in run.error
    assert info.value.error == run.error
