"""``bounded``: every storage call's wait has a bound, and only its own expiry becomes an error."""

from __future__ import annotations

import asyncio

import anyio
import anyio.lowlevel
import pytest

from durably import StorageError
from durably._fencing import bounded

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
