"""The database: Turso (or any libSQL server) when TURSO_DATABASE_URL is set, else a local file.

    TURSO_DATABASE_URL=libsql://my-db-me.turso.io TURSO_AUTH_TOKEN=... python basic.py

Opening storage does no I/O; the first query connects.
"""

from __future__ import annotations

import os

from durably import open_storage

DATABASE_URL = os.environ.get("TURSO_DATABASE_URL") or "file:local.db"

storage = open_storage(DATABASE_URL, auth_token=os.environ.get("TURSO_AUTH_TOKEN"))
