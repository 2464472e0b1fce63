"""Trigger options shared by ``trigger()`` and child runs: delay, run_at, priority, new run rows."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from durably import _codec, _ids
from durably._models import NewRun
from durably.errors import ValidationError


class Job(Protocol):
    """What a run is created for: a job's name and input type (``JobDefinition``)."""

    @property
    def name(self) -> str: ...

    @property
    def input_type(self) -> Any: ...


_INT64_MAX = 2**63 - 1
_LONGEST = 100 * 366 * 86400.0  # a century: longer is surely a mistake (and overflows datetimes)


def seconds(name: str, value: Any) -> float:
    """A duration (seconds or ``timedelta``) as finite, non-negative seconds."""
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValidationError(f"{name} must be a number of seconds or a timedelta, got {value!r}")
    if not 0 <= value <= _LONGEST:
        raise ValidationError(f"{name} must be between 0 and a century of seconds, got {value!r}")
    return float(value)


def epoch(name: str, value: Any) -> float:
    """An aware ``datetime`` as Unix seconds; a naive one is refused (whose time zone?)."""
    if not isinstance(value, datetime):
        raise ValidationError(f"{name} must be a timezone-aware datetime, got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValidationError(f"{name} must be a timezone-aware datetime, got naive {value!r}")
    return value.timestamp()


def check_priority(priority: Any) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > _INT64_MAX:
        raise ValidationError(f"priority must be an int (64-bit), got {priority!r}")
    return priority


def when(delay: Any, run_at: Any) -> tuple[float | None, float | None]:
    """``(delay seconds, run_at epoch)``; at most one of them is given."""
    if delay is not None and run_at is not None:
        raise ValidationError("delay and run_at cannot both be given: choose one")
    return (
        None if delay is None else seconds("delay", delay),
        None if run_at is None else epoch("run_at", run_at),
    )


def check_text(name: str, value: Any, *, empty: bool = True) -> str:
    """A string argument that SQLite can store: valid Unicode (no lone surrogates)."""
    if not isinstance(value, str) or (not empty and not value):
        kind = "a string" if empty else "a non-empty string"
        raise ValidationError(f"{name} must be {kind}, got {value!r}")
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValidationError(f"{name} is not valid Unicode (a lone surrogate): {value!r}") from None
    return value


def check_labels(labels: Any) -> dict[str, str]:
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise ValidationError(f"labels must be a dict of str to str, got {labels!r}")
    for key, value in labels.items():
        check_text("labels: a key", key)
        check_text(f"labels[{key!r}]", value)
    return labels


def check_key(name: str, key: Any) -> str | None:
    return None if key is None else check_text(name, key, empty=False)


def new_runs(
    definition: Job,
    payloads: Sequence[Any],
    *,
    idempotency_keys: Sequence[str | None],
    concurrency_key: str | None = None,
    labels: dict[str, str] | None = None,
    delay: Any = None,
    run_at: Any = None,
    priority: Any = 0,
    parent_run_id: str | None = None,
) -> list[NewRun]:
    """The rows ``trigger`` writes, every option and payload checked first."""
    checked_labels = check_labels(labels)
    delay_s, run_at_s = when(delay, run_at)
    return [
        NewRun(
            id=_ids.new_run_id(),
            job_name=definition.name,
            input=_codec.canonical(payload, definition.input_type, what=f"input of job {definition.name!r}"),
            labels=checked_labels,
            idempotency_key=check_key("idempotency_key", key),
            concurrency_key=check_key("concurrency_key", concurrency_key),
            priority=check_priority(priority),
            delay=delay_s,
            run_at=run_at_s,
            parent_run_id=parent_run_id,
        )
        for payload, key in zip(payloads, idempotency_keys, strict=True)
    ]
