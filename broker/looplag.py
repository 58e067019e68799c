"""Event-loop lag: how late the loop runs a timer, the sign of a saturated worker process.

Why: when a worker's core is saturated (PS256 signing, thousands of polls), requests queue
inside its event loop. No error shows that, only latency, and the process's own view of it is
the cheapest: a timer every `interval_s` notes how late it fired. /metrics reports the last
lag and the worst one over the last minute, per process; an operator alerts on those rather
than on client-side latency that mixes in the network.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib


class LoopLag:
    def __init__(self, interval_s: float = 0.5, window_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self.last_s = 0.0
        self._window: collections.deque[float] = collections.deque(
            maxlen=max(1, round(window_s / interval_s))
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="broker-looplag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self.interval_s)
            self.record(loop.time() - started - self.interval_s)

    def record(self, lag_s: float) -> None:
        # A timer can fire a little early (uvloop rounds to whole milliseconds): no lag then.
        self.last_s = max(0.0, lag_s)
        self._window.append(self.last_s)

    def gauges(self) -> dict[str, float]:
        return {
            "event_loop_lag_seconds": self.last_s,
            "event_loop_lag_max_seconds": max(self._window, default=0.0),
        }
