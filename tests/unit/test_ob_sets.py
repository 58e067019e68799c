"""SetStore and its two scripts, on fakeredis and on a real server (`redis_pair`)."""

from __future__ import annotations

import asyncio

import pytest

from broker import keyspace
from broker.sets import NO_SUBSCRIPTION, NOT_SUBSCRIBED, NOTHING, QUEUED, SetStore, SignedSet

RU = ("UK.OBIE.Resource-Update",)
CAR = ("UK.OBIE.Consent-Authorization-Revoked",)


@pytest.fixture
async def redis(redis_pair):
    return redis_pair.client()


async def subscribe(redis, client_id, types="*"):
    key = keyspace.subscription(keyspace.client_tag(client_id))
    await redis.hset(key, mapping={"id": "s1", "version": "3.1", "types": types})


def signed(*names, codes=RU):
    return [SignedSet(n, f"h.{n}.s", codes) for n in names]


async def test_publish_queues_only_with_a_matching_subscription(redis):
    store = SetStore(redis, retention_s=3600, redelivery_s=0)
    out = await store.publish("c", signed("a"))
    assert out.flags == [NO_SUBSCRIPTION]
    await subscribe(redis, "c", ",UK.OBIE.Resource-Update,")
    out = await store.publish(
        "c", signed("b") + signed("x", codes=CAR) + signed("y", codes=RU + CAR)
    )
    assert out.flags == [QUEUED, NOT_SUBSCRIBED, QUEUED]
    assert await store.pending("c") == 2


async def test_publish_appends_a_wake_hint_for_the_client(redis):
    store = SetStore(redis, retention_s=3600, redelivery_s=0)
    await store.publish("tpp/{x}", signed("a"))
    (entry,) = await redis.xrange(keyspace.WAKE_STREAM)
    assert entry[1][b"t"].decode() == keyspace.client_tag("tpp/{x}")


async def test_order_is_publish_order_even_within_one_millisecond(redis):
    await subscribe(redis, "c")
    store = SetStore(redis, retention_s=3600, redelivery_s=0)
    names = [f"j{i:03d}" for i in range(300)]
    # Random-looking jtis sort differently from their publish order; the order score decides.
    names.reverse()
    await store.publish("c", signed(*names[:150]))
    await store.publish("c", signed(*names[150:]))
    out = await store.poll("c", limit=1000)
    assert list(out.sets) == names


async def test_poll_acks_nacks_and_reports_counts(redis):
    await subscribe(redis, "c")
    store = SetStore(redis, retention_s=3600, redelivery_s=0)
    await store.publish("c", signed("a", "b", "c", "d"))
    out = await store.poll(
        "c", limit=1, ack=["a", "zz"], set_errs={"b": ("invalid_key", 'has "quotes"')}
    )
    assert (out.acked, out.nacked, out.expired) == (1, 1, 0)
    assert out.sets == {"c": "h.c.s"}
    assert out.more is True
    nacked = await store.nacked("c")
    assert nacked["b"]["set"] == "h.b.s"
    assert nacked["b"]["description"] == 'has "quotes"'
    assert isinstance(nacked["b"]["at"], int)
    ttl = await redis.pttl(keyspace.sets_nacked(keyspace.client_tag("c")))
    assert 0 < ttl <= 3600 * 1000
    # Nacking again, or acking a nacked SET, changes nothing.
    out = await store.poll("c", limit=10, ack=["b"], set_errs={"b": ("x", "y")})
    assert (out.acked, out.nacked) == (0, 0)
    assert list(out.sets) == ["c", "d"]


async def test_a_poll_that_changed_and_found_nothing_shares_one_empty_outcome(redis):
    """A parked poll holds its last outcome while it waits: not one of its own each."""
    await subscribe(redis, "c")
    store = SetStore(redis, retention_s=3600, redelivery_s=0)
    first, second = await store.poll("c", limit=10), await store.poll("c", limit=10)
    assert first is second is NOTHING
    assert (first.sets, first.more, first.next_lease_s) == ({}, False, None)
    assert (first.acked, first.nacked, first.expired) == (0, 0, 0)
    await store.publish("c", signed("a"))
    out = await store.poll("c", limit=10)
    assert out is not NOTHING and out.sets == {"a": "h.a.s"}
    # an ack is news too, even when nothing is left to select
    acked = await store.poll("c", limit=10, ack=["a"])
    assert acked is not NOTHING and acked.acked == 1 and acked.sets == {}
    assert NOTHING.sets == {}  # never written to by the polls above


async def test_limit_zero_selects_nothing_but_reports_more(redis):
    await subscribe(redis, "c")
    store = SetStore(redis, retention_s=3600, redelivery_s=0)
    await store.publish("c", signed("a"))
    out = await store.poll("c", limit=0)
    assert out.sets == {}
    assert out.more is True


async def test_retention_drops_old_unacked_sets_and_counts_them(redis):
    await subscribe(redis, "c")
    store = SetStore(redis, retention_s=60, redelivery_s=0)
    await store.publish("c", signed("old", "new"))
    tag = keyspace.client_tag("c")
    # Age "old" by two minutes: its order score is its publish time in ms * 1000.
    score = await redis.zscore(keyspace.sets_all(tag), "old")
    aged = score - 120_000 * 1000
    await redis.zadd(keyspace.sets_all(tag), {"old": aged})
    await redis.zadd(keyspace.sets_ready(tag), {"old": aged})
    out = await store.poll("c", limit=10)
    assert out.expired == 1
    assert list(out.sets) == ["new"]
    assert await redis.hexists(keyspace.sets_jws(tag), "old") == 0


