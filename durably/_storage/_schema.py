"""Versioned, append-only migrations. Never edit a released migration: add one."""

from __future__ import annotations

from collections.abc import Sequence

MIGRATIONS: Sequence[Sequence[str]] = (
    # 1: runs, steps, logs, labels.
    (
        """CREATE TABLE IF NOT EXISTS durably_runs (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            job_name TEXT NOT NULL,
            status TEXT NOT NULL,
            input TEXT NOT NULL,
            output TEXT,
            error TEXT,
            progress TEXT,
            labels TEXT NOT NULL DEFAULT '{}',
            idempotency_key TEXT,
            concurrency_key TEXT,
            attempt INTEGER NOT NULL DEFAULT 1,
            lease_owner TEXT,
            lease_generation INTEGER NOT NULL DEFAULT 0,
            lease_expires_at REAL,
            created_at REAL NOT NULL,
            started_at REAL,
            completed_at REAL
        )""",
        "CREATE INDEX IF NOT EXISTS durably_runs_status ON durably_runs (status, seq)",
        "CREATE INDEX IF NOT EXISTS durably_runs_job ON durably_runs (job_name, seq)",
        """CREATE UNIQUE INDEX IF NOT EXISTS durably_runs_idempotency
            ON durably_runs (job_name, idempotency_key) WHERE idempotency_key IS NOT NULL""",
        """CREATE INDEX IF NOT EXISTS durably_runs_concurrency
            ON durably_runs (concurrency_key, status, seq) WHERE concurrency_key IS NOT NULL""",
        """CREATE INDEX IF NOT EXISTS durably_runs_completed
            ON durably_runs (completed_at) WHERE completed_at IS NOT NULL""",
        """CREATE TABLE IF NOT EXISTS durably_steps (
            run_id TEXT NOT NULL,
            name TEXT NOT NULL,
            idx INTEGER NOT NULL,
            status TEXT NOT NULL,
            output TEXT,
            error TEXT,
            started_at REAL,
            completed_at REAL,
            PRIMARY KEY (run_id, name)
        ) WITHOUT ROWID""",
        """CREATE TABLE IF NOT EXISTS durably_logs (
            seq INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL,
            step_name TEXT,
            level TEXT NOT NULL,
            message TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX IF NOT EXISTS durably_logs_run ON durably_logs (run_id, seq)",
        """CREATE TABLE IF NOT EXISTS durably_labels (
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            run_seq INTEGER NOT NULL,
            PRIMARY KEY (key, value, run_seq)
        ) WITHOUT ROWID""",
        "CREATE INDEX IF NOT EXISTS durably_labels_run ON durably_labels (run_seq)",
    ),
    # 2: change_seq, a database-wide counter bumped on every visible change of a run (its
    # row, a step, a log line), so a dashboard finds what changed with one indexed read.
    # Triggers keep it current without touching the statements that make the changes;
    # writers are serialised, so MAX + 1 never repeats and never goes back.
    (
        "ALTER TABLE durably_runs ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0",
        "UPDATE durably_runs SET change_seq = seq",
        "CREATE INDEX IF NOT EXISTS durably_runs_change ON durably_runs (change_seq)",
        *(
            f"""CREATE TRIGGER IF NOT EXISTS durably_{name} AFTER {event} BEGIN
            UPDATE durably_runs SET change_seq = (SELECT MAX(change_seq) FROM durably_runs) + 1
            WHERE {target};
        END"""
            for name, event, target in (
                ("runs_inserted", "INSERT ON durably_runs", "seq = NEW.seq"),
                (
                    "runs_updated",
                    "UPDATE OF status, progress, attempt, output, error ON durably_runs",
                    "seq = NEW.seq",
                ),
                ("steps_inserted", "INSERT ON durably_steps", "id = NEW.run_id"),
                ("steps_updated", "UPDATE ON durably_steps", "id = NEW.run_id"),
                ("logs_inserted", "INSERT ON durably_logs", "id = NEW.run_id"),
            )
        ),
    ),
)

LATEST_VERSION = len(MIGRATIONS)

CREATE_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS durably_schema_versions (
    version INTEGER PRIMARY KEY,
    applied_at REAL NOT NULL
)"""
