"""The seam between durably's SQL and a database connection.

Every adapter speaks SQLite SQL, so all storage logic lives once in
``SqlStorage``; an adapter only supplies a ``Driver`` that runs statements.
Drivers translate their library's exceptions into ``StorageError`` (marking
the transient ones) and retry "database is locked" by themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeAlias

Value: TypeAlias = int | float | str | bytes | None
Row: TypeAlias = tuple[Value, ...]
Statement: TypeAlias = tuple[str, Sequence[Value]]


class Driver(Protocol):
    """Runs SQL on one database. Constructing a driver does no I/O."""

    @property
    def url(self) -> str:
        """The database location for messages, never with credentials."""
        ...

    @property
    def local(self) -> bool:
        """Whether a request costs no network round trip (a local file). A read that is rarely
        needed then goes in a request of its own, instead of riding along in every request."""
        ...

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        """Rows of one read-only statement (a replica may answer it locally)."""
        ...

    async def read_primary(self, statements: Sequence[Statement]) -> list[list[Row]]:
        """Rows of read-only ``statements`` as the primary has them now, in one round trip.

        For reads that must see this process's own latest writes (a replica may lag); no
        transaction, no write lock.
        """
        ...

    async def write(self, statements: Sequence[Statement]) -> list[list[Row]]:
        """Run ``statements`` atomically on the primary; the rows of each.

        Either every statement takes effect or none does. Remote drivers send
        the whole list in one round trip.
        """
        ...

    async def close(self) -> None:
        """Release connections and threads; a later use opens them again."""
        ...
