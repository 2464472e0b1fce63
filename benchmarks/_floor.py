"""The floor: the same writes as one 3-step run, done directly with stdlib sqlite3.

WAL, synchronous=NORMAL, autocommit: 1 insert (trigger) + 1 claim
(UPDATE … WHERE id = (SELECT … LIMIT 1) RETURNING *) + 3 step inserts + 1 completion.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path


def floor(path: Path, n: int = 5000) -> dict[str, float]:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY, status TEXT, input TEXT, output TEXT)")
    conn.execute("CREATE INDEX runs_status ON runs (status, id)")
    conn.execute("CREATE TABLE steps (run_id INTEGER, name TEXT, output TEXT, PRIMARY KEY (run_id, name))")
    started = time.perf_counter()
    for i in range(n):
        conn.execute("INSERT INTO runs (status, input) VALUES ('pending', ?)", (f'{{"i": {i}}}',))
    inserted = time.perf_counter()
    claim = (
        "UPDATE runs SET status = 'leased' WHERE id ="
        " (SELECT id FROM runs WHERE status = 'pending' ORDER BY id LIMIT 1) RETURNING *"
    )
    for _ in range(n):
        run_id = conn.execute(claim).fetchone()[0]
        for k in range(3):
            conn.execute("INSERT INTO steps VALUES (?, ?, ?)", (run_id, f"s{k}", f'{{"i": {k}}}'))
        conn.execute("UPDATE runs SET status = 'completed', output = '{\"ok\":true}' WHERE id = ?", (run_id,))
    finished = time.perf_counter()
    conn.close()
    return {
        "jobs_per_s": n / (finished - started),
        "jobs_per_s_without_trigger": n / (finished - inserted),
        "inserts_per_s": n / (inserted - started),
    }
