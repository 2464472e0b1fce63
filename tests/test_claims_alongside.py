"""A slot freed while the worker's claim is in flight is claimed at once, alongside it.

At 40 ms RTT a pipelined run's body returns moments after it starts; one claim at a time
took runs in cohorts claimed in turn (7, 1, 7, 1 at c=8), 8 runs per two round trips.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from durably import Durably, StepContext, create_durably, define_job
from durably._storage._protocol import Claim

from .support.latency import LatencyProxy
from .support.sqld import SqldServer

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

RTT = 0.3  # a claim is in flight this long: long enough to free a slot meanwhile
GATES: dict[int, anyio.Event] = {}


@define_job(name="gated", input=dict[str, int])
async def gated(step: StepContext, payload: dict[str, int]) -> int:
    await GATES[payload["n"]].wait()
    return payload["n"]  # no step: the slot frees the moment the gate opens


@pytest.fixture
async def front(server: SqldServer) -> AsyncIterator[LatencyProxy]:
    assert server.port is not None
    async with LatencyProxy(server.port, RTT) as proxy:
        yield proxy


class ClaimRecord:
    """One of the worker's claims: slots asked, runs taken, when it started and ended."""

    def __init__(self, asked: int) -> None:
        self.asked = asked
        self.taken: int | None = None
        self.started = anyio.current_time()
        self.ended: float | None = None


def record_claims(durably: Durably) -> list[ClaimRecord]:
    """Every claim of ``durably``'s worker, listed as it starts: a thin recording wrapper."""
    claims: list[ClaimRecord] = []
    claim = durably.storage.claim_runs

    async def recording(**kwargs: Any) -> Claim:
        record = ClaimRecord(kwargs["limit"])
        claims.append(record)
        claimed = await claim(**kwargs)
        record.taken, record.ended = len(claimed.runs), anyio.current_time()
        return claimed

    durably.storage.claim_runs = recording  # type: ignore[method-assign]
    return claims


async def until(check: Callable[[], bool]) -> None:
    with anyio.fail_after(20):
        while not check():  # noqa: ASYNC110 - no event to wait on: the state is the worker's
            await anyio.sleep(0.01)


async def test_a_slot_freed_while_a_claim_is_in_flight_is_claimed_alongside(front: LatencyProxy) -> None:
    GATES.clear()
    GATES.update({n: anyio.Event() for n in range(4)})
    triggering = create_durably(front.url).register(gated=gated)
    worker = create_durably(front.url, polling_interval=60.0, max_concurrent_runs=2).register(gated=gated)
    try:
        await triggering.migrate()
        runs = await triggering.jobs.gated.batch_trigger([{"n": 0}, {"n": 1}])
        claims = record_claims(worker)
        async with worker:
            await until(lambda: sum(claim.taken or 0 for claim in claims) == 2)  # both slots busy
            runs += await triggering.jobs.gated.batch_trigger([{"n": 2}, {"n": 3}])
            claims.clear()
            GATES[0].set()  # a slot frees: the worker claims for it ...
            await until(lambda: bool(claims))
            GATES[1].set()  # ... and another frees while that claim is in flight
            GATES[2].set()
            GATES[3].set()
            for run in runs:
                assert (await worker.wait_for_run(run.id, timeout=20)).status == "completed"
        first, second = [claim for claim in claims if claim.taken]
        assert (first.asked, first.taken, second.asked, second.taken) == (1, 1, 1, 1)
        assert first.ended is not None and first.ended - first.started >= RTT * 0.9
        assert second.started < first.ended, "the second slot waited for the first claim to come back"
    finally:
        await triggering.close()
        await worker.close()
