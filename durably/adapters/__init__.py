"""Storage adapters and ``open_storage``, which picks one from a URL.

Drivers are imported lazily: the local file needs only the standard library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from durably._storage._protocol import Storage
from durably.adapters._local import LocalFileStorage, check_path, check_synchronous
from durably.errors import ConfigurationError

if TYPE_CHECKING:
    from durably.adapters._remote import RemoteStorage
    from durably.adapters._replica import EmbeddedReplicaStorage

__all__ = ["EmbeddedReplicaStorage", "LocalFileStorage", "RemoteStorage", "open_storage"]

_REMOTE_SCHEMES = ("libsql://", "https://", "http://", "wss://", "ws://")
_ACCEPTED = (
    "'file:PATH', a plain file path or ':memory:' (local file);"
    " 'libsql://', 'https://', 'http://', 'wss://' or 'ws://' (remote libSQL server);"
    " 'file:PATH' with sync_url= (embedded replica)"
)


def _local_path(url: str) -> str | None:
    """The file path ``url`` names, ``None`` if it is no local form at all.

    A plain path is taken literally. A ``file:`` URL is a URL: ``file:///abs`` and
    ``file://localhost/abs`` name ``/abs``; a query string or fragment (SQLite's
    ``?mode=ro`` and the like) would otherwise become part of the file name, so it
    is refused rather than silently creating another file.
    """
    if url == ":memory:":
        return url
    if url.startswith("file:"):
        path = url.removeprefix("file:")
        if path.startswith("//"):
            host, slash, rest = path.removeprefix("//").partition("/")
            if host not in ("", "localhost"):
                raise ConfigurationError(f"{url!r} names a file on host {host!r}; only local files work")
            path = slash + rest
        if "?" in path or "#" in path:
            raise ConfigurationError(
                f"{url!r}: file: URLs take no query string or fragment (SQLite URI parameters such"
                " as '?mode=ro' are not supported); give the plain path of the database file"
            )
        return check_path(path) if path else None
    if "://" in url or not url.strip():
        return None
    return check_path(url)


def open_storage(
    url: str,
    *,
    auth_token: str | None = None,
    sync_url: str | None = None,
    sync_interval: float | None = None,
    timeout: float | None = None,
    synchronous: str | None = None,
) -> Storage:
    """The storage adapter for ``url``; no connection is opened until first use.

    ``timeout`` bounds each network request in seconds (remote and replica; default 2).
    ``synchronous`` is the local file's durability, ``"normal"`` (default) or ``"full"``
    (survives a power loss; see docs/guarantees.md); it is refused for other adapters.
    Raises ``ConfigurationError`` naming the accepted forms when ``url`` fits none, and
    for a URL, token or timeout that cannot work, before any I/O.
    """
    if not isinstance(url, str):
        raise ConfigurationError(
            f"storage URL must be a string, got {type(url).__name__}; accepted: {_ACCEPTED}"
        )
    if sync_interval is not None and sync_interval <= 0:
        raise ConfigurationError(f"sync_interval must be a positive number of seconds, got {sync_interval!r}")
    if synchronous is not None and (url.startswith(_REMOTE_SCHEMES) or sync_url is not None):
        raise ConfigurationError(
            "synchronous= applies to a local file only; a server's durability is its own setting"
        )
    if url.startswith(_REMOTE_SCHEMES):
        if sync_url is not None:
            raise ConfigurationError(
                f"sync_url= goes with a local 'file:PATH' URL, not {url.split('://', maxsplit=1)[0]}://"
            )
        from durably.adapters._remote import RemoteStorage

        return RemoteStorage(url, auth_token=auth_token, timeout=timeout)
    path = _local_path(url)
    if path is None:
        raise ConfigurationError(f"unsupported storage URL {url!r}; accepted: {_ACCEPTED}")
    if sync_url is not None:
        if path == ":memory:":
            raise ConfigurationError("an embedded replica needs a file path, not ':memory:'")
        from durably.adapters._replica import EmbeddedReplicaStorage

        return EmbeddedReplicaStorage(
            path,
            sync_url=sync_url,
            auth_token=auth_token,
            sync_interval=1.0 if sync_interval is None else sync_interval,
            timeout=timeout,
        )
    return LocalFileStorage(path, synchronous=check_synchronous(synchronous or "normal"))


def __getattr__(name: str) -> Any:
    if name == "RemoteStorage":
        from durably.adapters._remote import RemoteStorage

        return RemoteStorage
    if name == "EmbeddedReplicaStorage":
        from durably.adapters._replica import EmbeddedReplicaStorage

        return EmbeddedReplicaStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
