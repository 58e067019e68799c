"""Hub: wakes the long polls parked in this process when their data changes.

Why this shape: a blocking Redis connection per waiting HTTP request would cap us at the
pool size and cost Redis a client per waiter. Instead every publish appends a small hint
(the tag of the user or client whose data changed) to one wake-up stream, and one reader per
process blocks on XREAD over that stream and resolves the futures of the local waiters of
those tags. Redis connections per process stay constant whatever the number of waiters.

Correctness rests on three rules:
1. A waiter registers (`watch`) *before* it reads its own stream, so a publish that lands
   between the read and the wait still finds it registered: the hint that follows the
   publish wakes it.
2. The reader never skips hints: it reads from the last id it saw (never "$" after start),
   and after a reconnect it resumes from there.
3. A hint is only a hint; the woken waiter re-reads its stream. If the reader may have missed
   hints (Redis unreachable, or hints trimmed away), it wakes every waiter, which re-read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import redis.exceptions
from redis.asyncio import Redis

from broker import keyspace

log = logging.getLogger(__name__)


class Waiter:
    """One parked poll: a context manager that registers with the hub for its lifetime.

    Holds one future at a time; `arm` replaces it once it has fired. Kept small on purpose:
    tens of thousands of these are alive at once.
    """

    __slots__ = ("_future", "_group", "_hub", "_loop", "_timer", "tag")

    def __init__(self, hub: Hub, tag: str, loop: asyncio.AbstractEventLoop) -> None:
        self._hub = hub
        self.tag = tag
        self._loop = loop
        self._future: asyncio.Future[bool] = loop.create_future()
        self._group: set[Waiter] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def __enter__(self) -> Waiter:
        self._group = self._hub._register(self)
        return self

    def __exit__(self, *exc: object) -> None:
        # Runs however the block ends, a cancel (client gone) included.
        self._cancel_timer()
        if self._group is not None:
            self._hub._unregister(self, self._group)
            self._group = None

    def arm(self) -> None:
        """Get ready for the next hint; call before re-reading the stream."""
        if self._future.done():
            self._cancel_timer()
            self._future = self._loop.create_future()

    def wake(self) -> None:
        if not self._future.done():
            self._future.set_result(True)
            self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def until(self, timeout: float) -> asyncio.Future[bool]:
        """A future that resolves True when woken, False after `timeout` seconds.

        A plain method handing back the future (not a coroutine): a parked poll then holds no
        extra coroutine frame, which counts at tens of thousands of them. The timer is a
        call_later on the future itself, cancelled by wake() and on exit.
        """
        future = self._future
        if not future.done():
            if timeout <= 0:
                future.set_result(False)
            else:
                self._cancel_timer()
                self._timer = self._loop.call_later(timeout, _expire, future)
        return future

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - a timer, not a scope
        """Sleep until woken or `timeout` seconds pass; True if woken."""
        return await self.until(timeout)


def _expire(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)


class Hub:
    def __init__(self, redis: Redis, *, block_ms: int = 5000) -> None:
        self.redis = redis
        self.block_ms = block_ms
        self._waiters: dict[str, set[Waiter]] = {}
        self._count = 0
        self._last_id = "0-0"
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self.reconnects = 0
        self.hints = 0
        # Set at shutdown: parked polls answer with what they have instead of waiting on.
        self.closing = False
        self._stopping = False

    @property
    def waiting(self) -> int:
        """Polls parked in this process right now."""
        return self._count

    def stopping(self) -> bool:
        """aclose() was called: the reader ends at its next turn."""
        return self._stopping

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the reader at the current end of the wake-up stream."""
        last: Any = await self.redis.xrevrange(keyspace.WAKE_STREAM, "+", "-", count=1)
        self._last_id = last[0][0].decode() if last else "0-0"
        self._task = asyncio.create_task(self._run(), name="broker-hub")
        self._ready.set()

    async def aclose(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.wake_all()
        await self.redis.aclose()

    def watch(self, tag: str) -> Waiter:
        """A waiter for `tag`, registered while its `with` block runs."""
        return Waiter(self, tag, asyncio.get_running_loop())

    def _register(self, waiter: Waiter) -> set[Waiter]:
        group = self._waiters.get(waiter.tag)
        if group is None:
            group = self._waiters[waiter.tag] = set()
        group.add(waiter)
        self._count += 1
        return group

    def _unregister(self, waiter: Waiter, group: set[Waiter]) -> None:
        self._count -= 1
        group.discard(waiter)
        if not group and self._waiters.get(waiter.tag) is group:
            del self._waiters[waiter.tag]

    def wake(self, tag: str) -> None:
        for waiter in self._waiters.get(tag, ()):
            waiter.wake()

    def release_all(self) -> None:
        """Shutdown: wake every waiter and tell the poll loops to stop waiting."""
        self.closing = True
        self.wake_all()

    def wake_all(self) -> None:
        for group in self._waiters.values():
            for waiter in group:
                waiter.wake()

    async def _run(self) -> None:
        backoff = 0.05
        # Checked on every turn: redis-py can swallow a cancel that lands inside a blocking
        # read (returning or raising something else), so cancel() alone may not stop us.
        while not self.stopping():
            try:
                reply = await self.redis.xread(
                    {keyspace.WAKE_STREAM: self._last_id}, count=1000, block=self.block_ms
                )
            except asyncio.CancelledError:
                raise
            except (redis.exceptions.RedisError, OSError) as e:
                # redis-py may turn a cancel that lands inside a blocking read into a
                # connection error; never mistake our own shutdown for an outage.
                task = asyncio.current_task()
                if self.stopping() or (task is not None and task.cancelling()):
                    raise asyncio.CancelledError from e
                self.reconnects += 1
                log.warning("hub: wake-up stream read failed (%s); retrying in %.2fs", e, backoff)
                # Hints may have been missed while Redis was away: everyone re-reads.
                self.wake_all()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            if not reply:
                continue
            entries = _stream_entries(reply)
            self._last_id = entries[-1][0].decode()
            self.hints += len(entries)
            # A burst of publishes for one tag costs one wake-up.
            for tag in {fields.get(b"t", b"") for _id, fields in entries}:
                self.wake(tag.decode())


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Entries of a one-stream XREAD reply, whichever shape (RESP2 list, RESP3 dict) it has."""
    if isinstance(reply, dict):
        (streams,) = reply.values()
        return list(streams[0]) if streams and isinstance(streams[0], list) else list(streams)
    return list(reply[0][1])
