"""RespClient: a small pipelining Redis client for the broker's hot path.

Why not redis-py here: every poll and every publish is one Lua script call, and redis-py's
per-command machinery (a pooled connection checked out and back, an asyncio timeout per read,
a retry wrapper, observability hooks) cost ~40% of a short poll's CPU in our profile, and a
pool of N connections serialises the rest. This client keeps one connection with any number
of commands in flight; replies come back in order and are parsed by hiredis (already a
redis-py dependency). Redis-py still does everything else: the hub's blocking XREAD, admin
commands, and all of the tests' inspection.

Each command is written as soon as it is issued, not gathered until the end of the loop
iteration: Redis, on the other core, then runs the first script while the broker still
parses the requests that came in with it. Gathering saved write calls but left Redis and the
broker taking turns; writing at once gave 30-40% more non-empty short polls per second in
paired runs (bench/README.md), the broker's CPU rising from ~68% to ~92% of a core.

Failure semantics match the redis-py clients the broker builds: no automatic retries (callers
decide, see store.idempotent), redis-py's exception classes, a time-out on every command.
A command that gets no reply within `timeout_s` fails, and so does the connection, so every
command still pending on it fails too: their fate is unknown, exactly as with a dropped
redis-py connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from typing import Any, cast
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
import redis.exceptions

Arg = bytes | str | int | float


def encode_command(args: tuple[Arg, ...]) -> bytes:
    """One command as a RESP array of bulk strings (hiredis's C encoder: ~3x faster)."""
    # hiredis's stub types the argument as a 1-tuple; any length is accepted.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


# Small counts and limits, encoded once: hiredis turns an int argument into text with a
# PyObject_Str and an sprintf each time (~40 ns apiece, five per OB poll).
_SMALL = tuple(str(i).encode() for i in range(1024))


def number(n: int) -> bytes:
    """`n` as a command argument, the same bytes hiredis would send for the int."""
    return _SMALL[n] if 0 <= n < 1024 else str(n).encode()


class PackedArgs:
    """Command arguments that recur unchanged from call to call, encoded once.

    An OB poll without acks sends the same five numbers after its key every time. Packed
    once, the call skips building and encoding its argument list: 5% fewer instructions per
    OB poll (callgrind). `args` is the plain form, for clients that encode for themselves.
    """

    __slots__ = ("args", "resp")

    def __init__(self, args: tuple[Arg, ...]) -> None:
        self.args = args
        # Bulk strings only: the array header depends on what goes before them.
        self.resp = encode_command(args).partition(b"\r\n")[2] if args else b""


def bulk(value: str) -> bytes:
    """One text argument as a RESP bulk string."""
    data = value.encode()
    return b"$%d\r\n%b\r\n" % (len(data), data)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a future's outcome seen: its waiters, if any, re-raise their own copy."""
    if not future.cancelled():
        future.exception()


def _error(reply: hiredis.ReplyError) -> redis.exceptions.ResponseError:
    text = str(reply)
    if text.startswith("NOSCRIPT"):
        return redis.exceptions.NoScriptError(text)
    return redis.exceptions.ResponseError(text)


class _Protocol(asyncio.Protocol):
    def __init__(self, client: RespClient) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, hence a cast, not a check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        pending = self.client._pending
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as e:
                self.client._fail(redis.exceptions.ConnectionError(f"protocol error: {e}"))
                return
            if reply is False:
                return
            if not pending:  # a reply nobody asked for: the stream is out of step
                self.client._fail(redis.exceptions.ConnectionError("unexpected reply"))
                return
            future = pending.popleft()[0]
            if future.done():  # its caller was cancelled; the reply is dropped in order
                continue
            if isinstance(reply, hiredis.ReplyError):
                future.set_exception(_error(reply))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._lost(self, exc)


class RespClient:
    """One pipelined connection to Redis; `execute` sends a command, returns its reply."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        connect_timeout_s: float = 5.0,
        name: str = "",
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "unix"):
            raise ValueError(f"RespClient takes redis:// or unix:// URLs, not {url!r}")
        query = parse_qs(parts.query)
        self._path: str | None = unquote(parts.path) if parts.scheme == "unix" else None
        self._host = parts.hostname or "localhost"
        self._port = parts.port or 6379
        db = int(query["db"][0]) if "db" in query else 0
        if parts.scheme == "redis" and parts.path.strip("/"):
            db = int(parts.path.strip("/"))
        self._setup: list[tuple[Arg, ...]] = []
        # In the URL's user part, or (as redis-py also reads them) in its query.
        password = unquote(parts.password) if parts.password else query.get("password", [""])[0]
        user = unquote(parts.username) if parts.username else query.get("username", [""])[0]
        if password:
            self._setup.append(("AUTH", user, password) if user else ("AUTH", password))
        if db:
            self._setup.append(("SELECT", db))
        if name:  # shown by CLIENT LIST, so an operator can tell connections apart
            self._setup.append(("CLIENT", "SETNAME", name))
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._proto: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        # (future, monotonic send time) of every command sent and not yet answered, in order.
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._out: list[bytes] = []  # commands to write together (pipeline, set-up)
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._proto is not None

    async def execute(self, *args: Arg) -> Any:
        """Send one command at once (others may be in flight); its reply."""
        if self._proto is None:
            await self._connect()
        return await self._send_data(encode_command(args))

    async def execute_packed(self, data: bytes) -> Any:
        """Send one command already encoded as a RESP array (see PackedArgs); its reply."""
        if self._proto is None:
            await self._connect()
        return await self._send_data(data)

    async def pipeline(self, *commands: tuple[Arg, ...]) -> list[Any]:
        """Send several commands in one write; their replies, an error reply as its exception.

        A lost connection raises (the fate of every command is then unknown).
        """
        if self._proto is None:
            await self._connect()
        futures: list[asyncio.Future[Any]] = []
        try:
            for c in commands:
                futures.append(self._send(c, write=False))
        finally:  # a command that cannot be encoded must not strand those before it
            self._flush()
        results: list[Any] = []
        try:
            for f in futures:
                try:
                    results.append(await f)
                except redis.exceptions.ResponseError as e:
                    results.append(e)
        except BaseException:
            for f in futures:  # the same failure reached them all; mark it seen
                if f.done():
                    _retrieved(f)
            raise
        return results

    def _send(self, args: tuple[Arg, ...], *, write: bool = True) -> asyncio.Future[Any]:
        # Encoded first: a TypeError must not leave a future pending.
        return self._send_data(encode_command(args), write=write)

    def _send_data(self, data: bytes, *, write: bool = True) -> asyncio.Future[Any]:
        # The loop of the connection, kept: on Python 3.11 get_running_loop() makes a getpid
        # system call each time (its check for a fork), and this runs for every command.
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._proto is None:  # died between connecting and sending
            future.set_exception(redis.exceptions.ConnectionError("connection lost"))
            return future
        self._pending.append((future, loop.time()))
        if write and not self._out:
            self._write(data)
        else:
            self._out.append(data)
            if write:
                self._flush()
        return future

    def _flush(self) -> None:
        if self._out:
            data, self._out = b"".join(self._out), []
            self._write(data)

    def _write(self, data: bytes) -> None:
        proto = self._proto
        if proto is not None and proto.transport is not None and not proto.transport.is_closing():
            proto.transport.write(data)
        # else: the connection is going; connection_lost fails the pending commands

    async def _connect(self) -> _Protocol:
        if self._closed:
            raise redis.exceptions.ConnectionError("client is closed")
        if self._connecting is None:
            # The attempt is a task of the client's, not of the caller that started it: a
            # caller cancelled meanwhile (its HTTP client left) must not leave the others
            # waiting on a connection nobody is making.
            self._connecting = asyncio.ensure_future(self._open())
            self._connecting.add_done_callback(_retrieved)
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Protocol:
        loop = self._loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self._path:
                    transport, proto = await loop.create_unix_connection(
                        lambda: _Protocol(self), self._path
                    )
                else:
                    transport, proto = await loop.create_connection(
                        lambda: _Protocol(self), self._host, self._port
                    )
        except (OSError, TimeoutError) as e:
            raise redis.exceptions.ConnectionError(f"cannot connect to Redis: {e}") from e
        finally:
            self._connecting = None
        if self._closed:  # aclose() ran while we connected
            transport.close()
            raise redis.exceptions.ConnectionError("client is closed")
        self._proto = proto
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout_s / 2, self._watch)
        for cmd in self._setup:  # AUTH / SELECT go first on the new connection
            setup: asyncio.Future[Any] = loop.create_future()
            # A failed AUTH/SELECT shows in the commands that follow; mark it retrieved.
            setup.add_done_callback(_retrieved)
            self._pending.append((setup, loop.time()))
            self._out.append(encode_command(cmd))
        self._flush()
        return proto

    def _watch(self) -> None:
        """Fail the connection if its oldest command is unanswered past the time-out."""
        self._watchdog = None
        if self._closed or self._proto is None:
            return
        loop = asyncio.get_running_loop()
        if self._pending and loop.time() - self._pending[0][1] > self.timeout_s:
            self._fail(redis.exceptions.TimeoutError("Redis did not answer in time"))
        self._watchdog = loop.call_later(self.timeout_s / 2, self._watch)

    def _fail(self, error: Exception) -> None:
        proto = self._proto
        self._drop_pending(error)
        if proto is not None and proto.transport is not None:
            proto.transport.abort()

    def _lost(self, proto: _Protocol, exc: Exception | None) -> None:
        if proto is self._proto:
            reason = f": {exc}" if exc else ""
            self._drop_pending(redis.exceptions.ConnectionError(f"connection lost{reason}"))

    def _drop_pending(self, error: Exception) -> None:
        self._proto = None
        self._out.clear()
        pending, self._pending = self._pending, collections.deque()
        for future, _sent in pending:
            if not future.done():
                future.set_exception(error)

    async def aclose(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        proto = self._proto
        self._drop_pending(redis.exceptions.ConnectionError("client closed"))
        if proto is not None and proto.transport is not None:
            proto.transport.close()
            with contextlib.suppress(Exception):
                await asyncio.sleep(0)
