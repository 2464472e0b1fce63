"""Every SQL statement durably runs, by name. SQLite dialect, shared by all adapters."""

from __future__ import annotations

# The database clock as Unix seconds; julianday() works on every SQLite in use
# (unixepoch('subsec') needs 3.42, newer than Debian's 3.40).
NOW = "((julianday('now') - 2440587.5) * 86400.0)"

RUN_COLUMNS = (
    "id, job_name, status, input, output, error, progress, labels, idempotency_key,"
    " concurrency_key, attempt, created_at, started_at, completed_at,"
    " priority, wake_at, waiting_for, parent_run_id"
)

TERMINAL = "('completed', 'failed', 'cancelled')"

HELD = "id = ? AND status = 'leased' AND lease_generation = ?"
LEASE_IS_HELD = f"EXISTS (SELECT 1 FROM durably_runs WHERE {HELD})"

INSERT_RUN = f"""
INSERT INTO durably_runs
    (id, job_name, status, input, labels, idempotency_key, concurrency_key, created_at,
     priority, wake_at, parent_run_id, trace_context)
VALUES (?1, ?2, 'pending', ?3, ?4, ?5, ?6, {NOW},
        ?7, CASE WHEN ?8 IS NULL THEN ?9 ELSE {NOW} + ?8 END, ?10, ?11)
ON CONFLICT DO NOTHING
RETURNING {RUN_COLUMNS}"""

INSERT_LABELS = """
INSERT INTO durably_labels (key, value, run_seq)
SELECT j.key, j.value, r.seq FROM durably_runs r, json_each(?) j WHERE r.id = ?
ON CONFLICT DO NOTHING"""

SELECT_RUN_BY_ID = f"SELECT {RUN_COLUMNS} FROM durably_runs WHERE id = ?"
SELECT_RUN_BY_IDEMPOTENCY_KEY = (
    f"SELECT {RUN_COLUMNS} FROM durably_runs WHERE job_name = ? AND idempotency_key = ?"
)

# A pending run with a concurrency key is claimable only while no run holds that key and
# no older run with it is claimable: trigger order within a key.
_KEY_IS_FREE = f"""(r.concurrency_key IS NULL OR (
    NOT EXISTS (SELECT 1 FROM durably_runs AS o
                WHERE o.concurrency_key = r.concurrency_key AND o.status = 'leased')
    AND NOT EXISTS (SELECT 1 FROM durably_runs AS o
                    WHERE o.concurrency_key = r.concurrency_key AND o.seq < r.seq
                      AND o.status = 'pending' AND (o.wake_at IS NULL OR o.wake_at <= {NOW}))))"""

# One statement: stale leases first; then, by priority and trigger order, ready runs (the
# durably_runs_ready index, walked in claim order) and due ones (durably_runs_due: delayed
# or waiting runs whose wake_at has come, earliest first). Runs due later are never read.
CLAIM_RUNS = f"""
UPDATE durably_runs SET
    status = 'leased',
    lease_owner = ?1,
    lease_generation = lease_generation + 1,
    lease_expires_at = {NOW} + ?2,
    started_at = COALESCE(started_at, {NOW}),
    wake_at = NULL,
    waiting_for = NULL
WHERE seq IN (
    SELECT seq FROM durably_runs
    WHERE status = 'leased' AND lease_expires_at <= {NOW}
      AND job_name IN (SELECT value FROM json_each(?3))
    UNION ALL
    SELECT seq FROM (
        SELECT seq, priority FROM (
            SELECT seq, priority FROM durably_runs AS r INDEXED BY durably_runs_ready
            WHERE status = 'pending' AND wake_at IS NULL
              AND job_name IN (SELECT value FROM json_each(?3)) AND {_KEY_IS_FREE}
            ORDER BY priority DESC, seq LIMIT ?4)
        UNION ALL
        SELECT seq, priority FROM (
            SELECT seq, priority FROM durably_runs AS r INDEXED BY durably_runs_due
            WHERE wake_at <= {NOW} AND status IN ('pending', 'waiting')
              AND job_name IN (SELECT value FROM json_each(?3)) AND {_KEY_IS_FREE}
            ORDER BY wake_at LIMIT ?4)
        ORDER BY priority DESC, seq LIMIT ?4)
    LIMIT ?4)
RETURNING {RUN_COLUMNS}, lease_generation, trace_context"""

