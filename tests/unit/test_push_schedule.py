"""The two-level push schedule (push_claim.lua, push_set.lua), on fakeredis and a real server.

The invariant every script keeps: a TPP's score among the TPPs is its queue's lowest score,
and a TPP with an empty queue is not there at all (keyspace.py).
"""

from __future__ import annotations

import random
import time

import pytest

from broker import keyspace


@pytest.fixture
async def redis(redis_pair):
    return redis_pair.client()


class Schedule:
    def __init__(self, redis) -> None:
        self.redis = redis
        self.claim_script = redis.register_script(keyspace.lua("push_claim"))
        self.set_script = redis.register_script(keyspace.lua("push_set"))

    async def put(self, client: str, at: int | str, *jtis: str, held: int | str = "") -> None:
        keys = [keyspace.PUSH_TPPS, keyspace.push_queue(client), keyspace.PUSH_TRIES]
        await self.set_script(keys=keys, args=[client, at, held, *jtis])

    async def claim(self, now: int, lease_ms: int, room: int, cap: int = 4, **busy: int):
        args: list[str | int] = [now, lease_ms, room, cap]
        for client, n in busy.items():
            args += [client, n]
        got = await self.claim_script(keys=[keyspace.PUSH_TPPS], args=args)
        return [(_s(c), _s(j)) for c, j in zip(got[::2], got[1::2], strict=True)]

    async def check_invariant(self) -> None:
        tpps = {
            _s(m): s for m, s in await self.redis.zrange(keyspace.PUSH_TPPS, 0, -1, withscores=True)
        }
        queues = [_s(k) for k in await self.redis.keys(keyspace.push_queue("*"))]
        assert sorted(keyspace.push_queue(c) for c in tpps) == sorted(queues)
        for client, score in tpps.items():
            lowest = await self.redis.zrange(keyspace.push_queue(client), 0, 0, withscores=True)
            assert lowest[0][1] == score, client


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v


async def test_a_lease_holds_a_claimed_push_and_it_is_claimed_again_once_over(redis):
    s = Schedule(redis)
    now = int(time.time() * 1000)
    await s.put("tpp-a", now, "j1", "j2")
    assert await s.claim(now, 200, room=1) == [("tpp-a", "j1")]
    await s.check_invariant()  # tpp-a's score is j2's: still due
    assert await s.claim(now, 200, room=1) == [("tpp-a", "j2")]
    await s.check_invariant()  # now the lease end
    assert await s.claim(now + 100, 200, room=8) == []  # both held
    # The worker died: no done, no retry. Once the lease is over both are due again.
    assert sorted(await s.claim(now + 201, 200, room=8)) == [("tpp-a", "j1"), ("tpp-a", "j2")]
    await s.put("tpp-a", "", "j1", "j2")  # pushed
    await s.check_invariant()
    assert await redis.zcard(keyspace.PUSH_TPPS) == 0


async def test_a_retry_moves_a_set_only_while_its_claim_still_holds_it(redis):
    s = Schedule(redis)
    now = int(time.time() * 1000)
    await s.put("tpp-a", now, "j1")
    assert await s.claim(now, 100, room=1) == [("tpp-a", "j1")]  # worker 1, held until now+100
    # Its attempt outlived the lease; worker 2 took the SET over.
    assert await s.claim(now + 150, 100, room=1) == [("tpp-a", "j1")]
    await s.put("tpp-a", now + 5000, "j1", held=now + 100)  # worker 1's retry: ignored
    assert await redis.zscore(keyspace.push_queue("tpp-a"), "j1") == now + 250
    await s.put("tpp-a", now + 5000, "j1", held=now + 250)  # worker 2's retry: moves it
    assert await redis.zscore(keyspace.push_queue("tpp-a"), "j1") == now + 5000
    await s.check_invariant()


async def test_tpps_at_their_cap_are_passed_over_however_many(redis):
    # Seven TPPs at their cap, each with due SETs older than B's: a claim with room for 4
    # looks past all seven (room + those at the cap) and finds B.
    s = Schedule(redis)
    now = int(time.time() * 1000)
    busy = {f"hung{i}": 4 for i in range(7)}
    for i, client in enumerate(busy):
        await s.put(client, now - 1000 + i, *(f"{client}-{k}" for k in range(50)))
    await s.put("tpp-b", now, "b1")
    assert await s.claim(now, 30_000, room=4, **busy) == [("tpp-b", "b1")]
    await s.check_invariant()


async def test_a_claim_takes_no_more_of_a_tpp_than_its_free_slots(redis):
    s = Schedule(redis)
    now = int(time.time() * 1000)
    await s.put("tpp-a", now, *(f"a{k}" for k in range(10)))
    await s.put("tpp-b", now + 1, "b1", "b2")
    got = await s.claim(now + 1, 30_000, room=32, **{"tpp-a": 3})
    assert [c for c, _ in got].count("tpp-a") == 1 and [c for c, _ in got].count("tpp-b") == 2
    await s.check_invariant()


async def test_the_invariant_holds_under_a_random_mix_of_steps(redis):
    rng = random.Random(7)
    s = Schedule(redis)
    now = int(time.time() * 1000)
    clients = ["a", "b\nc", "}{", "tpps", "é"]
    for step in range(300):
        client = rng.choice(clients)
        jtis = [f"j{rng.randrange(20)}" for _ in range(rng.randrange(1, 4))]
        op = rng.random()
        if op < 0.1:
            await s.put(client, now + rng.randrange(-50, 50), *jtis, held=now + step - 100)
        elif op < 0.4:
            await s.put(client, now + rng.randrange(-50, 50), *jtis)
        elif op < 0.6:
            await s.put(client, "", *jtis)
        else:
            busy = {c: rng.randrange(5) for c in rng.sample(clients, 2)}
            args: list[str | int] = [now + step, 100, rng.randrange(1, 8), 4]
            for c, n in busy.items():
                args += [c, n]
            await s.claim_script(keys=[keyspace.PUSH_TPPS], args=args)
        if step % 25 == 0:
            await s.check_invariant()
    await s.check_invariant()
