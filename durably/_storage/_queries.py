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

# The change feed's next value (schema v2, v4): every statement that makes a visible change
# to a run row (its status, progress, attempt, output or error) sets change_seq to it, in the
# write it makes anyway. Writers are serialised, so it never repeats across statements and
# never goes back; the rows one statement changes share it (get_run_changes reads ties whole).
NEXT_CHANGE = "(SELECT COALESCE(MAX(change_seq), 0) + 1 FROM durably_runs)"

INSERT_LABELS = """
INSERT INTO durably_labels (key, value, run_seq)
SELECT j.key, j.value, r.seq FROM durably_runs r, json_each(?) j WHERE r.id = ?
ON CONFLICT DO NOTHING"""

SELECT_RUN_BY_ID = f"SELECT {RUN_COLUMNS} FROM durably_runs WHERE id = ?"
# What a trigger reads back of a run: its columns, then the lease that tells whether the
# run is leased to the trigger's offer (generation, trace context as the claim returns, owner).
CREATED_COLUMNS = f"{RUN_COLUMNS}, lease_generation, trace_context, lease_owner"
SELECT_CREATED = f"SELECT {CREATED_COLUMNS} FROM durably_runs WHERE id = ?"
SELECT_RUN_BY_IDEMPOTENCY_KEY = (
    f"SELECT {CREATED_COLUMNS} FROM durably_runs WHERE job_name = ? AND idempotency_key = ?"
)

# A pending run with a concurrency key is claimable only while no run holds that key and
# no older run with it is claimable: trigger order within a key.
_KEY_IS_FREE = f"""(r.concurrency_key IS NULL OR (
    NOT EXISTS (SELECT 1 FROM durably_runs AS o
                WHERE o.concurrency_key = r.concurrency_key AND o.status = 'leased')
    AND NOT EXISTS (SELECT 1 FROM durably_runs AS o
                    WHERE o.concurrency_key = r.concurrency_key AND o.seq < r.seq
                      AND o.status = 'pending' AND (o.wake_at IS NULL OR o.wake_at <= {NOW}))))"""

# A new run (r: ?6 its concurrency key, ?7 its priority, ?8/?9 its delay or run_at) is
# created leased to a serving worker's offer (?12 a one-off lease owner, ?14 the worker's
# jobs, ?15 its free slots) only when that worker's claim would take it first now: not
# delayed, no stale lease to reclaim, no claimable ready or due run of those jobs at its
# priority or above (through the claim's indexes), its key free, and a slot left.
_LEASED_AT_ONCE = f"""CASE WHEN ?8 IS NOT NULL OR ?9 IS NOT NULL THEN 0
    WHEN (SELECT COUNT(*) FROM durably_runs WHERE status = 'leased' AND lease_owner = ?12) >= ?15 THEN 0
    WHEN EXISTS (SELECT 1 FROM durably_runs WHERE status = 'leased' AND lease_expires_at <= {NOW}
                   AND job_name IN (SELECT value FROM json_each(?14))) THEN 0
    WHEN EXISTS (SELECT 1 FROM durably_runs AS r INDEXED BY durably_runs_ready
                 WHERE status = 'pending' AND wake_at IS NULL AND priority >= ?7
                   AND job_name IN (SELECT value FROM json_each(?14)) AND {_KEY_IS_FREE}) THEN 0
    WHEN EXISTS (SELECT 1 FROM durably_runs AS r INDEXED BY durably_runs_due
                 WHERE wake_at <= {NOW} AND status IN ('pending', 'waiting') AND priority >= ?7
                   AND job_name IN (SELECT value FROM json_each(?14)) AND {_KEY_IS_FREE}) THEN 0
    ELSE {_KEY_IS_FREE} END"""


