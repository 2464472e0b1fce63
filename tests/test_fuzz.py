"""Property-based fuzzing of every public entry point (SPEC §11).

Whatever it is given, an entry point succeeds or raises a ``DurablyError`` subclass,
writes nothing when it refuses (row counts unchanged), and never hangs. On a local
file, with a bounded number of examples; ``-s`` prints how many cases were tried.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from durably import (
    ConfigurationError,
    DurablyError,
    StepContext,
    create_durably,
    define_job,
    open_storage,
)

EXAMPLES = 200
_settings = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
TABLES = ("durably_runs", "durably_steps", "durably_logs", "durably_labels")


class Point(msgspec.Struct):
    x: int
    label: str = ""


@define_job(name="free", input=dict[str, Any])
async def free(step: StepContext, payload: dict[str, Any]) -> Any:
    return payload


@define_job(name="typed", input=Point)
async def typed(step: StepContext, payload: Point) -> Point:
    return payload


# --- strategies ----------------------------------------------------------------------

_any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates too
_numbers = st.one_of(
    st.integers(),  # beyond 64 bits as well
    st.floats(),  # NaN and infinities too
    st.sampled_from([2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**70, 0, -1]),
)
_leaves = st.one_of(
    st.none(),
    st.booleans(),
    _numbers,
    _any_text,
    st.binary(max_size=4),
    st.datetimes(),
    st.frozensets(st.integers(), max_size=2),
)
_values = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.tuples(children),
        st.sets(st.integers(), max_size=2),
        st.dictionaries(st.one_of(_any_text, st.integers()), children, max_size=3),
    ),
    max_leaves=8,
)
_garbage = st.one_of(_values, st.just(object()), st.lists(_any_text, max_size=2), st.just(math.nan))
_keys = st.one_of(st.none(), _any_text, st.integers(), st.binary(max_size=3))
_labels = st.one_of(
    st.none(),
    st.dictionaries(_any_text, _any_text, max_size=3),
    st.dictionaries(st.one_of(_any_text, st.integers()), _garbage, max_size=2),
    _garbage,
)
_run_ids = st.one_of(_any_text, st.integers(), st.none(), st.binary(max_size=4), st.just("seeded"))
_durations = st.one_of(
    st.none(),
    st.floats(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.just(True),
    st.just("1"),
    st.timedeltas(),
)


def _deep(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"k": value}
    return value


# --- harness ---------------------------------------------------------------------------


class Harness:
    """One durably instance on a local file, driven from sync hypothesis tests on one loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runner = asyncio.Runner()
        self.durably = create_durably(f"file:{path}", polling_interval=0.01).register(free=free, typed=typed)
        self.outcomes: Counter[str] = Counter()
        self.call(self.durably.migrate())
        self.seeded = self.call(self.durably.jobs.free.trigger({"seed": True})).id
        done = self.call(self.durably.jobs.free.trigger({"seed": "done"}))
        self.call(self.durably.process_until_idle(max_runs=2))
        self.done = done.id

    def call(self, awaitable: Awaitable[Any]) -> Any:
        # No hang: every call is bounded (a TimeoutError here fails the test).
        async def bounded() -> Any:
            return await asyncio.wait_for(awaitable, 10)

        return self.runner.run(bounded())

    def counts(self) -> dict[str, int]:
        conn = sqlite3.connect(self.path)
        try:
            return {table: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0] for table in TABLES}
        finally:
            conn.close()

    def refused_or_done(self, what: str, action: Callable[[], Any], *, writes: bool = False) -> Any:
        """Run ``action`` (a sync call, or one returning an awaitable); check how it ended."""
        before = self.counts()
        try:
            result = action()
            if asyncio.iscoroutine(result):
                result = self.call(result)
        except DurablyError:
            self.outcomes[f"{what}: refused cleanly"] += 1
            assert self.counts() == before, f"{what} was refused but wrote something"
            return None
        except TimeoutError:
            # wait_for_run's own timeout: a clean outcome, never our 10 s bound on a hang.
            self.outcomes[f"{what}: timed out as asked"] += 1
            return None
        self.outcomes[f"{what}: succeeded"] += 1
        if not writes:
            assert self.counts() == before, f"{what} wrote something"
        return result

    def close(self) -> None:
        self.call(self.durably.close())
        self.runner.close()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    instance = Harness(tmp_path_factory.mktemp("fuzz") / "fuzz.db")
    try:
        yield instance
    finally:
        instance.close()
        print()
        for outcome, count in sorted(instance.outcomes.items()):
            print(f"fuzz {outcome}: {count}")
        print(f"fuzz total cases: {sum(instance.outcomes.values())}")


def _id(harness: Harness, run_id: Any) -> Any:
    return harness.seeded if run_id == "seeded" else run_id


