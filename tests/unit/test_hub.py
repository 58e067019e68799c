"""The hub's in-process bookkeeping: registration, wake-ups, time-outs, clean exits."""

from __future__ import annotations

import asyncio
import contextlib

import fakeredis
import pytest

from broker import keyspace
from broker.hub import Hub, RedisPyWakeSource


@pytest.fixture
async def hub():
    server = fakeredis.FakeServer()
    h = Hub(fakeredis.FakeAsyncRedis(server=server), block_ms=100)
    await h.start()
    yield h
    await h.aclose()


async def test_waiters_count_while_registered_and_leave_on_exit(hub):
    with hub.watch("u:a") as w1, hub.watch("u:a") as w2:
        assert hub.waiting == 2 and w1 is not w2
    assert hub.waiting == 0 and hub._waiters == {}


async def test_a_cancelled_wait_deregisters(hub):
    async def park():
        with hub.watch("u:a") as w:
            await w.wait(10)

    task = asyncio.ensure_future(park())
    await asyncio.sleep(0.01)
    assert hub.waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert hub.waiting == 0 and hub._waiters == {}


async def test_wake_reaches_only_its_tag(hub):
    with hub.watch("u:a") as a, hub.watch("u:b") as b:
        hub.wake("u:a")
        assert await a.wait(0.5) is True
        assert await b.wait(0.05) is False


async def test_a_wake_before_the_wait_is_kept_until_rearmed(hub):
    with hub.watch("u:a") as w:
        hub.wake("u:a")  # arrives while the waiter is still reading its stream
        assert await w.wait(0.01) is True
        w.arm()
        assert await w.wait(0.05) is False


async def test_hints_on_the_wake_stream_wake_local_waiters(hub):
    with hub.watch("u:a") as w:
        assert isinstance(hub.source, RedisPyWakeSource)
        await hub.source.redis.xadd(keyspace.WAKE_STREAM, {"t": "u:a"})
        assert await w.wait(2) is True
    assert hub.hints >= 1


async def test_release_all_wakes_everyone_and_marks_closing(hub):
    with hub.watch("u:a") as a, hub.watch("u:b") as b:
        hub.release_all()
        assert await a.wait(0.1) and await b.wait(0.1)
        assert hub.closing


async def test_the_reader_starts_after_existing_hints(real_redis):
    """Hints published before start are history: a new waiter is not woken by them."""
    writer = real_redis.client()
    await writer.xadd(keyspace.WAKE_STREAM, {"t": "u:a"})
    late = Hub(real_redis.client(), block_ms=100)
    await late.start()
    with late.watch("u:a") as w:
        assert await w.wait(0.3) is False
        w.arm()
        await writer.xadd(keyspace.WAKE_STREAM, {"t": "u:a"})
        assert await w.wait(2) is True
    await late.aclose()


async def test_a_fired_timer_needs_arm_before_the_next_wait(hub):
    with hub.watch("u:a") as w:
        assert await w.until(0.01) is False
        assert await w.until(5) is False  # still the expired future: no new wait without arm
        w.arm()
        hub.wake("u:a")
        assert await w.until(5) is True


def _scheduled(hub: Hub) -> int:
    return sum(len(bucket) for bucket in hub._buckets.values())


async def test_wake_and_exit_take_the_waiter_out_of_its_deadline_bucket(hub):
    with hub.watch("u:a") as w:
        w.until(30)
        assert _scheduled(hub) == 1
        hub.wake("u:a")
        assert _scheduled(hub) == 0
    with hub.watch("u:b") as w2:
        w2.until(30)
        assert _scheduled(hub) == 1
    assert _scheduled(hub) == 0


async def test_many_waiters_share_one_loop_timer_and_expire_in_deadline_order(hub):
    loop = asyncio.get_running_loop()
    scheduled: list[asyncio.TimerHandle] = loop._scheduled  # type: ignore[attr-defined]
    before = len([h for h in scheduled if not h.cancelled()])
    waits = [0.05, 0.2, 0.03, 0.1, 0.2]
    with contextlib.ExitStack() as stack:
        waiters = [stack.enter_context(hub.watch(f"u:{i}")) for i in range(len(waits))]
        started = loop.time()
        futures = [w.until(t) for w, t in zip(waiters, waits, strict=True)]
        assert len([h for h in scheduled if not h.cancelled()]) == before + 1
        done_at: dict[int, float] = {}
        for i, f in enumerate(futures):
            f.add_done_callback(lambda _f, i=i: done_at.setdefault(i, loop.time() - started))
        results = await asyncio.gather(*futures)
    assert results == [False] * len(waits)
    for i, t in enumerate(waits):
        assert done_at[i] >= t  # never early
    order = sorted(range(len(waits)), key=lambda i: done_at[i])
    assert [waits[i] for i in order] == sorted(waits)
    assert hub._buckets == {} and hub._ticks == []


