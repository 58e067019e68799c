"""PS256 signatures made in child processes that talk to the event loop over pipes.

Why: a PS256 signature takes the event loop ~250-350 µs, and at 500 SETs/s that was a quarter
of its busy time, paid by every parked poll's wake-up. The RSA work moves to a child process;
the loop only writes the signing input (the base64url header and payload, built by
signing.Signer) to a pipe and reads 256 bytes back.

Why not the alternatives, measured on 2 cores: a thread is slow because it needs the GIL back
for every SET while the loop is busy (wake-ups 4x slower), and a ProcessPoolExecutor pickles
each call and runs a management thread in the parent that contends for the GIL the same way.
Here the parent has no thread: each child's pipes are read by the event loop itself.
Threads were tried again with cryptography 50, which releases the GIL while OpenSSL signs
(alone, two threads sign 1.8x as fast as one): in three paired quick benchmark runs (not
saved) against signing on the loop, the latency was inconclusive on a noisy machine and
publishing was 4-16% slower (1,503-1,567 SETs/s against 1,633-1,779).

Wire format, both ways: a 4-byte big-endian length, then that many bytes. Replies come in
request order and start with a status byte: 0, the signature follows; 1, an error message
(the child goes on).
Run as `python -m broker.signproc KEY.pem`; it exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import sys
from pathlib import Path
from typing import BinaryIO

from broker.errors import SigningError

log = logging.getLogger(__name__)
_LEN = 4
_OK, _FAILED = b"\x00", b"\x01"


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(_LEN, "big") + data


class _Child:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pending: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self.reader = asyncio.create_task(self._read(), name="broker-signproc-reader")

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.reader.done()

    def send(self, inputs: list[bytes]) -> list[asyncio.Future[bytes]]:
        assert self.proc.stdin is not None
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in inputs]
        self.pending.extend(futures)
        self.proc.stdin.write(b"".join(_frame(i) for i in inputs))
        return futures

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        out = self.proc.stdout
        error: Exception = SigningError("the signing process exited")
        try:
            while True:
                size = int.from_bytes(await out.readexactly(_LEN), "big")
                reply = await out.readexactly(size)
                future = self.pending.popleft()
                if future.done():
                    continue
                if reply[:1] == _OK:
                    future.set_result(reply[1:])
                else:
                    future.set_exception(SigningError(reply[1:].decode(errors="replace")))
        except (asyncio.IncompleteReadError, ConnectionError, IndexError) as e:
            error = SigningError(f"the signing process exited ({type(e).__name__})")
        finally:
            while self.pending:
                future = self.pending.popleft()
                if not future.done():
                    future.set_exception(error)
                    future.exception()  # retrieved: the caller re-raises its own copy

    def kill(self) -> None:
        """Stop a child that does not answer; its reader then fails every pending call."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()

    async def aclose(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


class SigningProcesses:
    """`processes` children signing with the key in `key_path`; calls go round-robin.

    A child that died is replaced (once, however many calls notice) on the next call; the SETs
    it held fail with SigningError, so their publish stores nothing and answers 503. A child
    that does not answer within `timeout_s` is killed, with the same outcome.
    """

    def __init__(self, key_path: Path, processes: int, *, timeout_s: float = 10.0) -> None:
        self.key_path = key_path
        self.size = processes
        self.timeout_s = timeout_s
        self._children: list[_Child | None] = [None] * processes
        self._locks = [asyncio.Lock() for _ in range(processes)]
        self._turn = itertools.cycle(range(processes))
        self._closed = False

    async def start(self) -> None:
        for i in range(self.size):
            self._children[i] = await self._spawn()
        # one round trip each: the key loaded, the import done, before the first publish
        await asyncio.gather(*(self.sign([b"warm-up"]) for _ in range(self.size)))

    async def _spawn(self) -> _Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "broker.signproc",
            str(self.key_path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return _Child(proc)

    async def sign(self, inputs: list[bytes]) -> list[bytes]:
        """The PS256 signatures of `inputs` (JWS signing inputs), in order."""
        if self._closed:
            raise SigningError("signing processes are closed")
        child = await self._child(next(self._turn))
        futures = child.send(inputs)
        try:
            async with asyncio.timeout(self.timeout_s):
                assert child.proc.stdin is not None
                await child.proc.stdin.drain()
                return list(await asyncio.gather(*futures))
        except TimeoutError:
            child.kill()
            raise SigningError(
                f"the signing process did not answer within {self.timeout_s:g} s"
            ) from None

    async def _child(self, i: int) -> _Child:
        child = self._children[i]
        if child is not None and child.alive:
            return child
        async with self._locks[i]:  # one replacement, however many callers find it dead
            child = self._children[i]
            if child is not None and child.alive:
                return child
            if self._closed:
                raise SigningError("signing processes are closed")
            if child is not None:
                log.warning("signing process %d exited; starting another", i)
                await child.aclose()
            child = self._children[i] = await self._spawn()
            return child

    async def aclose(self) -> None:
        self._closed = True
        for lock in self._locks:  # a replacement under way finishes first, then is closed
            async with lock:
                pass
        children = [c for c in self._children if c is not None]
        self._children = [None] * self.size
        await asyncio.gather(*(c.aclose() for c in children), return_exceptions=True)


def serve(key_path: str, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """The child's loop: read a signing input, write its signature, until stdin closes."""
    from broker.signing import _load_private, sign_ps256

    key = _load_private(Path(key_path))
    read, write, flush = stdin.read, stdout.write, stdout.flush
    while True:
        head = read(_LEN)
        if len(head) < _LEN:
            return
        data = read(int.from_bytes(head, "big"))
        try:
            reply = _OK + sign_ps256(key, data)
        except Exception as e:  # answer it: the parent's caller gets a SigningError
            reply = _FAILED + str(e).encode()
        write(_frame(reply))
        flush()


if __name__ == "__main__":
    serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
