"""QueueStore scripts, on fakeredis and a real server: the retry-safety of every script."""

from __future__ import annotations

import dataclasses
import socket

import pytest

from broker import keyspace
from broker.config import RedisSettings
from broker.errors import StoreUnavailable
from broker.oxlin import encode_events
from broker.redisconn import create_command_client
from broker.store import NOTHING, QueueStore, guard, idempotent
from tests.oxlin_helpers import connection_event


@pytest.fixture
def store(redis_pair):
    return QueueStore(redis_pair.client(), ttl_s=60, maxlen=100, max_batch=2)


def _events(n):
    return encode_events(
        [connection_event(event_type=f"E{i}") for i in range(n)],
        ["connections"],
        max_event_bytes=65536,
        max_batch=100,
    )


async def test_empty_reads_share_one_result(store):
    """A parked poll holds its last (empty) result while it waits: not one of its own each."""
    qid = await store.subscribe("u1", ["connections"])
    first, second = await store.poll("u1", qid), await store.poll("u1", qid)
    assert first is second is NOTHING
    assert (first.body, first.count, first.dropped) == (None, 0, 0)
    await store.publish("u1", _events(1))
    read = await store.poll("u1", qid)
    assert read is not NOTHING and read.count == 1 and read.token  # its own, to rewind by


async def test_a_repeated_poll_token_is_served_the_same_events(store):
    qid = await store.subscribe("u1", ["connections"])
    await store.publish("u1", _events(3))
    keys = [keyspace.queue_registry(keyspace.user_tag("u1"))]  # the script names the rest
    first = await store.runner.run(store._poll, keys, [60000, qid, 2, "tok1"])
    again = await store.runner.run(store._poll, keys, [60000, qid, 2, "tok1"])
    assert [e[0] for e in first[1]] == [e[0] for e in again[1]] and len(first[1]) == 2
    nxt = await store.runner.run(store._poll, keys, [60000, qid, 2, "tok2"])
    assert len(nxt[1]) == 1 and nxt[1][0][0] not in {e[0] for e in first[1]}


async def test_batch_cap_returns_the_rest_on_the_next_poll(store):
    qid = await store.subscribe("u1", ["connections"])
    await store.publish("u1", _events(3))
    a = await store.poll("u1", qid)
    b = await store.poll("u1", qid)
    c = await store.poll("u1", qid)
    assert (a.count, b.count, c.count) == (2, 1, 0) and c.body is None


async def test_publish_with_the_same_key_stores_once(store):
    qid = await store.subscribe("u1", ["connections"])
    first = await store.publish("u1", _events(2), idempotency_key="k1")
    second = await store.publish("u1", _events(2), idempotency_key="k1")
    assert first == second and first.queues == 1
    assert (await store.poll("u1", qid)).count == 2
    assert (await store.poll("u1", qid)).count == 0


async def test_poll_of_unknown_queue_is_none_and_creates_nothing(store):
    assert await store.poll("u1", "nope") is None
    assert await store.redis.keys("brk:{u:u1}:q*") == []


async def test_expired_queues_leave_the_registry_on_publish(store, redis_pair):
    qid = await store.subscribe("u1", ["connections"])
    tag = keyspace.user_tag("u1")
    await store.redis.delete(keyspace.queue_meta(tag, qid))  # as if it had expired
    result = await store.publish("u1", _events(1))
    assert result.queues == 0
    assert await store.redis.zcard(keyspace.queue_registry(tag)) == 0


async def test_poll_refreshes_the_expiry_of_every_queue_key(store):
    # Also the check that queue_poll.lua names the meta hash and stream as keyspace.py does.
    qid = await store.subscribe("u1", ["connections"])
    await store.publish("u1", _events(1))
    tag = keyspace.user_tag("u1")
    for key in (keyspace.queue_meta(tag, qid), keyspace.queue_stream(tag, qid)):
        await store.redis.pexpire(key, 5000)
    await store.poll("u1", qid)
    for key in (
        keyspace.queue_meta(tag, qid),
        keyspace.queue_stream(tag, qid),
        keyspace.queue_registry(tag),
    ):
        assert 55_000 < await store.redis.pttl(key) <= 60_000, key


async def test_publish_reloads_its_script_after_a_script_flush(store):
    """A restarted or flushed Redis forgets scripts: NOSCRIPT means it did not run; reload."""
    qid = await store.subscribe("u1", ["connections"])
    await store.redis.script_flush()
    result = await store.publish("u1", _events(2))
    assert result.queues == 1 and len(result.ids) == 2
    assert (await store.poll("u1", qid)).count == 2


async def test_answered_events_leave_the_stream_one_poll_later(store):
    """Kept for one more poll (so a lost answer can be rewound), then trimmed away."""
    qid = await store.subscribe("u1", ["connections"])
    stream = keyspace.queue_stream(keyspace.user_tag("u1"), qid)
    await store.publish("u1", _events(3))
    a = await store.poll("u1", qid)
    assert a.count == 2 and await store.redis.xlen(stream) == 3
    b = await store.poll("u1", qid)
    assert b.count == 1 and await store.redis.xlen(stream) == 1  # a's two are gone
    assert await store.rewind("u1", qid, b.token)
    again = await store.poll("u1", qid)
    assert again.body == b.body  # the rewound event, served again
    assert (await store.poll("u1", qid)).count == 0
    assert await store.redis.xlen(stream) == 0
    assert (await store.poll("u1", qid)).count == 0  # nothing left to trim: still fine
    await store.publish("u1", _events(1))
    assert (await store.poll("u1", qid)).count == 1


async def test_a_pool_with_no_free_connection_says_busy_not_unavailable(real_redis):
    """redis-py reports a pool wait that timed out as "No connection available.": the 503
    must point at the pool, not at Redis (which answers fine here)."""
    settings = dataclasses.replace(RedisSettings(), max_connections=1, socket_timeout_s=0.2)
    client = create_command_client(real_redis.url, settings)
    try:
        held = await client.connection_pool.get_connection()  # the pool's only connection
        with pytest.raises(StoreUnavailable, match="Redis busy: no pooled connection"):
            await guard(client.ping())
        # A retry-safe call is not retried then: it would only wait as long again.
        calls = []

        def ping():
            calls.append(1)
            return client.ping()

        with pytest.raises(StoreUnavailable, match="Redis busy"):
            await idempotent(ping)
        assert len(calls) == 1
        await client.connection_pool.release(held)
        assert await guard(client.ping())  # free again: served
    finally:
        await client.aclose(close_connection_pool=True)  # the pool was handed to the client


async def test_redis_that_cannot_be_reached_is_still_reported_unavailable():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = dataclasses.replace(RedisSettings(), socket_timeout_s=0.5)
    client = create_command_client(f"redis://127.0.0.1:{port}/0", settings)
    try:
        with pytest.raises(StoreUnavailable, match="Redis unavailable"):
            await guard(client.ping())
    finally:
        await client.aclose(close_connection_pool=True)  # the pool was handed to the client
