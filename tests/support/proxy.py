"""A loopback TCP proxy for tests: counts connections and HTTP requests, injects faults.

Thread based (no asyncio), all threads are daemons with bounded waits.

    proxy = TcpProxy("127.0.0.1", sqld.port).start()
    url = f"http://127.0.0.1:{proxy.port}"
    ...
    proxy.http_requests        # request lines seen client->server (keep-alive aware)
    proxy.delay(0.05)          # +50 ms before each chunk forwarded (each direction)
    proxy.drop()               # blackhole: stop moving bytes, hold new connections
    proxy.heal()               # back to normal; held bytes/connections flow again
    proxy.reset()              # RST every current connection (SO_LINGER 0)
    proxy.answer_with(raw)     # answer each request with these raw bytes, then close;
                               # only requests whose path starts with ``paths=`` if given
    proxy.lose_answers(n)      # the next n answers: the server did the work, the client gets
                               # the connection closed instead of the answer
    proxy.stop()
"""

from __future__ import annotations

import collections
import contextlib
import re
import socket
import struct
import threading
import time

_REQ_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$")
_CHUNK = 65536
_TICK = 0.1  # bound on every blocking wait, so threads notice stop/reset quickly


def _rst_close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


class _HttpCounter:
    """Incremental parser of the client->server byte stream: finds request starts.

    Handles keep-alive (several requests per connection), Content-Length bodies,
    chunked bodies, and stops parsing after an ``Upgrade`` (WebSocket) request.
    """

    def __init__(self, on_request) -> None:
        self._buf = b""
        self._state = "head"  # head | body | chunk_size | chunk_data | chunk_trailer | opaque
        self._remaining = 0
        self._on_request = on_request

    def feed(self, data: bytes) -> None:
        if self._state == "opaque":
            return
        self._buf += data
        while True:
            st = self._state
            if st == "head":
                # tolerate stray CRLFs between requests
                self._buf = self._buf.lstrip(b"\r\n")
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > 1 << 20:  # not HTTP; give up
                        self._state, self._buf = "opaque", b""
                    return
                head, self._buf = self._buf[:end], self._buf[end + 4 :]
                lines = head.split(b"\r\n")
                m = _REQ_LINE.match(lines[0])
                if not m:
                    self._state, self._buf = "opaque", b""
                    return
                headers = {}
                for line in lines[1:]:
                    k, _, v = line.partition(b":")
                    headers[k.strip().lower()] = v.strip()
                upgrade = b"upgrade" in headers
                self._on_request(m.group(1).decode(), m.group(2).decode(), upgrade)
                if upgrade:
                    self._state, self._buf = "opaque", b""
                    return
                if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                    self._state = "chunk_size"
                else:
                    n = int(headers.get(b"content-length", b"0") or 0)
                    if n:
                        self._state, self._remaining = "body", n
            elif st == "body" or st == "chunk_data":
                take = min(self._remaining, len(self._buf))
                self._buf = self._buf[take:]
                self._remaining -= take
                if self._remaining:
                    return
                self._state = "head" if st == "body" else "chunk_size"
            elif st == "chunk_size":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return
                line, self._buf = self._buf[:end], self._buf[end + 2 :]
                if not line:
                    continue  # CRLF after chunk data
                size = int(line.split(b";")[0], 16)
                if size == 0:
                    self._state = "chunk_trailer"
                else:
                    self._state, self._remaining = "chunk_data", size
            elif st == "chunk_trailer":
                end = self._buf.find(b"\r\n")
                if end < 0:
                    return
                line, self._buf = self._buf[:end], self._buf[end + 2 :]
                if not line:
                    self._state = "head"
            else:
                return


