"""Storage adapters and ``open_storage``, which picks one from a URL.

Drivers are imported lazily: the local file needs only the standard library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from durably._storage._protocol import Storage
from durably.adapters._local import LocalFileStorage
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
    if url == ":memory:":
        return url
    if url.startswith("file:"):
        path = url.removeprefix("file:")
        if path.startswith("//"):
            path = path.removeprefix("//")  # file:///abs/path
        return path or None
    if "://" in url or not url.strip():
        return None
    return url


def open_storage(
    url: str,
    *,
    auth_token: str | None = None,
    sync_url: str | None = None,
    sync_interval: float | None = None,
    timeout: float | None = None,
) -> Storage:
    """The storage adapter for ``url``; no connection is opened until first use.

    ``timeout`` bounds each network request in seconds (remote and replica; default 2).
    Raises ``ConfigurationError`` naming the accepted forms when ``url`` fits none, and
    for a URL, token or timeout that cannot work, before any I/O.
    """
    if not isinstance(url, str):
        raise ConfigurationError(
            f"storage URL must be a string, got {type(url).__name__}; accepted: {_ACCEPTED}"
        )
    if sync_interval is not None and sync_interval <= 0:
        raise ConfigurationError(f"sync_interval must be a positive number of seconds, got {sync_interval!r}")
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
    return LocalFileStorage(path)


def __getattr__(name: str) -> Any:
    if name == "RemoteStorage":
        from durably.adapters._remote import RemoteStorage

        return RemoteStorage
    if name == "EmbeddedReplicaStorage":
        from durably.adapters._replica import EmbeddedReplicaStorage

        return EmbeddedReplicaStorage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