# The completed steps of resumed runs, given as a JSON array of ids. (A subquery in the
# claim's RETURNING would save a statement, but SQLite cannot use an index there.)
COMPLETED_STEPS = """
SELECT run_id, name, idx, output FROM durably_steps
WHERE status = 'completed' AND run_id IN (SELECT value FROM json_each(?))"""

# How many log lines each resumed run has stored, per step (NULL: the job body), read in
# the same request as its steps: the replayed body does not store them again.
LOG_COUNTS = """
SELECT run_id, step_name, COUNT(*) FROM durably_logs
WHERE run_id IN (SELECT value FROM json_each(?)) GROUP BY run_id, step_name"""

RENEW_LEASES = f"""
UPDATE durably_runs SET lease_expires_at = {NOW} + ?1
WHERE id IN (SELECT value FROM json_each(?2)) AND status = 'leased'
  AND id || ':' || lease_generation IN (SELECT value FROM json_each(?3))
RETURNING id"""

RELEASE_LEASE = f"""
UPDATE durably_runs SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL,
    progress = COALESCE(?, progress)
WHERE {HELD} RETURNING 1"""

SAVE_STEP = f"""
INSERT INTO durably_steps (run_id, name, idx, status, output, error, started_at, completed_at, attempts)
SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE {LEASE_IS_HELD}
ON CONFLICT (run_id, name) DO UPDATE SET
    idx = excluded.idx, status = excluded.status, output = excluded.output,
    error = excluded.error, started_at = excluded.started_at,
    completed_at = excluded.completed_at, attempts = excluded.attempts
RETURNING 1"""

SAVE_PROGRESS = f"UPDATE durably_runs SET progress = ? WHERE {HELD} RETURNING 1"

# Log lines travel as one JSON array of [step_name, level, message, data, created_at].
SAVE_LOGS = f"""
INSERT INTO durably_logs (run_id, step_name, level, message, data, created_at)
SELECT ?, j.value ->> '$[0]', j.value ->> '$[1]', j.value ->> '$[2]', j.value -> '$[3]',
       j.value ->> '$[4]'
FROM json_each(?) AS j WHERE {LEASE_IS_HELD}"""

COMPLETE_RUN = f"""
UPDATE durably_runs SET status = 'completed', output = ?, progress = COALESCE(?, progress), error = NULL,
    completed_at = {NOW}, lease_owner = NULL, lease_expires_at = NULL
WHERE {HELD} RETURNING 1"""

FAIL_RUN = f"""
UPDATE durably_runs SET status = 'failed', error = ?, progress = COALESCE(?, progress),
    completed_at = {NOW}, lease_owner = NULL, lease_expires_at = NULL
WHERE {HELD} RETURNING 1"""

# A held run goes back to pending, claimable ?3 seconds from now on the database clock:
# a retry (?1 = 1: the next attempt, the failure kept in ``error`` until it completes) or a
# step backing off (?1 = 0). Only a retry starts the run over (``started_at``).
WAKE_LATER = f"""
UPDATE durably_runs SET status = 'pending', attempt = attempt + ?1, error = COALESCE(?2, error),
    wake_at = {NOW} + ?3, progress = COALESCE(?4, progress), lease_owner = NULL,
    lease_expires_at = NULL, started_at = CASE WHEN ?1 > 0 THEN NULL ELSE started_at END
WHERE id = ?5 AND status = 'leased' AND lease_generation = ?6 RETURNING wake_at"""
# Whether an earlier send of WAKE_LATER under this lease landed (its answer was lost).
WOKEN_LATER = "SELECT wake_at FROM durably_runs WHERE id = ? AND lease_generation = ? AND status = 'pending'"

