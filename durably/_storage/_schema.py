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
    # 3: durable time. A run may be delayed or wait (status 'waiting') until ``wake_at`` on
    # the database clock, or until a signal or its children arrive; it may have a priority,
    # a parent run and the trace context of the trigger that created it. Ready runs (no
    # wake time) and due runs are found through two partial indexes, so runs waiting for
    # later cost a claim nothing. Signals are kept until a wait consumes them; a schedule's
    # first registration is remembered so it never fires a tick from before it.
    (
        "ALTER TABLE durably_runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE durably_runs ADD COLUMN wake_at REAL",
        "ALTER TABLE durably_runs ADD COLUMN waiting_for TEXT",
        "ALTER TABLE durably_runs ADD COLUMN parent_run_id TEXT",
        "ALTER TABLE durably_runs ADD COLUMN trace_context TEXT",
        "ALTER TABLE durably_steps ADD COLUMN attempts INTEGER NOT NULL DEFAULT 1",
        """CREATE INDEX IF NOT EXISTS durably_runs_ready ON durably_runs (priority DESC, seq)
            WHERE status = 'pending' AND wake_at IS NULL""",
        """CREATE INDEX IF NOT EXISTS durably_runs_due ON durably_runs (wake_at)
            WHERE wake_at IS NOT NULL""",
        """CREATE INDEX IF NOT EXISTS durably_runs_parent ON durably_runs (parent_run_id)
            WHERE parent_run_id IS NOT NULL""",
        """CREATE TABLE IF NOT EXISTS durably_signals (
            seq INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL,
            name TEXT NOT NULL,
            payload TEXT NOT NULL,
            created_at REAL NOT NULL,
            consumed_by TEXT
        )""",
        """CREATE INDEX IF NOT EXISTS durably_signals_unconsumed ON durably_signals (run_id, name, seq)
            WHERE consumed_by IS NULL""",
        """CREATE TABLE IF NOT EXISTS durably_schedules (
            name TEXT PRIMARY KEY,
            first_registered_at REAL NOT NULL
        ) WITHOUT ROWID""",
    ),
    # 4: a run's own changes set change_seq in the statement that makes them (the claim, a
    # completion …: _queries.NEXT_CHANGE), instead of a trigger that wrote the row a second
    # time: about a third of a trigger() and a fifth of a claim on a local file.
    (
        "DROP TRIGGER IF EXISTS durably_runs_inserted",
        "DROP TRIGGER IF EXISTS durably_runs_updated",
    ),
    # 5: run-API writes (retry, cancel, delete, signal, purge) record a token of their own in
    # the write that makes their change, with what a caller cannot read back afterwards (the
    # deleted run, the purged count). A request re-sent after its answer was lost finds its
    # token: it changes nothing twice and answers as the first send did (SPEC §15). Tokens
    # live ten minutes (a re-send follows within one request timeout); each write prunes them.
    (
        """CREATE TABLE IF NOT EXISTS durably_writes (
            token TEXT PRIMARY KEY,
            answer TEXT,
            created_at REAL NOT NULL
        ) WITHOUT ROWID""",
        "CREATE INDEX IF NOT EXISTS durably_writes_created ON durably_writes (created_at)",
    ),
)

LATEST_VERSION = len(MIGRATIONS)

CREATE_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS durably_schema_versions (
    version INTEGER PRIMARY KEY,
    applied_at REAL NOT NULL
)"""
