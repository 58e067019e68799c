"""The GC policy: survivors frozen periodically, collections timed for /metrics."""

from __future__ import annotations

import asyncio
import gc

import pytest

from broker import ids
from broker.gcstats import GcPolicy, GcStats


@pytest.fixture(autouse=True)
def restore_gc():
    yield
    gc.unfreeze()


def test_stats_time_each_collection_per_generation():
    stats = GcStats().install()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        stats.uninstall()
    assert stats.count[0] >= 1 and stats.count[2] >= 1
    assert stats.max_seconds[2] > 0
    gauges = stats.gauges()
    assert gauges['gc_collections_total{generation="2"}'] == stats.count[2]
    assert not any("frozen" in k for k in gauges)  # counting them walks every frozen object


async def test_policy_freezes_survivors_and_runs_the_maintenance_collection():
    gc.unfreeze()
    before = gc.get_freeze_count()
    keep = [[i] for i in range(5000)]  # survivors: tracked containers
    policy = GcPolicy(freeze_interval_s=0.05, full_interval_s=0.12, check_interval_s=0.05)
    policy.start()
    await asyncio.sleep(0.4)
    await policy.stop()
    assert gc.get_freeze_count() >= before + len(keep)
    assert policy.full_collections >= 1


async def test_policy_freezes_every_tick_but_counts_polls_once_per_check_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    freezes: list[int] = []
    real_freeze = gc.freeze

    def freeze() -> None:
        freezes.append(1)
        real_freeze()

    monkeypatch.setattr(gc, "freeze", freeze)
    counted: list[int] = []

    def load() -> int:
        counted.append(1)
        return 0

    policy = GcPolicy(freeze_interval_s=0.01, full_interval_s=3600, load=load, check_interval_s=0.2)
    policy.start()
    await asyncio.sleep(0.5)
    await policy.stop()
    # ~50 ticks in 0.5 s (fewer on a slow machine), every one a freeze; the count at most
    # once per 0.2 s: the first tick, then about two more
    assert len(freezes) >= 10
    assert 1 <= len(counted) <= 4
    assert len(freezes) > 2 * len(counted)


async def test_metrics_expose_gc_pauses(client):
    r = await client.get("/metrics")
    text = await r.text()
    assert 'broker_gc_pause_seconds_max{generation="0"}' in text
    assert "# TYPE broker_gc_collections_total counter" in text


async def test_policy_collects_when_parked_polls_fall_below_half_their_peak():
    load = [0]
    policy = GcPolicy(
        freeze_interval_s=0.02, full_interval_s=3600, load=lambda: load[0], check_interval_s=0.02
    )
    policy.start()
    load[0] = 5000
    await asyncio.sleep(0.1)
    assert policy.full_collections == 0  # growing load: nothing to reclaim
    load[0] = 2000  # most clients vanished
    async with asyncio.timeout(10):  # two ticks: below half, then no longer falling
        while policy.full_collections == 0:  # noqa: ASYNC110 - polling a plain counter
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    await policy.stop()
    assert policy.full_collections == 1  # once, not on every tick after


async def _replay(
    readings: list[int], hook_calls: list[int] | None = None
) -> tuple[int, list[int]]:
    """Run the policy over `readings` (one per tick; the last repeats a few times).

    Returns how many maintenance collections ran, and the readings up to and including the
    one that triggered the first (all of them if none ran).
    """
    readings = list(readings)
    seen: list[tuple[int, int]] = []  # (reading, collections before it)
    steady = asyncio.Event()

    def load() -> int:
        value = readings.pop(0) if len(readings) > 1 else readings[0]
        seen.append((value, policy.full_collections))
        if len(readings) == 1 and len(seen) > 20:
            steady.set()
        return value

    def hook() -> None:
        # the collections already run when the hook is called: it must come before its own
        assert hook_calls is not None
        hook_calls.append(policy.full_collections)

    policy = GcPolicy(
        freeze_interval_s=0.01,
        full_interval_s=3600,
        load=load,
        check_interval_s=0.01,
        on_mass_disconnect=hook if hook_calls is not None else None,
    )
    policy.start()
    await asyncio.wait_for(steady.wait(), 10)
    await policy.stop()
    first = next((i for i, (_v, n) in enumerate(seen) if n >= 1), len(seen))
    return policy.full_collections, [v for v, _n in seen[:first]]


