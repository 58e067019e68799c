"""QueueStore: the Oxlin queues kept as Redis streams (subscribe, publish, poll, rewind).

Raw Redis stays behind this class; redis-py errors become StoreError / StoreUnavailable here.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.exceptions
from redis.asyncio import Redis

from broker import keyspace
from broker.errors import StoreError, StoreUnavailable

T = TypeVar("T")


async def guard(call: Awaitable[T]) -> T:
    """Await a Redis call, turning redis-py's errors into the broker's."""
    try:
        return await call
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
        raise StoreUnavailable(f"Redis unavailable: {e}") from e
    except redis.exceptions.RedisError as e:
        raise StoreError(f"Redis error: {e}") from e


@dataclass(frozen=True, slots=True)
class PollResult:
    """What one consuming read of a queue returned."""

    body: bytes | None  # JSON array of the events, or None when there were none
    count: int
    dropped: int  # events lost to the stream cap since the previous poll
    cursor: str  # cursor set by this poll
    previous: str  # cursor before it, for rewind()


@dataclass(frozen=True, slots=True)
class PublishResult:
    ids: list[str]
    queues: int


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """An event ready to store: its topic, an optional producer id, its JSON body without id."""

    topic: str
    id: str
    body: bytes


class QueueStore:
    def __init__(self, redis: Redis, *, ttl_s: int, maxlen: int, max_batch: int) -> None:
        self.redis = redis
        self.ttl_ms = ttl_s * 1000
        self.maxlen = maxlen
        self.max_batch = max_batch
        self._subscribe = redis.register_script(keyspace.lua("queue_subscribe"))
        self._poll = redis.register_script(keyspace.lua("queue_poll"))
        self._rewind = redis.register_script(keyspace.lua("queue_rewind"))
        self._publish = redis.register_script(keyspace.lua("queue_publish"))

    async def subscribe(self, user_id: str, topics: Sequence[str]) -> str:
        """Create a queue for the user; returns its id (128 random bits, URL-safe)."""
        queue_id = secrets.token_urlsafe(16)
        tag = keyspace.user_tag(user_id)
        await guard(
            self._subscribe(
                keys=[keyspace.queue_registry(tag), keyspace.queue_meta(tag, queue_id)],
                args=[self.ttl_ms, queue_id, "," + ",".join(topics) + ","],
            )
        )
        return queue_id

    async def poll(self, user_id: str, queue_id: str) -> PollResult | None:
        """Consume the queue's pending events (oldest first) and reset its idle timer.

        None when the queue does not exist for this user: unknown, expired or another user's.
        """
        tag = keyspace.user_tag(user_id)
        reply = await guard(
            self._poll(
                keys=[
                    keyspace.queue_registry(tag),
                    keyspace.queue_meta(tag, queue_id),
                    keyspace.queue_stream(tag, queue_id),
                ],
                args=[self.ttl_ms, queue_id, self.max_batch],
            )
        )
        if not reply:
            return None
        previous, cursor, dropped, entries = reply
        return PollResult(
            body=_events_array(entries) if entries else None,
            count=len(entries),
            dropped=int(dropped),
            cursor=cursor.decode(),
            previous=previous.decode(),
        )

    async def rewind(self, user_id: str, queue_id: str, result: PollResult) -> bool:
        """Hand the events of `result` out again on the next poll (its answer was not sent)."""
        tag = keyspace.user_tag(user_id)
        done = await guard(
            self._rewind(
                keys=[keyspace.queue_meta(tag, queue_id)], args=[result.cursor, result.previous]
            )
        )
        return bool(done)

    async def publish(self, user_id: str, events: Sequence[QueueEvent]) -> PublishResult:
        """Append the events to every live queue of the user subscribed to their topic.

        One script stores the whole batch; the wake-up hint for waiting polls is pipelined
        behind it in the same round trip.
        """
        tag = keyspace.user_tag(user_id)
        args: list[Any] = [keyspace.base(tag), self.maxlen, len(events)]
        for e in events:
            args += (e.topic, e.id, e.body)
        pipe = self.redis.pipeline(transaction=False)
        # On a pipeline, awaiting the script only queues it (and its SCRIPT LOAD).
        await self._publish(
            keys=[keyspace.queue_registry(tag), keyspace.event_seq(tag)], args=args, client=pipe
        )
        add_wake(pipe, tag)
        reply = await guard(pipe.execute())
        ids, reached = reply[0]
        return PublishResult(ids=[i.decode() for i in ids], queues=int(reached))

    async def aclose(self) -> None:
        await self.redis.aclose()


def add_wake(pipe: Any, tag: str) -> None:
    """Queue the wake-up hint for `tag` on a pipeline (see hub.Hub)."""
    pipe.xadd(keyspace.WAKE_STREAM, {"t": tag}, maxlen=keyspace.WAKE_MAXLEN, approximate=True)


def _events_array(entries: list[Any]) -> bytes:
    """Build the JSON array from stored entries without decoding them.

    Each entry stores the event id apart from the event body, so the id goes in front of the
    body's own members: {"id":"14","event_type":...}.
    """
    parts = []
    for _entry_id, fields in entries:
        f = dict(zip(fields[::2], fields[1::2], strict=True))
        body: bytes = f[b"e"]
        head = b'{"id":"' + f[b"i"] + b'"'
        parts.append(head + (b"," + body[1:] if body != b"{}" else b"}"))
    return b"[" + b",".join(parts) + b"]"