async def test_an_earlier_deadline_rearms_the_timer(hub):
    with hub.watch("u:late") as late, hub.watch("u:early") as early:
        slow = late.until(5)
        fast = early.until(0.02)
        assert await asyncio.wait_for(fast, 1) is False
        assert not slow.done()


async def test_several_waiters_on_one_tag_all_wake_and_unregister(hub):
    with hub.watch("u:a") as a:
        with hub.watch("u:a") as b, hub.watch("u:a") as c:
            assert hub.waiting == 3
            futures = [w.until(5) for w in (a, b, c)]
            hub.wake("u:a")
            assert [await f for f in futures] == [True, True, True]
        assert hub.waiting == 1 and hub._waiters == {"u:a": a}
    assert hub.waiting == 0 and hub._waiters == {}


async def test_a_deadline_bucket_goes_when_its_last_waiter_leaves(hub):
    with hub.watch("u:a") as a, hub.watch("u:b") as b:
        a.until(30)
        b.until(30.5)
        assert len(hub._buckets) == 2
        hub.wake("u:a")
        assert len(hub._buckets) == 1
    assert hub._buckets == {}


async def test_rewaking_one_waiter_does_not_grow_the_deadline_heap(hub):
    """A poll woken again and again (hints with no data for it) keeps one deadline."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    with hub.watch("u:a") as w:
        for _ in range(1000):
            w.arm()
            w.until(deadline - loop.time())
            hub.wake("u:a")
        assert len(hub._ticks) <= 2


async def test_deadlines_of_vanished_waiters_do_not_outlive_them(hub):
    """A mass disconnect leaves no stale ticks behind until their deadlines pass.

    They are small objects made while the polls arrived; kept, they pinned ~75 MB of
    allocator arenas for a whole poll's maximum wait (bench: memory after vanish).
    """
    with contextlib.ExitStack() as stack:
        waiters = [stack.enter_context(hub.watch(f"u:{i}")) for i in range(500)]
        for i, w in enumerate(waiters):
            w.until(30 + i * 0.02)  # 500 distinct 10 ms buckets
        assert len(hub._buckets) == 500
        with hub.watch("u:stays") as stays:
            stays.until(60)
            stack.close()  # the 500 clients vanish
            assert list(hub._buckets) == [stays._tick]
            assert len(hub._ticks) <= 64 + 4 and len(hub._in_heap) == len(hub._ticks)
            assert stays._tick in hub._ticks
    assert hub.waiting == 0


async def test_a_waiter_still_expires_after_the_heap_is_rebuilt(hub):
    with contextlib.ExitStack() as stack:
        waiters = [stack.enter_context(hub.watch(f"u:{i}")) for i in range(300)]
        for i, w in enumerate(waiters):
            w.until(0.2 + i * 0.02)
        with hub.watch("u:stays") as stays:
            fired = stays.until(0.1)  # earlier than all of them: the armed timer's tick
            stack.close()  # the heap is rebuilt from the one live bucket
            assert len(hub._ticks) < 300
            assert await asyncio.wait_for(fired, 2) is False  # expired, not stuck


def test_the_deadline_timer_does_not_spin_under_uvloop():
    """uvloop rounds timers to whole milliseconds and fires up to half of one early; the hub's
    timer must not re-arm in a busy loop until its tick is due (it did: ~48 runs a tick)."""
    import random

    import uvloop  # installed with the `fast` extra, as `make` does

    async def scenario() -> tuple[int, int]:
        hub = Hub(fakeredis.FakeAsyncRedis(), block_ms=100)
        runs = 0
        real = hub._expire_due

        def counting(loop: asyncio.AbstractEventLoop) -> None:
            nonlocal runs
            runs += 1
            real(loop)

        hub._expire_due = counting  # type: ignore[method-assign]
        rng = random.Random(7)
        with contextlib.ExitStack() as stack:
            waiters = [stack.enter_context(hub.watch(f"u:{i}")) for i in range(200)]
            futures = [w.until(rng.uniform(0.05, 0.4)) for w in waiters]
            ticks = len(hub._buckets)
            assert await asyncio.gather(*futures) == [False] * 200
        return runs, ticks

    runs, ticks = uvloop.run(scenario())
    assert runs <= ticks + 5
