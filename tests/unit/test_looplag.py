"""Event-loop lag for /metrics: a blocked loop shows, an idle one does not."""

from __future__ import annotations

import asyncio
import time

from broker.looplag import LoopLag


async def test_a_blocked_loop_shows_as_lag_and_stays_in_the_window():
    lag = LoopLag(interval_s=0.02, window_s=10)
    lag.start()
    try:
        await asyncio.sleep(0.1)
        assert lag.gauges()["event_loop_lag_max_seconds"] < 0.25  # idle: no big lag yet
        time.sleep(0.3)  # noqa: ASYNC251 - on purpose: a handler hogging the loop
        await asyncio.sleep(0.1)
    finally:
        await lag.stop()
    gauges = lag.gauges()
    assert gauges["event_loop_lag_max_seconds"] >= 0.25
    assert gauges["event_loop_lag_seconds"] < gauges["event_loop_lag_max_seconds"]


def test_the_window_forgets_old_lag_and_never_reports_it_negative():
    lag = LoopLag(interval_s=1, window_s=3)
    lag.record(0.5)
    lag.record(-0.0004)  # a timer fired early
    assert lag.gauges() == {"event_loop_lag_seconds": 0.0, "event_loop_lag_max_seconds": 0.5}
    for _ in range(3):
        lag.record(0.01)
    assert lag.gauges()["event_loop_lag_max_seconds"] == 0.01


async def test_metrics_expose_the_loop_lag(client):
    text = await (await client.get("/metrics")).text()
    assert "# TYPE broker_event_loop_lag_seconds gauge" in text
    assert "broker_event_loop_lag_max_seconds " in text
