"""Keeps a local database's write-ahead log bounded, and says so when it cannot.

In WAL mode SQLite appends every commit to the ``-wal`` file and starts the file
over only once a checkpoint has copied *all* of it back and no one reads it. A
worker that writes all the time never leaves a PASSIVE checkpoint that moment,
so the log grew without bound (192 MB beside a 2.3 MB database after 5,000
runs). The database thread therefore checkpoints PASSIVE as a rule (it never
waits) and TRUNCATE (it waits briefly for writers and readers, then empties the
file) when the log passes ``WAL_BOUND``, when it could take the space that
copying it back needs (a log may grow the database by up to its own size, so a
log that ate the disk could never be checkpointed again), after a write found
the disk full, or after several failed checkpoints in a row. Every outcome is
checked; failures are logged and counted, never left in an unread future.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path
from typing import Literal

import structlog

JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024  # what a reset log is cut back to (PRAGMA journal_size_limit)
WAL_BOUND = 16 * 1024 * 1024  # a longer log is truncated, waiting for the others if need be
FAILURES_BEFORE_TRUNCATE = 3
_TRUNCATE_WAIT_MS = 2_000  # the database thread's other work waits meanwhile

_BLOCKED = "blocked by another connection"

_logger = structlog.get_logger("durably")

Mode = Literal["PASSIVE", "TRUNCATE"]


class Checkpointer:
    """Checkpoint policy and tallies of one database file; ``run`` is called on its thread only."""

    def __init__(self, url: str, wal_path: str, *, busy_timeout_ms: int) -> None:
        self.url = url
        self._wal_path = Path(wal_path)
        self._busy_timeout_ms = busy_timeout_ms
        # Set from any thread; the database thread checkpoints when it sees them.
        self.wanted = False
        self.truncate = False
        # While set, writes queue behind the checkpoint instead of racing it for the lock.
        self.hold_writes = False
        self.failures_in_a_row = 0
        self.failed = 0
        self.skipped = 0
        self._warned = False
        self.succeeded = 0
        self.truncated = 0

    def wal_bytes(self) -> int:
        try:
            return self._wal_path.stat().st_size
        except OSError:
            return 0

    def free_bytes(self) -> int:
        try:
            disk = os.statvfs(self._wal_path.parent)
        except OSError:
            return sys.maxsize
        return disk.f_bavail * disk.f_frsize

    def at_risk(self) -> bool:
        """Whether the log could soon hold the space that checkpointing it needs."""
        return self.wal_bytes() * 2 > self.free_bytes()

    def must_truncate(self) -> bool:
        return self.truncate or self.wal_bytes() > WAL_BOUND

    def run(self, conn: sqlite3.Connection) -> None:
        """One checkpoint, outside any transaction; a failure is reported here, never raised."""
        try:
            self._run(conn)
        except Exception:  # the database thread must go on serving, whatever happened here
            self.failed += 1
            _logger.exception("wal checkpoint crashed", url=self.url)

    def _run(self, conn: sqlite3.Connection) -> None:
        self.wanted = False
        mode = self._mode()
        try:
            error = self._checkpoint(conn, mode)
        finally:
            self.hold_writes = False
        log = _logger.bind(url=self.url, mode=mode)
        if error is None:
            if self._warned:
                log.info("wal checkpoint succeeded again", after_failures=self.failures_in_a_row)
                self._warned = False
            self.succeeded += 1
            self.failures_in_a_row = 0
            if mode == "TRUNCATE":
                self.truncated += 1
                self.truncate = False
            return
        self.failures_in_a_row += 1  # enough of them in a row and the next one truncates
        if mode == "PASSIVE" and error == _BLOCKED:
            # A commit in another connection was rewriting the log's header: routine, not a fault.
            self.skipped += 1
            log.debug("wal checkpoint skipped", reason=error, failures_in_a_row=self.failures_in_a_row)
            return
        self.failed += 1
        self._warned = True
        log.warning(
            "wal checkpoint failed",
            error=error,
            failures_in_a_row=self.failures_in_a_row,
            wal_bytes=self.wal_bytes(),
        )

    def _mode(self) -> Mode:
        if self.must_truncate() or self.failures_in_a_row >= FAILURES_BEFORE_TRUNCATE or self.at_risk():
            return "TRUNCATE"
        return "PASSIVE"

    def _checkpoint(self, conn: sqlite3.Connection, mode: Mode) -> str | None:
        """``None`` if the checkpoint did all it was asked to, else what went wrong."""
        wait_ms = _TRUNCATE_WAIT_MS if mode == "TRUNCATE" else self._busy_timeout_ms
        try:
            conn.execute(f"PRAGMA busy_timeout = {wait_ms}")
            try:
                busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
            finally:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
        except sqlite3.Error as exc:
            return f"{type(exc).__name__}: {exc}"
        if busy:  # another connection held on longer than this checkpoint would wait
            return _BLOCKED if frames < 0 else f"{_BLOCKED} ({copied} of {frames} log frames copied)"
        return None
