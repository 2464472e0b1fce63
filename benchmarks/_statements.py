"""The SQL alone of W3 runs: durably's own statements replayed in a bare ``sqlite3`` connection.

python -m benchmarks._statements [-n 2000]

Separates what the database costs from what Python around it costs: the statements a
trigger and a drained 3-step run send on a local file (insert; claim; three steps;
completion with ``WAKE_PARENT`` in one transaction), autocommit, WAL, ``synchronous=NORMAL``,
timed in process CPU microseconds (us) per run. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sqlite3
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from durably._storage import _queries as q
from durably._storage._driver import Row, Statement
from durably._storage._schema import MIGRATIONS


def _write(conn: sqlite3.Connection, statements: Sequence[Statement]) -> list[list[Row]]:
    """As the local driver writes: one statement alone, several in one transaction."""
    if len(statements) > 1:
        conn.execute("BEGIN IMMEDIATE")
    rows = [conn.execute(sql, params).fetchall() for sql, params in statements]
    if len(statements) > 1:
        conn.execute("COMMIT")
    return rows


def _run_once(conn: sqlite3.Connection, jobs: str, timings: dict[str, float]) -> None:
    """Claim one run, store its three steps, complete it, adding CPU seconds per phase."""
    started = time.process_time()
    owner = f"w/{secrets.token_hex(6)}"
    [rows] = _write(conn, [(q.CLAIM_RUNS, (owner, 30.0, jobs, 1))])
    run_id, generation = rows[0][0], rows[0][len(q.RUN_COLUMNS.split(","))]
    claimed = time.process_time()
    for k in range(3):
        step = (run_id, f"s{k}", k, "completed", '{"i":1}', None, 1.0, 2.0, 1, run_id, generation)
        _write(conn, [(q.SAVE_STEP, step)])
    stepped = time.process_time()
    _write(conn, [(q.COMPLETE_RUN, ('{"ok":true}', None, run_id, generation)), (q.WAKE_PARENT, (run_id,))])
    timings["claim"] += claimed - started
    timings["3 steps"] += stepped - claimed
    timings["completion"] += time.process_time() - stepped


def measure(path: Path, n: int) -> dict[str, float]:
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=256)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        for migration in MIGRATIONS:
            for sql in migration:
                conn.execute(sql)
        started = time.process_time()
        for i in range(n):
            run = (secrets.token_hex(13), "w3", f'{{"i":{i}}}', "{}", None, None, 0, None, None, None, None)
            _write(conn, [(q.INSERT_RUN, run)])
        timings = {"insert": time.process_time() - started, "claim": 0.0, "3 steps": 0.0, "completion": 0.0}
        jobs = json.dumps(["w3"])
        for _ in range(n):
            _run_once(conn, jobs, timings)
    finally:
        conn.close()
    figures = {f"{phase} us": seconds / n * 1e6 for phase, seconds in timings.items()}
    figures["one run's SQL us"] = sum(figures[f"{phase} us"] for phase in ("claim", "3 steps", "completion"))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        figures = measure(Path(root) / "statements.db", args.n)
    sys.stdout.write(json.dumps({key: round(value, 1) for key, value in figures.items()}) + "\n")


if __name__ == "__main__":
    main()