# --- properties ------------------------------------------------------------------------


_payloads = st.one_of(st.dictionaries(st.one_of(_any_text, st.integers()), _values, max_size=4), _garbage)


@_settings
@given(payload=_payloads, key=_keys, concurrency=_keys, labels=_labels)
def test_trigger_stores_the_payload_unchanged_or_refuses_cleanly(
    harness: Harness, payload: Any, key: Any, concurrency: Any, labels: Any
) -> None:
    handle = harness.durably.jobs.free
    # Each argument fuzzed on its own (the others valid), then all together.
    for options in (
        {"idempotency_key": key},
        {"concurrency_key": concurrency},
        {"labels": labels},
        {"idempotency_key": key, "concurrency_key": concurrency, "labels": labels},
    ):
        harness.refused_or_done(
            "trigger(options)", lambda o=options: handle.trigger({"n": 1}, **o), writes=True
        )
    run = harness.refused_or_done("trigger(payload)", lambda: handle.trigger(payload), writes=True)
    if run is not None:
        assert isinstance(payload, dict)
        assert run.input == _plain(payload), "the payload came back changed"
        stored = harness.call(harness.durably.get_run(run.id))
        assert stored.input == run.input


def _plain(value: Any) -> Any:
    """What a faithful round trip gives: tuples as lists, and nothing else changed."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@_settings
@given(
    payloads=st.one_of(st.lists(st.one_of(_values, st.builds(dict)), max_size=3), _garbage), labels=_labels
)
def test_batch_trigger_writes_all_or_nothing(harness: Harness, payloads: Any, labels: Any) -> None:
    before = harness.counts()["durably_runs"]
    runs = harness.refused_or_done(
        "batch_trigger", lambda: harness.durably.jobs.free.batch_trigger(payloads, labels=labels), writes=True
    )
    after = harness.counts()["durably_runs"]
    assert after - before == (0 if runs is None else len(runs))


@_settings
@given(
    payload=st.one_of(_values, st.fixed_dictionaries({"x": _numbers, "label": _any_text})), timeout=_durations
)
def test_typed_trigger_and_trigger_and_wait_options(harness: Harness, payload: Any, timeout: Any) -> None:
    harness.refused_or_done("typed trigger", lambda: harness.durably.jobs.typed.trigger(payload), writes=True)
    # Garbage options: refused before anything is written.
    harness.refused_or_done(
        "trigger_and_wait(bad timeout)",
        lambda: harness.durably.jobs.free.trigger_and_wait({"ok": 1}, timeout=_bad_timeout(timeout)),
    )


def _bad_timeout(timeout: Any) -> Any:
    valid = isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0
    return -1 if valid or timeout is None else timeout


def test_a_payload_nested_5000_deep_is_refused(harness: Harness) -> None:
    for handle in (harness.durably.jobs.free, harness.durably.jobs.typed):
        assert harness.refused_or_done("deep payload", lambda h=handle: h.trigger({"x": _deep(5000)})) is None


@_settings
@given(
    run_id=_run_ids,
    timeout=st.one_of(st.none(), st.floats(max_value=0.05), st.just("soon"), st.just(0)),
)
def test_run_id_methods_refuse_cleanly(harness: Harness, run_id: Any, timeout: Any) -> None:
    d = harness.durably
    run_id = _id(harness, run_id)
    harness.refused_or_done("get_run", lambda: d.get_run(run_id))
    harness.refused_or_done("get_steps", lambda: d.get_steps(run_id))
    harness.refused_or_done("get_logs", lambda: d.get_logs(run_id))
    harness.refused_or_done("wait_for_run", lambda: d.wait_for_run(run_id, timeout=timeout or 0.01))
    if run_id != harness.seeded:  # these change the seeded run; elsewhere they must refuse
        for name in ("retry", "cancel", "delete_run"):
            harness.refused_or_done(name, lambda n=name: getattr(d, n)(run_id))
        harness.refused_or_done("retrigger", lambda: d.retrigger(run_id), writes=True)


@_settings
@given(
    status=st.one_of(_keys, st.lists(_keys, max_size=2), st.just("completed")),
    job_name=st.one_of(_keys, st.lists(_keys, max_size=2)),
    labels=_labels,
    limit=st.one_of(st.integers(), st.sampled_from([2**63 - 1, 2**63, 2**70]), _garbage),
    offset=st.one_of(st.integers(), st.sampled_from([2**63, 2**70]), _garbage),
)
def test_get_runs_refuses_bad_filters_cleanly(
    harness: Harness, status: Any, job_name: Any, labels: Any, limit: Any, offset: Any
) -> None:
    # Each filter fuzzed on its own (the others valid), then all together.
    for filters in (
        {"status": status},
        {"job_name": job_name},
        {"labels": labels},
        {"limit": limit},
        {"offset": offset},
        {"status": status, "job_name": job_name, "labels": labels, "limit": limit, "offset": offset},
    ):
        harness.refused_or_done("get_runs", lambda f=filters: harness.durably.get_runs(**f))


@_settings
@given(
    older_than=st.one_of(
        st.timedeltas(),
        st.datetimes(timezones=st.just(UTC)),
        st.datetimes(),
        st.sampled_from([timedelta.max, timedelta.min, datetime.max.replace(tzinfo=UTC)]),
        _garbage,
    ),
    limit=st.one_of(st.integers(), st.just(2**64), _garbage),
)
def test_purge_runs_refuses_bad_arguments_cleanly(harness: Harness, older_than: Any, limit: Any) -> None:
    # A cutoff that reaches the past only: purging the seeded runs would change the counts.
    if isinstance(older_than, timedelta) and older_than < timedelta(days=1):
        older_than = timedelta(days=3650)
    if isinstance(older_than, datetime) and older_than.tzinfo is not None and older_than.year > 2000:
        older_than = datetime(2000, 1, 1, tzinfo=UTC)
    deleted = harness.refused_or_done("purge_runs", lambda: harness.durably.purge_runs(older_than, limit))
    assert deleted in (None, 0)


_options = st.one_of(_durations, st.integers(min_value=-3, max_value=2**70), _garbage)


@_settings
@given(
    polling=_options,
    heartbeat=_options,
    stale=_options,
    concurrency=_options,
    storage=st.one_of(_garbage, _any_text),
)
def test_create_durably_and_open_storage_refuse_bad_options(
    harness: Harness, polling: Any, heartbeat: Any, stale: Any, concurrency: Any, storage: Any
) -> None:
    url = f"file:{harness.path}"
    made = harness.refused_or_done(
        "create_durably",
        lambda: create_durably(
            url,
            polling_interval=polling,
            heartbeat_interval=heartbeat,
            stale_threshold=stale,
            max_concurrent_runs=concurrency,
        ),
    )
    if made is not None:
        harness.call(made.close())
    opened = harness.refused_or_done("open_storage", lambda: open_storage(storage))
    if opened is not None:
        harness.call(opened.close())


@_settings
@given(
    name=st.one_of(_any_text, _garbage),
    input_type=st.one_of(st.sampled_from([int, dict, Point, Any]), _garbage),
)
def test_define_job_register_and_on_refuse_bad_arguments(
    harness: Harness, name: Any, input_type: Any
) -> None:
    async def body(step: StepContext, payload: Any) -> Any:
        return None

    definition = harness.refused_or_done(
        "define_job", lambda: define_job(name=name, input=input_type, run=body)
    )
    scratch = create_durably(f"file:{harness.path}")
    try:
        harness.refused_or_done("register", lambda: scratch.register(job=name))
        if definition is not None:
            harness.refused_or_done("register", lambda: scratch.register(job=definition))
            harness.refused_or_done(
                "trigger (fuzzed type)", lambda: scratch.jobs.job.trigger({"x": 1}), writes=True
            )
        harness.refused_or_done("on", lambda: scratch.on(name, print))
        harness.refused_or_done("on", lambda: scratch.on("run:complete", name))
    finally:
        harness.call(scratch.close())


@_settings
@given(
    cron=st.one_of(st.sampled_from(["* * * * *", "0 3 * * *", "@daily", "61 * * * *"]), _any_text, _garbage),
    payload=st.one_of(st.just({"valid": True}), _values),
    name=st.one_of(st.none(), st.just("nightly"), _any_text, _garbage),
    timezone=st.one_of(st.sampled_from(["UTC", "Europe/Paris", "Nowhere/Else"]), _any_text, _garbage),
)
def test_schedule_refuses_bad_arguments(
    harness: Harness, cron: Any, payload: Any, name: Any, timezone: Any
) -> None:
    scratch = create_durably(f"file:{harness.path}").register(free=free)
    try:
        harness.refused_or_done(
            "schedule",
            lambda: scratch.schedule(cron, scratch.jobs.free, payload, name=name, timezone=timezone),
        )
    finally:
        harness.call(scratch.close())


def test_the_harness_notices_a_raw_exception(harness: Harness) -> None:
    """The fuzz tests can fail: a raw exception escapes ``refused_or_done``."""

    async def raw() -> None:
        raise OverflowError("raw")

    with pytest.raises(OverflowError):
        harness.refused_or_done("self-check", raw)
    with pytest.raises(AssertionError, match="wrote something"):
        harness.refused_or_done("self-check", lambda: harness.durably.jobs.free.trigger({"n": 1}))
    assert ConfigurationError is not None
