"""A minimal HTTP/1.1 keep-alive client on asyncio.Protocol, for the load generator.

Why not aiohttp's client: 10,000 parked connections and 1,000 wake-ups/s on a 2-core machine
shared with the server. A bare protocol costs a few KB and ~20 µs per response, so the
measured publish-to-response latency is the server's, not the generator's. The arrival time of
a response is taken in `data_received`, the moment its last byte is read.

Supports Content-Length and chunked bodies, `Connection: close` (the server's, e.g. nginx's
keepalive_requests limit) and reconnects on demand. One request at a time per connection.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field


class ConnectionClosed(Exception):
    """The server closed the connection before a complete response."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes
    received_ns: int  # time.monotonic_ns() when the last byte arrived
    close: bool = False  # the server asked to close (or HTTP/1.0 without keep-alive)


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[Response]
    head_only: bool = False


class HttpConnection(asyncio.Protocol):
    __slots__ = ("_buf", "_pending", "closed", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._pending: _Pending | None = None
        self.closed = False

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        p, self._pending = self._pending, None
        if p is not None and not p.future.done():
            p.future.set_exception(ConnectionClosed(str(exc) if exc else "closed by peer"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._pending is not None:
            self._try_parse()

    def _try_parse(self) -> None:
        buf = self._buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(buf[:end])
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        status = int(parts[1])
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        start = end + 4
        body: bytes
        if status in (204, 304) or 100 <= status < 200:
            body, consumed = b"", start
        elif b"content-length" in headers:
            n = int(headers[b"content-length"])
            if len(buf) < start + n:
                return
            body, consumed = bytes(buf[start : start + n]), start + n
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            chunks = []
            pos = start
            while True:
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                if size == 0:
                    fin = buf.find(b"\r\n\r\n", eol)
                    if fin < 0:
                        if len(buf) >= eol + 4 and buf[eol : eol + 4] == b"\r\n\r\n":
                            fin = eol
                        else:
                            return
                    consumed = fin + 4
                    break
                if len(buf) < eol + 2 + size + 2:
                    return
                chunks.append(bytes(buf[eol + 2 : eol + 2 + size]))
                pos = eol + 2 + size + 2
            body = b"".join(chunks)
        else:
            return  # read-until-close bodies are not used by any target
        now = time.monotonic_ns()
        del buf[:consumed]
        close = headers.get(b"connection", b"").lower() == b"close" or parts[0] == b"HTTP/1.0"
        p, self._pending = self._pending, None
        assert p is not None
        if not p.future.done():
            p.future.set_result(Response(status, headers, body, now, close))

    # API
    def send(self, data: bytes) -> asyncio.Future[Response]:
        """Write one request; the future resolves with its response."""
        if self.closed or self.transport is None:
            raise ConnectionClosed("connection is closed")
        assert self._pending is None, "one request at a time"
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending = _Pending(fut)
        self.transport.write(data)
        if self._buf:
            self._try_parse()
        return fut

    def abort(self) -> None:
        """Vanish: close at once with a RST, no FIN handshake, nothing more read."""
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> HttpConnection:
    loop = asyncio.get_running_loop()
    _t, proto = await loop.create_connection(HttpConnection, host, port)
    return proto


@dataclass
class Client:
    """A reconnecting single connection: `request` reopens it when the server closed it."""

    host: str
    port: int
    conn: HttpConnection | None = None
    reconnects: int = field(default=0)

    async def request(
        self, data: bytes, limit_s: float | None = None, *, retry: bool = True
    ) -> Response:
        """Send and await one request. `retry`: resend once on a new connection if the server
        closed the kept-alive one under it (never for publishes: that could store twice)."""
        for attempt in range(2 if retry else 1):
            if self.conn is None or self.conn.closed:
                if self.conn is not None:
                    self.reconnects += 1
                self.conn = await connect(self.host, self.port)
            try:
                fut = self.conn.send(data)
                resp = await (asyncio.wait_for(fut, limit_s) if limit_s else fut)
            except TimeoutError:
                self.abort()  # the answer may still come: this connection is unusable
                raise
            except ConnectionClosed:
                # A keep-alive connection the server closed between requests: retry once on a
                # new one (the request was not processed). A second failure is an error.
                self.conn = None
                if attempt or not retry:
                    raise
                continue
            if resp.close:
                self.conn.close()
                self.conn = None
            return resp
        raise ConnectionClosed("unreachable")  # pragma: no cover

    def abort(self) -> None:
        if self.conn is not None:
            self.conn.abort()
            self.conn = None

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def build_request(
    method: str,
    path: str,
    host: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
