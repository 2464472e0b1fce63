-- table durably_labels
CREATE TABLE durably_labels (
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            run_seq INTEGER NOT NULL,
            PRIMARY KEY (key, value, run_seq)
        ) WITHOUT ROWID;

-- index durably_labels_run
CREATE INDEX durably_labels_run ON durably_labels (run_seq);

-- table durably_logs
CREATE TABLE durably_logs (
            seq INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL,
            step_name TEXT,
            level TEXT NOT NULL,
            message TEXT NOT NULL,
            data TEXT NOT NULL,
            created_at REAL NOT NULL
        );

-- trigger durably_logs_inserted
CREATE TRIGGER durably_logs_inserted AFTER INSERT ON durably_logs BEGIN
            UPDATE durably_runs SET change_seq = (SELECT MAX(change_seq) FROM durably_runs) + 1
            WHERE id = NEW.run_id;
        END;

-- index durably_logs_run
CREATE INDEX durably_logs_run ON durably_logs (run_id, seq);

-- table durably_runs
CREATE TABLE durably_runs (
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
        , change_seq INTEGER NOT NULL DEFAULT 0, priority INTEGER NOT NULL DEFAULT 0, wake_at REAL, waiting_for TEXT, parent_run_id TEXT, trace_context TEXT);

-- index durably_runs_change
CREATE INDEX durably_runs_change ON durably_runs (change_seq);

-- index durably_runs_completed
CREATE INDEX durably_runs_completed
            ON durably_runs (completed_at) WHERE completed_at IS NOT NULL;

-- index durably_runs_concurrency
CREATE INDEX durably_runs_concurrency
            ON durably_runs (concurrency_key, status, seq) WHERE concurrency_key IS NOT NULL;

-- index durably_runs_due
CREATE INDEX durably_runs_due ON durably_runs (wake_at)
            WHERE wake_at IS NOT NULL;

-- index durably_runs_idempotency
CREATE UNIQUE INDEX durably_runs_idempotency
            ON durably_runs (job_name, idempotency_key) WHERE idempotency_key IS NOT NULL;

-- index durably_runs_job
CREATE INDEX durably_runs_job ON durably_runs (job_name, seq);

-- index durably_runs_parent
CREATE INDEX durably_runs_parent ON durably_runs (parent_run_id)
            WHERE parent_run_id IS NOT NULL;

-- index durably_runs_ready
CREATE INDEX durably_runs_ready ON durably_runs (priority DESC, seq)
            WHERE status = 'pending' AND wake_at IS NULL;

-- index durably_runs_status
CREATE INDEX durably_runs_status ON durably_runs (status, seq);

-- table durably_schedules
CREATE TABLE durably_schedules (
            name TEXT PRIMARY KEY,
            first_registered_at REAL NOT NULL
        ) WITHOUT ROWID;

-- table durably_schema_versions
CREATE TABLE durably_schema_versions (
    version INTEGER PRIMARY KEY,
    applied_at REAL NOT NULL
);

-- table durably_signals
CREATE TABLE durably_signals (
            seq INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL,
            name TEXT NOT NULL,
            payload TEXT NOT NULL,
            created_at REAL NOT NULL,
            consumed_by TEXT
        );

-- index durably_signals_unconsumed
CREATE INDEX durably_signals_unconsumed ON durably_signals (run_id, name, seq)
            WHERE consumed_by IS NULL;

-- table durably_steps
CREATE TABLE durably_steps (
            run_id TEXT NOT NULL,
            name TEXT NOT NULL,
            idx INTEGER NOT NULL,
            status TEXT NOT NULL,
            output TEXT,
            error TEXT,
            started_at REAL,
            completed_at REAL, attempts INTEGER NOT NULL DEFAULT 1,
            PRIMARY KEY (run_id, name)
        ) WITHOUT ROWID;

-- trigger durably_steps_inserted
CREATE TRIGGER durably_steps_inserted AFTER INSERT ON durably_steps BEGIN
            UPDATE durably_runs SET change_seq = (SELECT MAX(change_seq) FROM durably_runs) + 1
            WHERE id = NEW.run_id;
        END;

-- trigger durably_steps_updated
CREATE TRIGGER durably_steps_updated AFTER UPDATE ON durably_steps BEGIN
            UPDATE durably_runs SET change_seq = (SELECT MAX(change_seq) FROM durably_runs) + 1
            WHERE id = NEW.run_id;
        END;

-- table durably_writes
CREATE TABLE durably_writes (
            token TEXT PRIMARY KEY,
            answer TEXT,
            created_at REAL NOT NULL
        ) WITHOUT ROWID;

-- index durably_writes_created
CREATE INDEX durably_writes_created ON durably_writes (created_at);