def _insert_run(decided: str) -> str:
    """The INSERT of a new run; ``decided`` gives one row, ``leased`` (0 or 1): whether it is
    created leased, claimed by this very write (?12 owner, ?13 lease seconds): generation 1,
    started now."""
    return f"""{decided}
INSERT INTO durably_runs
    (id, job_name, status, input, labels, idempotency_key, concurrency_key, created_at,
     priority, wake_at, parent_run_id, trace_context,
     lease_owner, lease_generation, lease_expires_at, started_at, change_seq)
SELECT ?1, ?2, CASE WHEN leased THEN 'leased' ELSE 'pending' END, ?3, ?4, ?5, ?6, {NOW},
       ?7, CASE WHEN ?8 IS NULL THEN ?9 ELSE {NOW} + ?8 END, ?10, ?11,
       CASE WHEN leased THEN ?12 END, leased, CASE WHEN leased THEN {NOW} + ?13 END,
       CASE WHEN leased THEN {NOW} END, {NEXT_CHANGE}
FROM decided
WHERE true
ON CONFLICT DO NOTHING
RETURNING {CREATED_COLUMNS}"""


# A trigger without an offer (or a child run) is pending: no decision to make.
INSERT_RUN = _insert_run("WITH decided(leased) AS (SELECT 0)")
# MATERIALIZED: the decision is made once, not once per column that uses it.
INSERT_OFFERED_RUN = _insert_run(
    f"""WITH decided(leased) AS MATERIALIZED (
    SELECT {_LEASED_AT_ONCE} FROM (SELECT ?6 AS concurrency_key, 9223372036854775807 AS seq) AS r)"""
)

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
    waiting_for = NULL,
    change_seq = {NEXT_CHANGE}
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

# The resumed runs (claimed before) of one claim, named by its one-off lease owner (?1):
# found among the few leased runs (durably_runs_status), read only after a claim that has one.
_RESUMED_BY = """SELECT id FROM durably_runs
    WHERE status = 'leased' AND lease_owner = ?1 AND lease_generation > 1"""

# The completed steps of the claim's resumed runs. (A subquery in the claim's RETURNING
# would save a statement, but SQLite cannot use an index there.)
COMPLETED_STEPS = f"""
SELECT run_id, name, idx, output FROM durably_steps
WHERE status = 'completed' AND run_id IN ({_RESUMED_BY})"""

# How many log lines each resumed run has stored, per step (NULL: the job body), read in
# the same request as its steps: the replayed body does not store them again.
LOG_COUNTS = f"""
SELECT run_id, step_name, COUNT(*) FROM durably_logs
WHERE run_id IN ({_RESUMED_BY}) GROUP BY run_id, step_name"""

RENEW_LEASES = f"""
UPDATE durably_runs SET lease_expires_at = {NOW} + ?1
WHERE id IN (SELECT value FROM json_each(?2)) AND status = 'leased'
  AND id || ':' || lease_generation IN (SELECT value FROM json_each(?3))
RETURNING id"""

RELEASE_LEASE = f"""
UPDATE durably_runs SET status = 'pending', lease_owner = NULL, lease_expires_at = NULL,
    progress = COALESCE(?, progress), change_seq = {NEXT_CHANGE}
WHERE {HELD} RETURNING 1"""

SAVE_STEP = f"""
INSERT INTO durably_steps (run_id, name, idx, status, output, error, started_at, completed_at, attempts)
SELECT ?, ?, ?, ?, ?, ?, ?, ?, ? WHERE {LEASE_IS_HELD}
ON CONFLICT (run_id, name) DO UPDATE SET
    idx = excluded.idx, status = excluded.status, output = excluded.output,
    error = excluded.error, started_at = excluded.started_at,
    completed_at = excluded.completed_at, attempts = excluded.attempts
RETURNING 1"""

SAVE_PROGRESS = f"UPDATE durably_runs SET progress = ?, change_seq = {NEXT_CHANGE} WHERE {HELD} RETURNING 1"

# Log lines travel as one JSON array of [step_name, level, message, data, created_at].
SAVE_LOGS = f"""
INSERT INTO durably_logs (run_id, step_name, level, message, data, created_at)
SELECT ?, j.value ->> '$[0]', j.value ->> '$[1]', j.value ->> '$[2]', j.value -> '$[3]',
       j.value ->> '$[4]'
FROM json_each(?) AS j WHERE {LEASE_IS_HELD}"""