class _Conn:
    def __init__(self, proxy: TcpProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: socket.socket | None = None
        self.closed = threading.Event()
        self.counter = _HttpCounter(self._on_request)
        self.canned: bytes | None = None  # the answer to the request being read, not forwarded

    def _on_request(self, method: str, path: str, upgrade: bool) -> None:
        self.proxy._on_request(method, path, upgrade)
        raw, paths = self.proxy._canned
        if raw is not None and (paths is None or path.startswith(paths)):
            self.canned = raw

    def _answer_canned(self) -> None:
        """Send the canned answer once the request is read in full, then close."""
        if self.canned is None or self.counter._state != "head":
            return
        with contextlib.suppress(OSError):
            self.client.sendall(self.canned)
            self.client.shutdown(socket.SHUT_WR)
        self.close()

    def run(self) -> None:
        p = self.proxy
        try:
            # a blackholed proxy holds new connections without connecting upstream
            while p._dropped.is_set() and not self.closed.is_set() and p._running:
                time.sleep(_TICK)
            if self.closed.is_set() or not p._running:
                return
            try:
                self.upstream = socket.create_connection((p.target_host, p.target_port), timeout=5)
            except OSError:
                _rst_close(self.client)  # upstream down: refuse the client too
                return
            self.upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._pump, args=(self.upstream, self.client, False), daemon=True)
            t.start()
            self._pump(self.client, self.upstream, True)
            t.join(2)
        finally:
            self.close()
            if self.upstream is not None:  # connected after a concurrent close(): still closed
                with contextlib.suppress(OSError):
                    self.upstream.close()
            p._forget(self)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream_dir: bool) -> None:
        p = self.proxy
        try:
            src.settimeout(_TICK)  # inside: the connection may be closed already
            while not self.closed.is_set() and p._running:
                if p._dropped.is_set():
                    time.sleep(_TICK)  # leave bytes in kernel buffers, like a stalled link
                    continue
                try:
                    data = src.recv(_CHUNK)
                except TimeoutError:
                    continue
                if not data:
                    # half-close: pass EOF on
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                if upstream_dir:
                    p.bytes_up += len(data)
                    self.counter.feed(data)
                    if self.canned is not None:
                        self._answer_canned()
                        continue
                else:
                    p.bytes_down += len(data)
                    if p._take_lost_answer():
                        with contextlib.suppress(OSError):
                            dst.shutdown(socket.SHUT_RDWR)
                        self.close()
                        return
                d = p._delay
                if d > 0:
                    time.sleep(d)
                while p._dropped.is_set() and not self.closed.is_set() and p._running:
                    time.sleep(_TICK)
                dst.sendall(data)
        except OSError:
            pass

    def close(self, rst: bool = False) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for s in (self.client, self.upstream):
            if s is None:
                continue
            if rst:
                _rst_close(s)
            else:
                with contextlib.suppress(OSError):
                    s.close()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, listen_port: int = 0) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self._listen_port = listen_port
        self.port: int | None = None
        self._listener: socket.socket | None = None
        self._running = False
        self._dropped = threading.Event()
        self._delay = 0.0
        self._canned: tuple[bytes | None, str | None] = (None, None)
        self._lost_answers = 0
        self._lock = threading.Lock()
        self._conns: set[_Conn] = set()
        self._accept_thread: threading.Thread | None = None
        # counters
        self.connections_accepted = 0
        self.http_requests = 0
        self.ws_upgrades = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.request_log: collections.deque[tuple[str, str]] = collections.deque(maxlen=10_000)

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> TcpProxy:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self._listen_port))
        ls.listen(128)
        ls.settimeout(_TICK)
        self._listener = ls
        self.port = ls.getsockname()[1]
        self._listen_port = self.port  # a later start() reuses the port
        self._running = True
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"TcpProxy:{self.port}", daemon=True
        )
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        self._running = False
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
            self._listener = None
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
        if self._accept_thread is not None:
            self._accept_thread.join(2)
            self._accept_thread = None

    def __enter__(self) -> TcpProxy:
        if not self._running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def retarget(self, host: str, port: int) -> None:
        """Point new connections elsewhere (e.g. after sqld moved)."""
        self.target_host, self.target_port = host, port

    # -- faults -------------------------------------------------------------------
    def delay(self, seconds: float) -> None:
        """Sleep ``seconds`` before forwarding each chunk, in both directions."""
        self._delay = max(0.0, float(seconds))

    def drop(self) -> None:
        """Blackhole: no bytes move on existing connections; new ones are held."""
        self._dropped.set()

    def reset(self) -> None:
        """Close every current connection with a TCP RST (SO_LINGER 0)."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close(rst=True)

    def answer_with(self, raw: bytes | None, *, paths: str | None = None) -> None:
        """Answer each request (whose path starts with ``paths``) with ``raw``, then close.

        The request never reaches the server. ``None`` forwards requests again.
        """
        self._canned = (raw, paths)

    def lose_answers(self, count: int = 1) -> None:
        """The next ``count`` answers are lost: the connection closes as the server answers."""
        with self._lock:
            self._lost_answers = count

    def heal(self) -> None:
        """Clear delay, drop, canned answers and lost answers."""
        self._delay = 0.0
        self._dropped.clear()
        self._canned = (None, None)
        with self._lock:
            self._lost_answers = 0

    # -- counters -----------------------------------------------------------------
    @property
    def active_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def reset_counters(self) -> None:
        with self._lock:
            self.connections_accepted = 0
            self.http_requests = 0
            self.ws_upgrades = 0
            self.bytes_up = self.bytes_down = 0
            self.request_log.clear()

    # -- internals ----------------------------------------------------------------
    def _on_request(self, method: str, path: str, upgrade: bool) -> None:
        with self._lock:
            self.http_requests += 1
            if upgrade:
                self.ws_upgrades += 1
            self.request_log.append((method, path))

    def _take_lost_answer(self) -> bool:
        with self._lock:
            if self._lost_answers <= 0:
                return False
            self._lost_answers -= 1
            return True

    def _forget(self, conn: _Conn) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _accept_loop(self) -> None:
        while self._running:
            ls = self._listener
            if ls is None:
                return
            try:
                client, _ = ls.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(self, client)
            with self._lock:
                self.connections_accepted += 1
                self._conns.add(conn)
            threading.Thread(target=conn.run, daemon=True).start()


class ProxyProcess:
    """A ``TcpProxy`` in a child process, driven by method name over its stdin.

    For traffic from code that holds the GIL while it waits on the network (libsql's
    replica sync): an in-process proxy thread could never forward it.

        with ProxyProcess("127.0.0.1", sqld.port) as proxy:
            proxy.call("answer_with", b"HTTP/1.1 503 ...", paths="/wal_log")
            proxy.request_log()   # [(method, path), ...]
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        import subprocess
        import sys
        from pathlib import Path

        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.proxy", target_host, str(target_port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],  # where ``tests`` is a package
        )
        self.port = int(self._read())
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self) -> str:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the proxy process ended")
        return line.decode().strip()

    def call(self, method: str, *args: object, **kwargs: object) -> object:
        """Call ``TcpProxy.<method>`` in the child; its result (for plain values)."""
        import pickle

        assert self._proc.stdin is not None
        self._proc.stdin.write(pickle.dumps((method, args, kwargs)).hex().encode() + b"\n")
        self._proc.stdin.flush()
        return pickle.loads(bytes.fromhex(self._read()))

    def request_log(self) -> list[tuple[str, str]]:
        return self.call("_log")  # type: ignore[return-value]

    def close(self) -> None:
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(5)
        except Exception:
            self._proc.kill()
            self._proc.wait(5)
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve_commands(host: str, port: int) -> None:
    import pickle
    import sys

    proxy = TcpProxy(host, port).start()
    proxy._log = lambda: list(proxy.request_log)  # type: ignore[attr-defined]
    print(proxy.port, flush=True)
    for line in sys.stdin:  # ends when the parent closes stdin (or dies)
        method, args, kwargs = pickle.loads(bytes.fromhex(line.strip()))
        result = getattr(proxy, method)(*args, **kwargs)
        print(pickle.dumps(result).hex(), flush=True)
    proxy.stop()


if __name__ == "__main__":
    import sys

    _serve_commands(sys.argv[1], int(sys.argv[2]))
