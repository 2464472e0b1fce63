"""A loopback proxy that adds wide-area latency, and counts what crosses it.

    python -m tests.support.latency TARGET_PORT RTT_MS    # prints "PORT CONTROL_PORT"

Each direction of each connection is a delay line: a chunk read at time t is written at
t + RTT/2, so chunks in flight overlap and connections never wait for each other (a
sleep per chunk would add the delay once per chunk, serialised). It runs in its own
process so the measured client's event loop and GIL cannot slow it down.

``GET http://127.0.0.1:CONTROL_PORT/count`` answers the counts since the last
``GET /reset``: HTTP requests, Hrana requests by type, and sqld transactions: one per
``BEGIN`` statement (in a batch or an execute) plus one per writing ``execute`` outside
a stream (autocommit). The Node original's bench reads ``requests`` from the same URL.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from typing import Any

_READS = ("SELECT", "WITH", "PRAGMA", "COMMIT", "ROLLBACK", "RELEASE", "SAVEPOINT", "END")


class Counts:
    """What the client asked of sqld, read from the request bodies."""

    def __init__(self) -> None:
        self.figures: Counter[str] = Counter()

    def request(self, path: str, body: bytes) -> None:
        self.figures["requests"] += 1
        if not path.startswith(("/v2/pipeline", "/v3/pipeline")):
            return
        try:
            pipeline = json.loads(body)
        except ValueError:
            self.figures["unparsed"] += 1
            return
        in_stream = pipeline.get("baton") is not None
        for request in pipeline.get("requests", []):
            kind = request.get("type", "?")
            self.figures[f"hrana_{kind}"] += 1
            if kind == "batch":
                for step in request["batch"]["steps"]:
                    self._statement(step["stmt"].get("sql", ""), autocommit=False)
            elif kind == "execute":
                self._statement(request["stmt"].get("sql", ""), autocommit=not in_stream)

    def _statement(self, sql: str, *, autocommit: bool) -> None:
        self.figures["statements"] += 1
        word = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
        if word == "BEGIN" or (autocommit and word not in _READS):
            self.figures["transactions"] += 1


class _RequestReader:
    """Finds request heads and ``Content-Length`` bodies in a client-to-server byte stream."""

    def __init__(self, counts: Counts) -> None:
        self._counts = counts
        self._buffer = b""
        self._path: str | None = None
        self._length = 0

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while True:
            if self._path is None:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    return
                head, self._buffer = self._buffer[:end].decode("latin-1"), self._buffer[end + 4 :]
                lines = head.lstrip("\r\n").split("\r\n")
                self._path = lines[0].split(" ")[1] if " " in lines[0] else "?"
                self._length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        self._length = int(value)
            if len(self._buffer) < self._length:
                return
            body, self._buffer = self._buffer[: self._length], self._buffer[self._length :]
            self._counts.request(self._path, body)
            self._path = None


async def _delay_line(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float, seen: _RequestReader | None
) -> None:
    loop = asyncio.get_running_loop()
    line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await line.get()
            if not data:
                break
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(data)
            await writer.drain()
        writer.close()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(65536):
            if seen is not None:
                seen.feed(data)
            line.put_nowait((loop.time() + delay, data))
    except (ConnectionError, OSError):
        pass
    finally:
        line.put_nowait((loop.time() + delay, b""))
        try:
            await delivering
        except (ConnectionError, OSError):
            writer.close()


class LatencyProxy:
    """In a test: ``async with LatencyProxy(sqld.port, 0) as proxy:`` then ``proxy.url``,
    ``proxy.counts.figures``."""

    def __init__(self, target_port: int, rtt: float) -> None:
        self._target_port = target_port
        self._delay = rtt / 2
        self.counts = Counts()
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], tuple[asyncio.StreamWriter, ...]] = {}
        self.url = ""

    async def __aenter__(self) -> LatencyProxy:
        self._server = await asyncio.start_server(self.connection, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writers in self._connections.values():
            for writer in writers:
                writer.close()
        if self._connections:
            await asyncio.wait(self._connections, timeout=5)

    async def connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            client_w.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = (client_w, server_w)
        try:
            await asyncio.gather(
                _delay_line(client_r, server_w, self._delay, _RequestReader(self.counts)),
                _delay_line(server_r, client_w, self._delay, None),
                return_exceptions=True,
            )
        finally:
            del self._connections[task]

    async def control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        path = request.split(" ")[1] if " " in request else "/"
        if path.startswith("/reset"):
            # In place: kept-alive connections hold this object.
            self.counts.figures.clear()
        body = json.dumps(dict(self.counts.figures) | {"requests": self.counts.figures["requests"]}).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()


async def _serve(target_port: int, rtt: float) -> None:
    proxy = LatencyProxy(target_port, rtt)
    front = await asyncio.start_server(proxy.connection, "127.0.0.1", 0)
    control = await asyncio.start_server(proxy.control, "127.0.0.1", 0)
    ports = [server.sockets[0].getsockname()[1] for server in (front, control)]
    print(*ports, flush=True)
    # Ends when the parent closes stdin (or dies), connections and all.
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    os._exit(0)


def main(argv: list[str]) -> None:
    asyncio.run(_serve(int(argv[0]), float(argv[1]) / 1000))


if __name__ == "__main__":
    main(sys.argv[1:])