COMPLETE_RUN = f"""
UPDATE durably_runs SET status = 'completed', output = ?, progress = COALESCE(?, progress), error = NULL,
    completed_at = {NOW}, lease_owner = NULL, lease_expires_at = NULL, change_seq = {NEXT_CHANGE}
WHERE {HELD} RETURNING 1"""

FAIL_RUN = f"""
UPDATE durably_runs SET status = 'failed', error = ?, progress = COALESCE(?, progress),
    completed_at = {NOW}, lease_owner = NULL, lease_expires_at = NULL, change_seq = {NEXT_CHANGE}
WHERE {HELD} RETURNING 1"""

# A held run goes back to pending, claimable ?3 seconds from now on the database clock:
# a retry (?1 = 1: the next attempt, the failure kept in ``error`` until it completes) or a
# step backing off (?1 = 0). Only a retry starts the run over (``started_at``).
WAKE_LATER = f"""
UPDATE durably_runs SET status = 'pending', attempt = attempt + ?1, error = COALESCE(?2, error),
    wake_at = {NOW} + ?3, progress = COALESCE(?4, progress), lease_owner = NULL,
    lease_expires_at = NULL, started_at = CASE WHEN ?1 > 0 THEN NULL ELSE started_at END,
    change_seq = {NEXT_CHANGE}
WHERE id = ?5 AND status = 'leased' AND lease_generation = ?6 RETURNING wake_at"""
# Whether an earlier send of WAKE_LATER under this lease landed (its answer was lost).
WOKEN_LATER = "SELECT wake_at FROM durably_runs WHERE id = ? AND lease_generation = ? AND status = 'pending'"

# Steps backing off between attempts (failed, not ended): a resumed run goes on counting.
STEP_ATTEMPTS = f"""
SELECT run_id, name, attempts FROM durably_steps
WHERE status = 'failed' AND completed_at IS NULL AND run_id IN ({_RESUMED_BY})"""

# Run-API writes (schema v5) carry a token of their own: ``NOT_WRITTEN`` (with the token as
# ?2 or ?4) keeps a re-send of a request that had landed from changing anything twice, and the
# RECORD_* statement after the change stores the token, so WRITTEN tells both sends what the
# first one did (SPEC §15). changes() is the row count of the statement just before.
_NOT_WRITTEN = "NOT EXISTS (SELECT 1 FROM durably_writes WHERE token = ?{})"
RECORD_CHANGE = f"""
INSERT INTO durably_writes (token, answer, created_at) SELECT ?, NULL, {NOW} WHERE changes() > 0"""
RECORD_COUNT = f"""
INSERT INTO durably_writes (token, answer, created_at) VALUES (?, changes(), {NOW})
ON CONFLICT (token) DO NOTHING"""
WRITTEN = "SELECT answer FROM durably_writes WHERE token = ?"
PRUNE_WRITES = f"DELETE FROM durably_writes WHERE created_at < {NOW} - ?"

CANCEL_RUN = f"""
UPDATE durably_runs SET status = 'cancelled', completed_at = {NOW},
    lease_owner = NULL, lease_expires_at = NULL, wake_at = NULL, change_seq = {NEXT_CHANGE}
WHERE id = ?1 AND status IN ('pending', 'leased', 'waiting') AND {_NOT_WRITTEN.format(2)}"""

RETRY_RUN = f"""
UPDATE durably_runs SET status = 'pending', attempt = attempt + 1, output = NULL,
    error = NULL, started_at = NULL, completed_at = NULL,
    lease_owner = NULL, lease_expires_at = NULL, wake_at = NULL, waiting_for = NULL,
    change_seq = {NEXT_CHANGE}
WHERE id = ?1 AND status IN ('failed', 'cancelled') AND {_NOT_WRITTEN.format(2)}"""

DELETE_STEPS = f"""
DELETE FROM durably_steps WHERE run_id = ?1
  AND EXISTS (SELECT 1 FROM durably_runs WHERE id = ?1 AND status IN {TERMINAL})"""
DELETE_LOGS = f"""
DELETE FROM durably_logs WHERE run_id = ?1
  AND EXISTS (SELECT 1 FROM durably_runs WHERE id = ?1 AND status IN {TERMINAL})"""
