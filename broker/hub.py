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
import heapq
import logging
import math
import typing
from typing import Any

import redis.exceptions
from redis.asyncio import Redis

from broker import keyspace
from broker.resp import RespClient

log = logging.getLogger(__name__)


class WakeSource(typing.Protocol):
    """Where the hub reads hints: the wake-up stream, over some Redis connection."""

    async def last_id(self) -> str:
        """The id of the newest hint, "0-0" when there is none."""

    async def read(self, after: str, count: int, block_ms: int) -> list[tuple[str, str]]:
        """Up to `count` hints after `after` as (id, tag), blocking up to `block_ms`."""

    async def aclose(self) -> None: ...


class RespWakeSource:
    """Hints over a dedicated RespClient connection (production: redis:// and unix:// URLs).

    Cheaper than redis-py per read (the hub reads once per burst of publishes: at 1,000
    publishes/s redis-py's call path was ~8% of the process's busy time), and a cancel
    lands on a plain future, so shutdown is never swallowed by a read in progress.
    """

    def __init__(self, client: RespClient) -> None:
        self.client = client

    async def last_id(self) -> str:
        last = await self.client.execute("XREVRANGE", keyspace.WAKE_STREAM, "+", "-", "COUNT", 1)
        return str(last[0][0].decode()) if last else "0-0"

    async def read(self, after: str, count: int, block_ms: int) -> list[tuple[str, str]]:
        reply = await self.client.execute(
            "XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", keyspace.WAKE_STREAM, after
        )
        if not reply:  # nil: the block time passed without a hint
            return []
        return [(entry_id.decode(), _tag(fields)) for entry_id, fields in reply[0][1]]

    async def aclose(self) -> None:
        await self.client.aclose()


class RedisPyWakeSource:
    """Hints over a redis-py client (TLS URLs, and fakeredis in tests)."""

    def __init__(self, redis: Redis) -> None:
        self.redis = redis

    async def last_id(self) -> str:
        last: Any = await self.redis.xrevrange(keyspace.WAKE_STREAM, "+", "-", count=1)
        return str(last[0][0].decode()) if last else "0-0"

    async def read(self, after: str, count: int, block_ms: int) -> list[tuple[str, str]]:
        reply = await self.redis.xread({keyspace.WAKE_STREAM: after}, count=count, block=block_ms)
        if not reply:
            return []
        return [
            (entry_id.decode(), fields.get(b"t", b"").decode())
            for entry_id, fields in _stream_entries(reply)
        ]

    async def aclose(self) -> None:
        await self.redis.aclose()


def _tag(fields: list[bytes]) -> str:
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == b"t":
            return fields[i + 1].decode()
    return ""


class Waiter:
    """One parked poll: a context manager that registers with the hub for its lifetime.

    Holds one future at a time; `arm` replaces it once it has fired. Kept small on purpose:
    tens of thousands of these are alive at once, so it has no timer of its own either (the
    hub's deadline buckets expire it).
    """

    __slots__ = ("_future", "_hub", "_tick", "tag")

    def __init__(self, hub: Hub, tag: str, future: asyncio.Future[bool]) -> None:
        self._hub = hub
        self.tag = tag
        self._future = future
        self._tick = 0  # the deadline bucket this waiter sits in; 0: none

    def __enter__(self) -> Waiter:
        self._hub._register(self)
        return self

    def __exit__(self, *exc: object) -> None:
        # Runs however the block ends, a cancel (client gone) included.
        hub = self._hub
        if self._tick:
            hub._unschedule(self)
        hub._unregister(self)

    def arm(self) -> None:
        """Get ready for the next hint; call before re-reading the stream."""
        if self._future.done():
            if self._tick:
                self._hub._unschedule(self)
            self._future = self._future.get_loop().create_future()

    def wake(self) -> None:
        if not self._future.done():
            self._future.set_result(True)
        if self._tick:
            self._hub._unschedule(self)

    def _expire(self) -> None:
        if not self._future.done():
            self._future.set_result(False)

    def until(self, timeout: float) -> asyncio.Future[bool]:
        """A future that resolves True when woken, False after `timeout` seconds.

        A plain method handing back the future (not a coroutine): a parked poll then holds no
        extra coroutine frame, which counts at tens of thousands of them.
        """
        future = self._future
        if not future.done():
            if timeout <= 0:
                future.set_result(False)
            else:
                self._hub._schedule(self, timeout)
        return future

    async def wait(self, timeout: float) -> bool:  # noqa: ASYNC109 - a timer, not a scope
        """Sleep until woken or `timeout` seconds pass; True if woken."""
        return await self.until(timeout)


class _Bucket(set[Waiter]):
    """The waiters of one deadline tick, and the tick itself.

    Each waiter points at this one tick object (an int of its own would be ~50 bytes more per
    parked poll, allocator header included).
    """

    __slots__ = ("tick",)

    def __init__(self, tick: int) -> None:
        super().__init__()
        self.tick = tick


# Waiters expire in buckets this wide (seconds): one loop timer per bucket instead of one per
# waiter. A uvloop TimerHandle costs about 600 bytes; 10,000 of them were 6 MB, and a long
# poll answering up to 10 ms late is fine. Deadlines round up, so none answers early.
TICK_S = 0.01


