"""QueueStore: the Oxlin queues kept as Redis streams (subscribe, publish, poll, rewind).

Raw Redis stays behind this class; redis-py errors become StoreError / StoreUnavailable here.
"""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.exceptions
from redis.asyncio import Redis

from broker import ids, keyspace
from broker.errors import StoreError, StoreUnavailable
from broker.resp import Arg, number
from broker.scripts import RedisPyRunner, Script, ScriptRunner

T = TypeVar("T")


# Poll tokens only need to differ between polls of one queue: a random per-process prefix
# and a counter, cheaper than fresh random bytes on every poll.
_TOKEN_PREFIX = secrets.token_hex(6)
_token_counter = itertools.count()


def new_poll_token() -> str:
    return f"{_TOKEN_PREFIX}{next(_token_counter):x}"


UNAVAILABLE = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)
# Lifetime of the record that makes a publish safe to retry when no Idempotency-Key is given.
RETRY_RECORD_S = 60


async def guard(call: Awaitable[T]) -> T:
    """Await a Redis call, turning redis-py's errors into the broker's."""
    try:
        return await call
    except UNAVAILABLE as e:
        raise _unavailable(e) from e
    except redis.exceptions.RedisError as e:
        raise StoreError(f"Redis error: {e}") from e


def _unavailable(e: BaseException) -> StoreUnavailable:
    if _pool_exhausted(e):
        # Neutral on the cause: the pool's wait has the commands' time-out, so a Redis that
        # stopped answering also leaves the requests queued behind it here.
        return StoreUnavailable(
            "Redis busy: no pooled connection came free within redis.socket_timeout_s (all"
            " in use: redis.max_connections too small for the load, or Redis slow to answer)"
        )
    return StoreUnavailable(f"Redis unavailable: {e}")


def fail_if_busy(e: BaseException) -> None:
    """Before retrying a call that failed on its connection: if the pool had none free, a
    retry would only wait as long again for the same pool; fail now instead."""
    if _pool_exhausted(e):
        raise _unavailable(e) from e


def _pool_exhausted(e: BaseException) -> bool:
    """redis-py's BlockingConnectionPool gave up waiting for a free connection.

    It says so as a ConnectionError ("No connection available.") raised from its wait's
    time-out, which reads like an outage in a 503 or a log: an SRE would look at Redis,
    when the cause is this process's pool being too small for a burst of requests.
    """
    # The message too: a connect that timed out can be a ConnectionError from a TimeoutError.
    return (
        isinstance(e, redis.exceptions.ConnectionError)
        and isinstance(e.__cause__, TimeoutError)
        and str(e) == "No connection available."
    )


async def idempotent(call: Callable[[], Awaitable[T]]) -> T:
    """Run a call that is safe to repeat, retrying once if the connection failed.

    redis-py does not notice that the server closed an idle pooled connection (a Redis
    restart, an idle time-out): the first command on it fails. The clients are built without
    automatic retries because a blind retry can store an event twice; the scripts called
    through here are written to be repeated (tokens, compare-and-set), so one retry on a
    fresh connection is safe.
    """
    try:
        return await call()
    except UNAVAILABLE as e:
        fail_if_busy(e)
    return await guard(call())


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, and one is made per request
class PollResult:
    """What one consuming read of a queue returned."""

    body: bytes | None  # JSON array of the events, or None when there were none
    count: int
    dropped: int  # events lost to the stream cap since the previous poll
    token: str  # names this poll, for rewind()


# The result of every read that found nothing: never changed by its users. Its token is empty
# because there is nothing to rewind (rewind() is only called for results with a body).
NOTHING = PollResult(body=None, count=0, dropped=0, token="")


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, and one is made per request
class PublishResult:
    ids: list[str]
    queues: int


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, and one is made per request
class QueueEvent:
    """An event ready to store: its topic, an optional producer id, its JSON body without id."""

    topic: str
    id: str
    body: bytes