DELETE_SIGNALS = f"""
DELETE FROM durably_signals WHERE run_id = ?1 AND consumed_by IS NULL
  AND EXISTS (SELECT 1 FROM durably_runs WHERE id = ?1 AND status IN {TERMINAL})"""
DELETE_LABELS = f"""
DELETE FROM durably_labels
WHERE run_seq = (SELECT seq FROM durably_runs WHERE id = ? AND status IN {TERMINAL})"""
DELETE_RUN = f"DELETE FROM durably_runs WHERE id = ? AND status IN {TERMINAL} RETURNING {RUN_COLUMNS}"
# Before DELETE_RUN: the run it is about to delete, for a re-send to answer with.
RECORD_DELETED = f"""
INSERT INTO durably_writes (token, answer, created_at)
SELECT ?2, json_array({RUN_COLUMNS}), {NOW} FROM durably_runs WHERE id = ?1 AND status IN {TERMINAL}"""

_PURGE_VICTIMS = f"""
SELECT seq FROM durably_runs
WHERE completed_at < ?1 AND status IN {TERMINAL} AND {_NOT_WRITTEN.format(3)}
ORDER BY completed_at LIMIT ?2"""
PURGE_STEPS = f"""
DELETE FROM durably_steps
WHERE run_id IN (SELECT id FROM durably_runs WHERE seq IN ({_PURGE_VICTIMS}))"""
PURGE_LOGS = f"""
DELETE FROM durably_logs
WHERE run_id IN (SELECT id FROM durably_runs WHERE seq IN ({_PURGE_VICTIMS}))"""
PURGE_SIGNALS = f"""
DELETE FROM durably_signals WHERE consumed_by IS NULL
  AND run_id IN (SELECT id FROM durably_runs WHERE seq IN ({_PURGE_VICTIMS}))"""
PURGE_LABELS = f"DELETE FROM durably_labels WHERE run_seq IN ({_PURGE_VICTIMS})"
PURGE_RUNS = f"DELETE FROM durably_runs WHERE seq IN ({_PURGE_VICTIMS}) RETURNING 1"

SELECT_STEPS = """
SELECT name, idx, status, output, error, started_at, completed_at
FROM durably_steps WHERE run_id = ? ORDER BY idx, started_at"""

SELECT_LOGS = """
SELECT step_name, level, message, data, created_at
FROM durably_logs WHERE run_id = ? ORDER BY seq"""

# The change feed of dashboards: durably_runs_change makes both an index seek. The ?2-th
# change bounds a page, and every run that shares it comes too (the rows one statement
# changed share their change_seq): a page never ends inside one change.
RUN_CHANGES = f"""
SELECT {RUN_COLUMNS}, change_seq FROM durably_runs
WHERE change_seq > ?1 AND change_seq <= COALESCE(
    (SELECT change_seq FROM durably_runs WHERE change_seq > ?1 ORDER BY change_seq LIMIT 1 OFFSET ?2 - 1),
    change_seq)
ORDER BY change_seq, seq"""
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

# --- waits (SPEC §12) -------------------------------------------------------------------
# A wait is one atomic write of the statements below, in this order, all fenced by the
# lease. ?1 run id, ?2 lease generation throughout.

_HELD_12 = "id = ?1 AND status = 'leased' AND lease_generation = ?2"
_IS_HELD_12 = f"EXISTS (SELECT 1 FROM durably_runs WHERE {_HELD_12})"
_RESOLVED = "EXISTS (SELECT 1 FROM durably_steps WHERE run_id = ?1 AND name = ?3)"
_DEADLINE = "(SELECT CAST(output AS REAL) FROM durably_steps WHERE run_id = ?1 AND name = ?3)"

# The deadline of a wait (?3 its step, ?4 index, ?5 seconds from now or ?6 an epoch
# time), stored once as a step: epoch seconds on the database clock.
WAIT_TIMER = f"""
INSERT INTO durably_steps (run_id, name, idx, status, output, started_at, completed_at)
SELECT ?1, ?3, ?4, 'completed', CAST(COALESCE(?6, {NOW} + ?5) AS TEXT), {NOW}, {NOW}
WHERE {_IS_HELD_12}
ON CONFLICT (run_id, name) DO NOTHING"""