async def test_publish_also_applies_the_retention(redis):
    await subscribe(redis, "c")
    store = SetStore(redis, retention_s=60, redelivery_s=0)
    await store.publish("c", signed("old"))
    tag = keyspace.client_tag("c")
    await redis.zadd(keyspace.sets_all(tag), {"old": 1})
    out = await store.publish("c", signed("new"))
    assert out.expired == 1
    assert await store.pending("c") == 1


async def test_lease_holds_a_delivered_set_back_then_redelivers_it(redis):
    await subscribe(redis, "c")
    store = SetStore(redis, retention_s=3600, redelivery_s=0.3)
    await store.publish("c", signed("a", "b"))
    out = await store.poll("c", limit=1)
    assert list(out.sets) == ["a"]
    assert out.more is True
    assert out.next_lease_s is not None and 0 < out.next_lease_s <= 0.3
    out = await store.poll("c", limit=10)
    assert list(out.sets) == ["b"]
    assert out.more is False
    assert (await store.poll("c", limit=10)).sets == {}
    await asyncio.sleep(0.4)
    out = await store.poll("c", limit=10, ack=["b"])
    assert list(out.sets) == ["a"]  # back in its original place, "b" acked meanwhile
    assert out.acked == 1


async def test_ack_of_a_leased_set_removes_it(redis):
    await subscribe(redis, "c")
    store = SetStore(redis, retention_s=3600, redelivery_s=30)
    await store.publish("c", signed("a"))
    await store.poll("c", limit=1)
    out = await store.poll("c", limit=1, ack=["a"])
    assert out.acked == 1
    assert out.next_lease_s is None
    assert await store.pending("c") == 0


async def test_a_client_cannot_touch_another_clients_sets(redis):
    await subscribe(redis, "a")
    await subscribe(redis, "b")
    store = SetStore(redis, retention_s=3600, redelivery_s=0)
    await store.publish("a", signed("x"))
    out = await store.poll("b", limit=10, ack=["x"], set_errs={"x": ("e", "d")})
    assert (out.acked, out.nacked, out.sets) == (0, 0, {})
    assert list((await store.poll("a", limit=10)).sets) == ["x"]


async def test_large_selection_is_chunked(redis):
    await subscribe(redis, "c")
    store = SetStore(redis, retention_s=3600, redelivery_s=1)
    names = [f"j{i:05d}" for i in range(1200)]
    await store.publish("c", signed(*names))
    out = await store.poll("c", limit=1200)
    assert list(out.sets) == names
    assert (await store.poll("c", limit=1200)).sets == {}


@pytest.mark.parametrize(
    ("flat", "more"),
    [
        ([], False),
        ([b"j1", b"h.p.s"], False),
        ([b"j1", b"h.p.s", b"6f1c-2a", b"eyJh.eyJz.c2ln_-"], True),
    ],
)
def test_a_poll_answer_is_the_json_of_its_sets(flat, more):
    from broker import jsonutil
    from broker.sets import PollOutcome

    out = PollOutcome(flat=flat, more=more, acked=0, nacked=0, expired=0, next_lease_s=None)
    expected = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
    assert out.count == len(expected)
    assert out.sets == expected
    assert jsonutil.loads(out.body()) == {"sets": expected, "moreAvailable": more}
    assert out.body() == jsonutil.dumps({"sets": expected, "moreAvailable": more})


@pytest.mark.parametrize(
    ("jti", "jws"),
    [('a"b', "h.p.s"), ("a", 'h.p"x.s'), ("a", "h.p.s\\"), ("a b", "h.p.s"), ("", "h")],
)
async def test_publish_refuses_what_a_poll_could_not_put_in_json_unescaped(redis, jti, jws):
    await subscribe(redis, "c")
    store = SetStore(redis, retention_s=3600, redelivery_s=0)
    with pytest.raises(ValueError, match="base64url"):
        await store.publish("c", [SignedSet(jti, jws, RU)])
    assert await store.pending("c") == 0


async def test_the_poll_script_names_the_clients_keys_as_keyspace_does(redis):
    """sets_poll.lua is given one key and names the others: the same names as keyspace.py."""
    await subscribe(redis, "tpp/{1}")
    store = SetStore(redis, retention_s=3600, redelivery_s=30)
    await store.publish("tpp/{1}", signed("a", "b", "c"))
    out = await store.poll("tpp/{1}", limit=1, set_errs={"b": ("invalid_key", "no")})
    assert (list(out.sets), out.nacked) == (["a"], 1)  # "a" leased, "b" nacked, "c" ready
    tag = keyspace.client_tag("tpp/{1}")
    assert await redis.zrange(keyspace.sets_all(tag), 0, -1) == [b"a", b"c"]
    assert await redis.zrange(keyspace.sets_ready(tag), 0, -1) == [b"c"]
    assert await redis.zrange(keyspace.sets_leased(tag), 0, -1) == [b"a"]
    assert sorted(await redis.hkeys(keyspace.sets_jws(tag))) == [b"a", b"c"]
    assert await redis.hkeys(keyspace.sets_nacked(tag)) == [b"b"]
    names = {
        k.decode()
        async for k in redis.scan_iter(match=keyspace.base(tag).replace("{", "[{]") + "*")
    }
    assert names == {
        keyspace.sets_all(tag),
        keyspace.sets_ready(tag),
        keyspace.sets_leased(tag),
        keyspace.sets_jws(tag),
        keyspace.sets_seq(tag),
        keyspace.sets_nacked(tag),
        keyspace.subscription(tag),
    }