class QueueStore:
    def __init__(
        self,
        redis: Redis,
        *,
        ttl_s: int,
        maxlen: int,
        max_batch: int,
        idempotency_ttl_s: int = 86400,
        runner: ScriptRunner | None = None,
    ) -> None:
        self.redis = redis
        # Scripts go through the runner (the pipelined RespClient in the server);
        # `redis` serves everything else.
        self.runner: ScriptRunner = runner or RedisPyRunner(redis)
        self.idempotency_ttl_s = idempotency_ttl_s
        self.ttl_ms = ttl_s * 1000
        self.maxlen = maxlen
        self.max_batch = max_batch
        # Sent with every poll: encoded once (resp.number).
        self._ttl_arg, self._batch_arg = number(self.ttl_ms), number(max_batch)
        self._subscribe = Script.load("queue_subscribe")
        self._poll = Script.load("queue_poll")
        self._rewind = Script.load("queue_rewind")
        self._publish = Script.load("queue_publish")

    async def subscribe(self, user_id: str, topics: Sequence[str]) -> str:
        """Create a queue for the user; returns its id (128 random bits, URL-safe)."""
        queue_id = secrets.token_urlsafe(16)
        tag = keyspace.user_tag(user_id)
        # The id is chosen here, so a retried script creates the same queue again.
        await idempotent(
            lambda: self.runner.run(
                self._subscribe,
                [keyspace.queue_registry(tag), keyspace.queue_meta(tag, queue_id)],
                [self.ttl_ms, queue_id, "," + ",".join(topics) + ","],
            )
        )
        return queue_id

    async def poll(
        self, user_id: str, queue_id: str, token: str | None = None
    ) -> PollResult | None:
        """Consume the queue's pending events (oldest first) and reset its idle timer.

        None when the queue does not exist for this user: unknown, expired or another user's.
        `token` (see new_poll_token) names the poll, so it can be undone with rewind() even
        when its reply was never seen.
        """
        tag = keyspace.user_tag(user_id)
        token = token or new_poll_token()
        # One key: the script names the queue's meta and stream after it (keyspace.py).
        keys = [keyspace.queue_registry(tag)]
        args: list[Arg] = [self._ttl_arg, queue_id, self._batch_arg, token]
        # idempotent() by hand: no closure and no extra coroutine on every poll.
        try:
            reply = await self.runner.run(self._poll, keys, args)
        except UNAVAILABLE as e:
            fail_if_busy(e)
            reply = await guard(self.runner.run(self._poll, keys, args))
        if not reply:
            return None
        dropped, entries = reply
        if not entries and not int(dropped):
            # Shared: a parked poll holds its last (empty) result for as long as it waits.
            return NOTHING
        return PollResult(
            body=_events_array(entries) if entries else None,
            count=len(entries),
            dropped=int(dropped),
            token=token,
        )

    async def rewind(self, user_id: str, queue_id: str, token: str) -> bool:
        """Hand the events of poll `token` out again on the next poll (its answer was lost).

        Does nothing if that poll never ran, was already rewound, or a later poll followed.
        """
        tag = keyspace.user_tag(user_id)
        done = await idempotent(
            lambda: self.runner.run(self._rewind, [keyspace.queue_meta(tag, queue_id)], [token])
        )
        return bool(done)

    async def publish(
        self, user_id: str, events: Sequence[QueueEvent], *, idempotency_key: str | None = None
    ) -> PublishResult:
        """Append the events to every live queue of the user subscribed to their topic.

        One script stores the whole batch; the wake-up hint for waiting polls is pipelined
        behind it in the same round trip. With `idempotency_key`, a repeated request (the
        producer retrying after a lost answer) gets the first answer and stores nothing.
        """
        tag = keyspace.user_tag(user_id)
        if idempotency_key is None:
            token, keep_s = "auto:" + ids.token_hex(), RETRY_RECORD_S
        else:
            token, keep_s = "key:" + idempotency_key, self.idempotency_ttl_s
        args: list[Any] = [keyspace.base(tag), self.maxlen, len(events)]
        for e in events:
            args += (e.topic, e.id, e.body)
        args.append(keep_s)
        keys = [
            keyspace.queue_registry(tag),
            keyspace.event_seq(tag),
            keyspace.publish_record(tag, token),
        ]

        event_ids, reached = await idempotent(
            lambda: self.runner.run_with_wake(self._publish, keys, args, tag)
        )
        return PublishResult(ids=[i.decode() for i in event_ids], queues=int(reached))

    async def aclose(self) -> None:
        await self.runner.aclose()
        # The pool was handed to the client, so the client does not close it by default.
        await self.redis.aclose(close_connection_pool=True)


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