# The oldest signal of that name (?4) becomes this wait's result (?3 the step, ?5 its
# index), unless the step is resolved already; then the signal, named by the stored
# result, is deleted: consumed once, and the table keeps only signals not yet consumed.
CONSUME_SIGNAL = f"""
INSERT INTO durably_steps (run_id, name, idx, status, output, started_at, completed_at)
SELECT ?1, ?3, ?5, 'completed', json_object('signal', json(payload), 'seq', seq), {NOW}, {NOW}
FROM durably_signals
WHERE run_id = ?1 AND name = ?4 AND consumed_by IS NULL AND {_IS_HELD_12}
ORDER BY seq LIMIT 1
ON CONFLICT (run_id, name) DO NOTHING"""
DROP_SIGNAL = """
DELETE FROM durably_signals
WHERE seq = (SELECT output ->> '$.seq' FROM durably_steps WHERE run_id = ?1 AND name = ?2)"""

# Children, found by their idempotency keys (?4: a JSON array; ?5 their job): once all
# have ended, their outcomes as [id, status, output, error] in trigger order.
_CHILDREN = "job_name = ?5 AND idempotency_key IN (SELECT value FROM json_each(?4))"
STORE_CHILDREN = f"""
INSERT INTO durably_steps (run_id, name, idx, status, output, started_at, completed_at)
SELECT ?1, ?3, ?6, 'completed',
       (SELECT json_group_array(json_array(id, status, json(output), error))
        FROM (SELECT id, status, output, error FROM durably_runs WHERE {_CHILDREN} ORDER BY seq)),
       {NOW}, {NOW}
WHERE {_IS_HELD_12}
  AND NOT EXISTS (SELECT 1 FROM durably_runs WHERE {_CHILDREN} AND status NOT IN {TERMINAL})
ON CONFLICT (run_id, name) DO NOTHING"""

# A signal or children not come by the deadline (?4 the timer step): a timeout.
STORE_TIMEOUT = f"""
INSERT INTO durably_steps (run_id, name, idx, status, output, started_at, completed_at)
SELECT ?1, ?3, ?5, 'completed', '{{"timeout":true}}', {NOW}, {NOW}
WHERE {_IS_HELD_12}
  AND (SELECT CAST(output AS REAL) FROM durably_steps WHERE run_id = ?1 AND name = ?4) <= {NOW}
ON CONFLICT (run_id, name) DO NOTHING"""

# The run waits unless resolved (?3 the step; for a sleep, the timer step: resolved once
# passed), ?4 waiting_for, ?5 the timer step or NULL, ?6 progress, ?7 whether a sleep;
# for children (?8 their keys, ?9 their job) waiting_for names them: runs:ID,ID…
SUSPEND_RUN = f"""
UPDATE durably_runs SET status = 'waiting', lease_owner = NULL,
    waiting_for = CASE WHEN ?8 IS NULL THEN ?4 ELSE 'runs:' || (
        SELECT group_concat(id, ',') FROM (SELECT c.id FROM durably_runs AS c
        WHERE c.job_name = ?9 AND c.idempotency_key IN (SELECT value FROM json_each(?8))
        ORDER BY c.seq)) END,
    lease_expires_at = NULL, progress = COALESCE(?6, progress),
    wake_at = (SELECT CAST(output AS REAL) FROM durably_steps WHERE run_id = ?1 AND name = ?5),
    change_seq = {NEXT_CHANGE}
WHERE {_HELD_12}
  AND CASE WHEN ?7 THEN {_DEADLINE} > {NOW} ELSE NOT {_RESOLVED} END
RETURNING wake_at"""

STILL_HELD = f"SELECT 1 FROM durably_runs WHERE {_HELD_12}"
WAIT_RESOLUTION = "SELECT output FROM durably_steps WHERE run_id = ?1 AND name = ?2"

