"""One summary line per fault test (shown with ``-s``) and a JSON report of them all.

The report goes to ``$FAULTS_REPORT`` if set, else ``faults-report.json`` under pytest's
base temporary directory (``--basetemp``), so the figures can be quoted after a CI run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..support.sqld import SqldServer
from ..test_many_hosts import Target

Report = Callable[..., None]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The fault tests load both cores with hosts, servers and proxies on purpose: the test
    process's own loop is then descheduled for long stretches, which says nothing about
    durably. Loop blocking is checked by the rest of the suite."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.allow_blocking)


@pytest.fixture(scope="session")
def _fault_records(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[dict[str, Any]]]:
    records: list[dict[str, Any]] = []
    yield records
    path = Path(os.environ.get("FAULTS_REPORT") or tmp_path_factory.getbasetemp() / "faults-report.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=2, sort_keys=True) + "\n")
    print(f"\n[faults] {len(records)} fault test summaries written to {path}")


@pytest.fixture
def fault_report(request: pytest.FixtureRequest, _fault_records: list[dict[str, Any]]) -> Report:
    """Record one test's figures: what was injected, what survived; print them on one line."""

    def report(**figures: Any) -> None:
        record = {"test": request.node.nodeid, **figures}
        _fault_records.append(record)
        shown = " ".join(f"{key}={value}" for key, value in figures.items())
        print(f"\n[faults] {request.node.name}: {shown}")

    return report


@pytest.fixture(params=["local", "remote"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    """A fresh database: a SQLite file, or a sqld server of its own."""
    if request.param == "local":
        yield Target("local", f"file:{tmp_path / 'jobs.db'}", None)
        return
    with SqldServer(tmp_path / "sqld") as server:
        yield Target("remote", server.http_url, server)


@pytest.fixture
def sqld(tmp_path: Path) -> Iterator[SqldServer]:
    with SqldServer(tmp_path / "sqld") as server:
        yield server