async def test_policy_waits_until_the_parked_polls_stop_falling():
    # disconnects still being processed, then steady: nothing collected while the count fell
    collections, before = await _replay([5000, 5000, 2400, 1200, 600, 300, 100, 100])
    assert collections == 1
    assert before == [5000, 5000, 2400, 1200, 600, 300, 100, 100]


async def test_policy_collects_when_clients_vanish_and_come_straight_back():
    # all disconnect, then reconnect before the count ever holds still below half
    collections, before = await _replay([10000, 10000, 0, 9000, 10000])
    assert collections == 1  # the cancelled polls' garbage is collected once
    assert before == [10000, 10000, 0, 9000]


async def test_policy_leaves_a_steady_load_alone():
    collections, before = await _replay([10000, 10000, 9000, 10000])
    assert collections == 0
    assert before[:4] == [10000, 10000, 9000, 10000]


async def test_a_mass_disconnect_runs_the_hook_before_its_collection():
    calls: list[int] = []
    collections, _before = await _replay([5000, 5000, 100, 100], calls)
    assert collections == 1
    assert calls == [0]  # once, before the maintenance collection it comes with


async def test_a_steady_load_never_runs_the_mass_disconnect_hook():
    calls: list[int] = []
    await _replay([10000, 10000, 9000, 10000], calls)
    assert calls == []


async def test_the_periodic_collection_does_not_run_the_mass_disconnect_hook():
    calls: list[int] = []
    policy = GcPolicy(
        freeze_interval_s=0.01,
        full_interval_s=0.05,
        load=lambda: 10000,
        check_interval_s=0.01,
        on_mass_disconnect=lambda: calls.append(1),
    )
    policy.start()
    await asyncio.sleep(0.4)
    await policy.stop()
    assert policy.full_collections >= 2 and calls == []


async def test_clients_that_came_straight_back_keep_their_caches():
    calls: list[int] = []
    collections, _before = await _replay([10000, 10000, 0, 9000, 10000], calls)
    assert collections == 1  # the cancelled polls' garbage is still collected
    assert calls == []  # but 9,000 of them are back: their cache entries are live


async def test_a_failing_mass_disconnect_hook_is_logged_and_the_policy_goes_on(caplog):
    readings = [5000, 5000, 100, 100]

    def load() -> int:
        return readings.pop(0) if len(readings) > 1 else readings[0]

    def hook() -> None:
        raise RuntimeError("boom")

    policy = GcPolicy(
        freeze_interval_s=0.01,
        full_interval_s=0.3,
        load=load,
        check_interval_s=0.01,
        on_mass_disconnect=hook,
    )
    policy.start()
    await asyncio.sleep(0.8)
    assert policy._task is not None and not policy._task.done()
    await policy.stop()
    assert "the mass-disconnect hook failed" in caplog.text
    assert policy.full_collections >= 2  # the collection it came with, and a periodic one


async def test_a_mass_disconnect_lets_go_of_the_process_caches(caplog):
    caplog.set_level("INFO", logger="broker.gcstats")
    ids.clear_pool()
    ids.uuid4()  # the random-id pool holds the rest of a chunk
    collections, _before = await _replay([5000, 5000, 100, 100])
    assert collections == 1
    assert ids.clear_pool() == 0
    assert "heap trimmed after dropping" in caplog.text
    assert "255 random_ids" in caplog.text  # the rest of the chunk uuid4() fetched


async def test_the_periodic_collection_keeps_the_process_caches(caplog):
    caplog.set_level("INFO", logger="broker.gcstats")
    ids.clear_pool()
    ids.uuid4()  # the random-id pool holds the rest of a chunk
    policy = GcPolicy(
        freeze_interval_s=0.01, full_interval_s=0.05, load=lambda: 10000, check_interval_s=0.01
    )
    policy.start()
    for _ in range(200):  # each collection walks the whole test process: no fixed sleep
        if policy.full_collections >= 1:
            break
        await asyncio.sleep(0.05)
    await policy.stop()
    assert policy.full_collections >= 1
    assert ids.clear_pool() > 0  # a steady load keeps its pool
    assert "heap trimmed after dropping" not in caplog.text