# A signal for a run not yet ended is kept; a run waiting for it becomes due at once.
INSERT_SIGNAL = f"""
INSERT INTO durably_signals (run_id, name, payload, created_at)
SELECT ?1, ?2, ?3, {NOW} WHERE EXISTS (
    SELECT 1 FROM durably_runs WHERE id = ?1 AND status NOT IN {TERMINAL}) AND {_NOT_WRITTEN.format(4)}"""
# Only for a signal still there to consume: a re-send does not wake a later wait of that name.
WAKE_FOR_SIGNAL = f"""
UPDATE durably_runs SET wake_at = {NOW}
WHERE id = ?1 AND status = 'waiting' AND waiting_for = 'signal:' || ?2
  AND EXISTS (SELECT 1 FROM durably_signals WHERE run_id = ?1 AND name = ?2 AND consumed_by IS NULL)"""

# The last child to end wakes its waiting parent, in the write that ends the child.
WAKE_PARENT = f"""
UPDATE durably_runs SET wake_at = {NOW}
WHERE id = (SELECT parent_run_id FROM durably_runs WHERE id = ?1) AND status = 'waiting'
  AND NOT EXISTS (SELECT 1 FROM durably_runs AS c
                  WHERE c.parent_run_id = durably_runs.id AND c.status NOT IN {TERMINAL})"""

# Cancelling a run cancels its unfinished descendants.
CANCEL_DESCENDANTS = f"""
WITH RECURSIVE tree(id) AS (
    SELECT id FROM durably_runs WHERE parent_run_id = ?1
    UNION SELECT r.id FROM durably_runs AS r JOIN tree ON r.parent_run_id = tree.id)
UPDATE durably_runs SET status = 'cancelled', completed_at = {NOW},
    lease_owner = NULL, lease_expires_at = NULL, wake_at = NULL, change_seq = {NEXT_CHANGE}
WHERE id IN (SELECT id FROM tree) AND status IN ('pending', 'leased', 'waiting')"""

# When the first run of the given jobs becomes claimable (NULL: none ever, by time).
NEXT_WAKE_AT = f"""
SELECT CASE WHEN EXISTS (
    SELECT 1 FROM durably_runs INDEXED BY durably_runs_ready
    WHERE status = 'pending' AND wake_at IS NULL AND job_name IN (SELECT value FROM json_each(?1)))
THEN {NOW} ELSE NULLIF(MIN(
    COALESCE((SELECT MIN(wake_at) FROM durably_runs INDEXED BY durably_runs_due
              WHERE wake_at IS NOT NULL AND status IN ('pending', 'waiting')
                AND job_name IN (SELECT value FROM json_each(?1))), 1e18),
    COALESCE((SELECT MIN(lease_expires_at) FROM durably_runs
              WHERE status = 'leased' AND job_name IN (SELECT value FROM json_each(?1))), 1e18)), 1e18)
END"""

# Seconds from now (database clock) until the next run of the given jobs (?1) becomes due
# by time, if within ?2 seconds: read with an idle claim, so the worker's wait never runs
# past it, whichever host made the run wait. Only wake times after now: a due run the claim
# left (its key is held) is not worth waking for. The index walk reads only runs due within
# the window (of any job): runs parked for later, or overdue runs of jobs no worker serves,
# cost an idle claim nothing.
NEXT_DUE = f"""
SELECT wake_at - {NOW} FROM durably_runs INDEXED BY durably_runs_due
WHERE wake_at > {NOW} AND wake_at <= {NOW} + ?2 AND status IN ('pending', 'waiting')
  AND job_name IN (SELECT value FROM json_each(?1))
ORDER BY wake_at LIMIT 1"""

# A schedule's first registration on this database: written once, read by every host.
REGISTER_SCHEDULES = f"""
INSERT INTO durably_schedules (name, first_registered_at)
SELECT value, {NOW} FROM json_each(?1) WHERE true
ON CONFLICT (name) DO NOTHING"""
SCHEDULES_REGISTERED = """
SELECT name, first_registered_at FROM durably_schedules
WHERE name IN (SELECT value FROM json_each(?1))"""

# A run parked under a given lease generation, with its wake time.
PARKED_AS = "SELECT wake_at FROM durably_runs WHERE id = ? AND lease_generation = ? AND status = 'waiting'"
