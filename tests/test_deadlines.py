"""``bounded``: every storage call's wait has a bound, and only its own expiry becomes an error."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest

from durably import StorageError
from durably._deadlines import bounded

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_a_call_past_its_bound_is_a_transient_storage_error() -> None:
    with anyio.fail_after(5), pytest.raises(StorageError) as raised:
        await bounded(anyio.sleep_forever(), 0.05, "claiming runs")
    assert raised.value.transient
    assert str(raised.value) == "claiming runs: the database did not answer within 0.05 s"


async def test_a_call_within_its_bound_returns_its_value_and_leaves_no_cancellation() -> None:
    async def answer() -> int:
        await anyio.lowlevel.checkpoint()
        return 7

    assert await bounded(answer(), 0.05, "x") == 7
    await anyio.sleep(0.1)  # past the bound: its timer was disarmed
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_after_a_timeout_the_task_goes_on_and_scopes_still_work() -> None:
    with pytest.raises(StorageError):
        await bounded(anyio.sleep_forever(), 0.01, "x")
    await anyio.sleep(0.02)  # no cancellation left pending
    with anyio.move_on_after(0.01) as scope:
        await anyio.sleep(5)
    assert scope.cancelled_caught
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0


async def test_a_cancel_scope_around_a_bounded_call_cancels_it_quietly() -> None:
    with anyio.fail_after(5), anyio.move_on_after(0.05) as scope:
        await bounded(anyio.sleep_forever(), 10, "x")
    assert scope.cancelled_caught


async def test_when_both_expire_together_the_scope_s_cancellation_is_not_turned_into_an_error() -> None:
    with anyio.CancelScope() as scope:

        async def cancelled_while_waiting() -> None:
            scope.cancel()
            await anyio.sleep(5)

        await bounded(cancelled_while_waiting(), 0, "x")  # its timer expires in the same pass
    assert scope.cancelled_caught


async def test_a_shielded_call_in_a_cancelled_scope_is_still_bounded() -> None:
    raised: list[StorageError] = []
    with anyio.fail_after(5), anyio.CancelScope() as outer:
        outer.cancel()
        with anyio.CancelScope(shield=True):
            try:
                await bounded(anyio.sleep_forever(), 0.05, "releasing a lease")
            except StorageError as exc:
                raised.append(exc)
    assert [str(exc) for exc in raised] == ["releasing a lease: the database did not answer within 0.05 s"]


async def _outcome(seconds: float) -> tuple[str, float]:
    """What a hung call bounded by ``seconds`` ended with, and after how long."""
    started = anyio.current_time()
    try:
        await bounded(anyio.sleep_forever(), seconds, "x")
    except StorageError:
        return "bounded", anyio.current_time() - started
    return "returned", anyio.current_time() - started


async def test_calls_in_flight_together_each_end_at_their_own_bound() -> None:
    """One timer serves every call of a loop: a later call with a shorter bound moves it
    earlier, and after it fires it is set again for the calls still waiting."""
    ended: dict[float, tuple[str, float]] = {}

    async def call(seconds: float) -> None:
        ended[seconds] = await _outcome(seconds)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(call, 1.0)
            await anyio.sleep(0.01)
            task_group.start_soon(call, 0.05)  # earlier than the timer set for 1 s
            await anyio.sleep(0.01)
            task_group.start_soon(call, 0.2)  # due after the 0.05 s one fired
    assert {seconds: outcome for seconds, (outcome, _) in ended.items()} == {
        1.0: "bounded",
        0.05: "bounded",
        0.2: "bounded",
    }
    for seconds, (_, waited) in ended.items():
        assert seconds <= waited < seconds + 0.5  # not the 1 s call's time


async def test_a_call_made_when_the_timer_is_set_far_later_is_still_bounded() -> None:
    async def long_call() -> None:
        await bounded(anyio.sleep_forever(), 30, "x")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(long_call)
            await anyio.sleep(0.01)
            outcome, waited = await _outcome(0.05)
            task_group.cancel_scope.cancel()
    assert outcome == "bounded" and waited < 0.5


def test_each_event_loop_bounds_its_own_calls() -> None:
    """An instance outlives event loops (serverless): every loop's calls are bounded."""
    for _ in range(3):
        outcome, _ = asyncio.run(_outcome(0.02))
        assert outcome == "bounded"
