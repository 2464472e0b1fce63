"""The remote driver: a libSQL server (Turso or self-hosted sqld) over Hrana/HTTP.

The operations of one pass of the event loop share one request, and their writes one
transaction (``HranaClient``). "database is locked" (another writer) means nothing
ran: the client sends those operations again, together, with jittered backoff.
Connection failures become transient ``StorageError``s that the worker backs off
from. Messages name the URL, never the token.
"""

from __future__ import annotations

import asyncio
import math
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import aiohttp

from durably._storage._driver import Row, Statement, Value
from durably._storage._sql import SqlStorage
from durably.adapters._hrana import HranaClient, HranaError, HttpStatusError, ProtocolError
from durably.errors import ConfigurationError, StorageError

T = TypeVar("T")

_SCHEMES = {"libsql": "https", "https": "https", "wss": "https", "http": "http", "ws": "http"}
# Well under the default lease (3 s): a blackholed server is reported before a lease lapses.
DEFAULT_TIMEOUT = 2.0


def http_base(url: str) -> tuple[str, str, str | None]:
    """(HTTP base URL, URL safe to print, token from ``?authToken=``) for a remote URL.

    WebSocket URLs are served over HTTP too: sqld and Turso answer Hrana on both.
    Raises ``ConfigurationError`` for a URL that cannot be used, before any I/O.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a port out of range, an unclosed IPv6 bracket
        raise ConfigurationError(f"invalid remote URL {redact(url)!r}: {exc}") from None
    scheme = _SCHEMES.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise ConfigurationError(
            f"unsupported remote URL {redact(url)!r}; use libsql://, https://, http://, wss:// or ws://HOST"
        )
    query = urllib.parse.parse_qs(parts.query)
    tokens = query.get("authToken") or query.get("auth_token") or []
    token = tokens[0] if tokens else None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host + (f":{port}" if port else "")
    base = urllib.parse.urlunsplit((scheme, netloc, parts.path, "", ""))
    return base, redact(url), token


def redact(url: str) -> str:
    """``url`` without its query string or user info, where tokens may hide."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
    except ValueError:
        return url.split("?", 1)[0].split("@", 1)[-1]
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_token(token: str | None) -> str | None:
    """``token`` if it can go in an HTTP header; ``ConfigurationError`` (not showing it) if not."""
    if token is not None and not all("!" <= char <= "~" for char in token):
        raise ConfigurationError(
            "the auth token holds a space, newline or non-ASCII character, which cannot go"
            " in an HTTP header: check how it was read (a trailing newline from a file?)"
        )
    return token


def check_timeout(timeout: float | None) -> float:
    """``timeout`` in seconds (the default for ``None``); ``ConfigurationError`` unless positive."""
    if timeout is None:
        return DEFAULT_TIMEOUT
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf:
        raise ConfigurationError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


class RemoteDriver:
    """Runs statements on a remote libSQL server; no connection before the first use."""

    def __init__(self, url: str, *, auth_token: str | None = None, timeout: float | None = None) -> None:
        base, self._url, url_token = http_base(url)
        self._timeout = check_timeout(timeout)
        token = check_token(auth_token or url_token)
        self._client = HranaClient(base, auth_token=token, timeout=self._timeout)

    @property
    def local(self) -> bool:
        return False

    @property
    def url(self) -> str:
        return self._url

    async def read(self, sql: str, params: Sequence[Value] = ()) -> list[Row]:
        return await self._call(lambda: self._client.execute(sql, params))

    async def read_primary(self, statements: Sequence[Statement]) -> list[list[Row]]:
        # Issued in one pass of the loop, the reads travel in one HTTP request.
        return list(await asyncio.gather(*(self.read(sql, params) for sql, params in statements)))

    async def write(self, statements: Sequence[Statement]) -> list[list[Row]]:
        return await self._call(lambda: self._client.batch(statements))

    async def close(self) -> None:
        await self._client.close()

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        stale_retried = False
        while True:
            try:
                return await operation()
            except aiohttp.ServerDisconnectedError as exc:
                # A kept-alive connection the server closed (a restart) fails on reuse;
                # try once more on a new one. A re-sent write may have landed the first
                # time: SqlStorage reads such writes as done (SPEC §15). The operations
                # of a failed group all fail in one pass, so they are re-sent as a group
                # again; each is as safe to re-send as when it travelled alone.
                if stale_retried:
                    raise self._translate(exc) from exc
                stale_retried = True
            except (HranaError, TimeoutError, aiohttp.ClientError, HttpStatusError, ProtocolError) as exc:
                raise self._translate(exc) from exc

    def _translate(self, exc: Exception) -> StorageError:
        if isinstance(exc, HranaError):
            return StorageError(f"{self._url}: {exc.code}: {exc}", transient=exc.retryable)
        if isinstance(exc, HttpStatusError):
            if exc.status in (401, 403):
                return StorageError(
                    f"authentication failed for {self._url} (HTTP {exc.status}): check the auth token"
                )
            return StorageError(
                f"server error from {self._url}: {exc}", transient=exc.status >= 500 or exc.status == 429
            )
        if isinstance(exc, ProtocolError):
            return StorageError(f"garbled answer from {self._url}: {exc}", transient=True)
        if isinstance(exc, TimeoutError):
            return StorageError(f"no answer from {self._url} within {self._timeout:g} s", transient=True)
        if isinstance(exc, aiohttp.ClientConnectorError):
            return StorageError(f"cannot reach {self._url}: {exc.os_error}", transient=True)
        return StorageError(f"connection to {self._url} failed: {type(exc).__name__}: {exc}", transient=True)


class RemoteStorage(SqlStorage):
    """Storage on a remote libSQL server (Turso, or self-hosted sqld).

    ``timeout`` bounds each request in seconds (default 2, under the default lease).
    """

    def __init__(self, url: str, *, auth_token: str | None = None, timeout: float | None = None) -> None:
        super().__init__(RemoteDriver(url, auth_token=auth_token, timeout=timeout))
