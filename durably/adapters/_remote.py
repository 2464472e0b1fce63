"""The remote driver: a libSQL server (Turso or self-hosted sqld) over Hrana/HTTP.

One request per operation: a read is one pipeline, an atomic write is one batch.
"database is locked" (another writer) means the statement did not run, so it is
retried here with jittered backoff; connection failures become transient
``StorageError``s that the worker backs off from. Messages name the URL, never
the token.
"""

from __future__ import annotations

import asyncio
import random
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import aiohttp

from durably._storage._driver import Row, Statement, Value
from durably._storage._sql import SqlStorage
from durably.adapters._hrana import HranaClient, HranaError, HttpStatusError
from durably.errors import ConfigurationError, StorageError

T = TypeVar("T")

_SCHEMES = {"libsql": "https", "https": "https", "wss": "https", "http": "http", "ws": "http"}
_BUSY_RETRIES = 12
_TIMEOUT = 10.0


def http_base(url: str) -> tuple[str, str, str | None]:
    """(HTTP base URL, URL safe to print, token from ``?authToken=``) for a remote URL.

    WebSocket URLs are served over HTTP too: sqld and Turso answer Hrana on both.
    """
    parts = urllib.parse.urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise ConfigurationError(
            f"unsupported remote URL {redact(url)!r}; use libsql://, https://, http://, wss:// or ws://HOST"
        )
    query = urllib.parse.parse_qs(parts.query)
    tokens = query.get("authToken") or query.get("auth_token") or []
    token = tokens[0] if tokens else None
    netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
    base = urllib.parse.urlunsplit((scheme, netloc, parts.path, "", ""))
    return base, redact(url), token


def redact(url: str) -> str:
    """``url`` without its query string or user info, where tokens may hide."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class RemoteDriver:
    """Runs statements on a remote libSQL server; no connection before the first use."""

    def __init__(self, url: str, *, auth_token: str | None = None, timeout: float = _TIMEOUT) -> None:
        base, self._url, url_token = http_base(url)
        self._client = HranaClient(base, auth_token=auth_token or url_token, timeout=timeout)

    @property
    def url(self) -> str:
        return self._url

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        return await self._call(lambda: self._client.execute(sql, params))

    async def write(self, statements: Sequence[Statement]) -> list[list[Row]]:
        return await self._call(lambda: self._client.batch(statements))

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        delay = 0.005
        stale_retried = False
        for attempt in range(_BUSY_RETRIES + 1):
            try:
                return await operation()
            except HranaError as exc:
                if not exc.busy or attempt == _BUSY_RETRIES:
                    raise self._translate(exc) from exc
            except aiohttp.ServerDisconnectedError as exc:
                # A kept-alive connection the server closed (a restart) fails on reuse;
                # try once more on a new one. Durably's writes are idempotent or fenced.
                if stale_retried:
                    raise self._translate(exc) from exc
                stale_retried = True
                continue
            except (TimeoutError, aiohttp.ClientError, HttpStatusError) as exc:
                raise self._translate(exc) from exc
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")

    def _translate(self, exc: Exception) -> StorageError:
        if isinstance(exc, HranaError):
            return StorageError(f"{self._url}: {exc.code}: {exc}", transient=exc.busy)
        if isinstance(exc, HttpStatusError):
            if exc.status in (401, 403):
                return StorageError(
                    f"authentication failed for {self._url} (HTTP {exc.status}): check the auth token"
                )
            return StorageError(
                f"server error from {self._url}: {exc}", transient=exc.status >= 500 or exc.status == 429
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            return StorageError(f"cannot reach {self._url}: {exc.os_error}", transient=True)
        if isinstance(exc, asyncio.TimeoutError):
            return StorageError(f"no answer from {self._url} within {_TIMEOUT} s", transient=True)
        return StorageError(f"connection to {self._url} failed: {type(exc).__name__}: {exc}", transient=True)


class RemoteStorage(SqlStorage):
    """Storage on a remote libSQL server (Turso, or self-hosted sqld)."""

    def __init__(self, url: str, *, auth_token: str | None = None) -> None:
        super().__init__(RemoteDriver(url, auth_token=auth_token))