# Steps backing off between attempts (failed, not ended): a resumed run goes on counting.
STEP_ATTEMPTS = """
SELECT run_id, name, attempts FROM durably_steps
WHERE status = 'failed' AND completed_at IS NULL AND run_id IN (SELECT value FROM json_each(?))"""

CANCEL_RUN = f"""
UPDATE durably_runs SET status = 'cancelled', completed_at = {NOW},
    lease_owner = NULL, lease_expires_at = NULL, wake_at = NULL
WHERE id = ? AND status IN ('pending', 'leased', 'waiting') RETURNING 1"""

RETRY_RUN = """
UPDATE durably_runs SET status = 'pending', attempt = attempt + 1, output = NULL,
    error = NULL, started_at = NULL, completed_at = NULL,
    lease_owner = NULL, lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL
WHERE id = ? AND status IN ('failed', 'cancelled') RETURNING 1"""

DELETE_STEPS = f"""
DELETE FROM durably_steps WHERE run_id = ?1
  AND EXISTS (SELECT 1 FROM durably_runs WHERE id = ?1 AND status IN {TERMINAL})"""
DELETE_LOGS = f"""
DELETE FROM durably_logs WHERE run_id = ?1
  AND EXISTS (SELECT 1 FROM durably_runs WHERE id = ?1 AND status IN {TERMINAL})"""
DELETE_LABELS = f"""
DELETE FROM durably_labels
WHERE run_seq = (SELECT seq FROM durably_runs WHERE id = ? AND status IN {TERMINAL})"""
DELETE_RUN = f"DELETE FROM durably_runs WHERE id = ? AND status IN {TERMINAL} RETURNING {RUN_COLUMNS}"

_PURGE_VICTIMS = f"""
SELECT seq FROM durably_runs
WHERE completed_at < ?1 AND status IN {TERMINAL} ORDER BY completed_at LIMIT ?2"""
PURGE_STEPS = f"""
DELETE FROM durably_steps
WHERE run_id IN (SELECT id FROM durably_runs WHERE seq IN ({_PURGE_VICTIMS}))"""
PURGE_LOGS = f"""
DELETE FROM durably_logs
WHERE run_id IN (SELECT id FROM durably_runs WHERE seq IN ({_PURGE_VICTIMS}))"""
PURGE_LABELS = f"DELETE FROM durably_labels WHERE run_seq IN ({_PURGE_VICTIMS})"
PURGE_RUNS = f"DELETE FROM durably_runs WHERE seq IN ({_PURGE_VICTIMS}) RETURNING 1"

SELECT_STEPS = """
SELECT name, idx, status, output, error, started_at, completed_at
FROM durably_steps WHERE run_id = ? ORDER BY idx, started_at"""

SELECT_LOGS = """
SELECT step_name, level, message, data, created_at
FROM durably_logs WHERE run_id = ? ORDER BY seq"""

# The change feed of dashboards: durably_runs_change makes both an index seek.
RUN_CHANGES = f"""
SELECT {RUN_COLUMNS}, change_seq FROM durably_runs
WHERE change_seq > ? ORDER BY change_seq LIMIT ?"""
LATEST_CHANGE = "SELECT COALESCE(MAX(change_seq), 0) FROM durably_runs"

# Keyset pagination of get_runs: older than the cursor run, or if it was deleted, older
# than the next newer run still there. Takes the cursor id twice.
BEFORE_RUN = """seq < COALESCE(
    (SELECT seq FROM durably_runs WHERE id = ?),
    (SELECT MIN(seq) FROM durably_runs WHERE id > ?),
    (SELECT MAX(seq) + 1 FROM durably_runs))"""

RUN_EXISTS = "SELECT 1 FROM durably_runs WHERE id = ?"

SCHEMA_VERSION = "SELECT COALESCE(MAX(version), 0) FROM durably_schema_versions"
RECORD_VERSION = f"INSERT INTO durably_schema_versions (version, applied_at) VALUES (?, {NOW})"