class Hub:
    def __init__(self, source: WakeSource | Redis, *, block_ms: int = 5000) -> None:
        self.source: WakeSource = RedisPyWakeSource(source) if isinstance(source, Redis) else source
        self.block_ms = block_ms
        # tag -> its waiter, or a set when several polls wait on one tag (rare: one consumer
        # polling several queues). A set per waiter would cost ~200 bytes each.
        self._waiters: dict[str, Waiter | set[Waiter]] = {}
        self._count = 0
        # Deadline buckets: tick number -> waiters expiring then; a heap of the ticks; the
        # one loop timer, armed for the earliest tick.
        self._buckets: dict[int, _Bucket] = {}
        self._ticks: list[int] = []
        self._in_heap: set[int] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_tick = 0
        self._last_id = "0-0"
        self._task: asyncio.Task[None] | None = None
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
        self._last_id = await self.source.last_id()
        self._task = asyncio.create_task(self._run(), name="broker-hub")

    async def aclose(self) -> None:
        self._stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.wake_all()
        await self.source.aclose()

    def watch(self, tag: str) -> Waiter:
        """A waiter for `tag`, registered while its `with` block runs."""
        return Waiter(self, tag, asyncio.get_running_loop().create_future())

    def _register(self, waiter: Waiter) -> None:
        tag = waiter.tag
        present = self._waiters.get(tag)
        if present is None:
            self._waiters[tag] = waiter
        elif isinstance(present, set):
            present.add(waiter)
        else:
            self._waiters[tag] = {present, waiter}
        self._count += 1

    def _unregister(self, waiter: Waiter) -> None:
        tag = waiter.tag
        present = self._waiters.get(tag)
        if present is waiter:
            del self._waiters[tag]
        elif isinstance(present, set) and waiter in present:
            present.discard(waiter)
            if len(present) == 1:
                self._waiters[tag] = present.pop()
        else:
            return
        self._count -= 1

    def wake(self, tag: str) -> None:
        present = self._waiters.get(tag)
        if present is None:
            return
        if isinstance(present, set):
            for waiter in list(present):
                waiter.wake()
        else:
            present.wake()

    # deadlines ----------------------------------------------------------------------------
    def _schedule(self, waiter: Waiter, timeout: float) -> None:
        loop = waiter._future.get_loop()
        tick = math.ceil((loop.time() + timeout) / TICK_S)
        if waiter._tick == tick:
            return
        if waiter._tick:
            self._unschedule(waiter)
        bucket = self._buckets.get(tick)
        if bucket is None:
            bucket = self._buckets[tick] = _Bucket(tick)
            if tick not in self._in_heap:  # a bucket emptied and made again: pushed once
                self._in_heap.add(tick)
                heapq.heappush(self._ticks, tick)
            if self._timer is None or tick < self._timer_tick:
                self._arm_timer(loop, tick)
        bucket.add(waiter)
        waiter._tick = bucket.tick  # the bucket's int, shared, not the one computed above

    def _unschedule(self, waiter: Waiter) -> None:
        tick = waiter._tick
        bucket = self._buckets.get(tick)
        waiter._tick = 0
        if bucket is not None:
            bucket.discard(waiter)
            if not bucket:
                # Its tick stays in the heap (and _in_heap); the timer skips it.
                del self._buckets[tick]
                if len(self._ticks) > 4 * len(self._buckets) + 64:
                    self._compact()

    def _compact(self) -> None:
        """Rebuild the heap from the live buckets, dropping the ticks of emptied ones.

        Not only for the heap's size: the tick numbers are small objects made while polls
        arrived, interleaved in memory with theirs. After a mass disconnect a few hundred
        stale ticks, kept until their deadlines pass, held ~75 MB of otherwise empty
        allocator arenas for up to a poll's maximum wait.
        """
        self._ticks = list(self._buckets)
        heapq.heapify(self._ticks)
        self._in_heap = set(self._ticks)

    def _arm_timer(self, loop: asyncio.AbstractEventLoop, tick: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_tick = tick
        # 1 ms late on purpose: uvloop rounds timers to whole milliseconds and can fire up
        # to half of one early; the tick would not be due yet and the timer would spin.
        self._timer = loop.call_at(tick * TICK_S + 0.001, self._expire_due, loop)

    def _expire_due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        # Local names are safe: _expire() only resolves futures (their callbacks run later),
        # so nothing here can reach _unschedule() and swap the heap out by _compact().
        ticks, buckets = self._ticks, self._buckets
        while ticks and ticks[0] * TICK_S <= now:
            tick = heapq.heappop(ticks)
            self._in_heap.discard(tick)
            bucket = buckets.pop(tick, None)
            if bucket:
                for waiter in bucket:
                    waiter._tick = 0
                    waiter._expire()
        # Drop ticks without a bucket at the front so the timer sleeps until a real deadline.
        while ticks and not buckets.get(ticks[0]):
            self._in_heap.discard(heapq.heappop(ticks))
        if ticks:
            self._arm_timer(loop, ticks[0])

    def release_all(self) -> None:
        """Shutdown: wake every waiter and tell the poll loops to stop waiting."""
        self.closing = True
        self.wake_all()

    def wake_all(self) -> None:
        for present in list(self._waiters.values()):
            if isinstance(present, set):
                for waiter in list(present):
                    waiter.wake()
            else:
                present.wake()

    async def _run(self) -> None:
        backoff = 0.05
        # Checked on every turn: redis-py can swallow a cancel that lands inside a blocking
        # read (returning or raising something else), so cancel() alone may not stop us.
        while not self.stopping():
            try:
                hints = await self.source.read(self._last_id, 1000, self.block_ms)
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
            if not hints:
                continue
            self._last_id = hints[-1][0]
            self.hints += len(hints)
            # A burst of publishes for one tag costs one wake-up.
            for tag in {tag for _id, tag in hints}:
                self.wake(tag)


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Entries of a one-stream XREAD reply, whichever shape (RESP2 list, RESP3 dict) it has."""
    if isinstance(reply, dict):
        (streams,) = reply.values()
        return list(streams[0]) if streams and isinstance(streams[0], list) else list(streams)
    return list(reply[0][1])
