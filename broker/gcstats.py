"""Garbage-collector policy and pause accounting.

Why: with 10,000 parked polls a process holds hundreds of thousands of container objects,
and every collection of an older generation walks them: pauses of 10-500 ms that land
straight in the wake-up latency. Yet the broker's requests make almost no reference cycles
(measured: ~0 cyclic-garbage objects per poll, publish or long poll), so those walks find
nothing. The policy:

- only the young generation is collected automatically: frequent, small (it walks at most
  a few thousand recent objects), and it reclaims the few young cycles (error paths);
- older generations are never collected automatically: at 1,000 events/s with re-polls,
  tens of thousands of objects survive each second, and a generation-1 or -2 pass over them
  took ~100 ms (measured by the benchmark kit);
- every `freeze_interval_s` (0.1 s) the survivors are frozen (`gc.freeze()` is O(1)), so not
  even an explicit gc.collect() elsewhere walks the parked polls. Often, because the young
  generation is not only what the thresholds count: its count is allocations minus frees, and
  at 1,000 events/s the frees of older objects offset the new polls' allocations, so a young
  collection came only about once a second and found a second's worth of survivors (tens of
  thousands of objects): 18-46 ms pauses, each one in the wake-up latency. Freezing every
  0.1 s bounds what a young collection can find to a tenth of that; none took over 2 ms in
  the same run;
- a maintenance collection unfreezes and walks everything once, to reclaim the cycles that
  formed among older objects (a cancelled long poll leaves ~50 objects in cycles: exception
  tracebacks and frames), then hands freed memory back to the OS (malloc_trim). It runs when
  the parked polls have fallen below half their peak and stopped falling (clients vanished:
  there is garbage, and fewer live objects to walk), and every `full_interval_s` anyway.

`GcStats` times every collection so /metrics shows the pauses per generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import time
from collections.abc import Callable
from typing import Any

from broker import heapcare

log = logging.getLogger(__name__)

# Generation 0 collects every 2,000 net allocations (~1 ms); 1 and 2 never do on their own.
THRESHOLDS = (2_000, 1_000_000_000, 1_000_000_000)


def tune() -> None:
    """At start-up: collect, freeze what exists (imports, app), set small young thresholds."""
    gc.collect()
    # What start-up freed (import-time temporaries, key loading) would otherwise stay in the C
    # allocator's heap: 10-15 MB of RSS that holds no object.
    _malloc_trim()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)


# A drop to half of at least this many parked polls triggers a maintenance collection.
MASS_DISCONNECT_PEAK = 1000


def _malloc_trim() -> None:
    """Return free heap memory to the OS (glibc only; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class GcPolicy:
    """Freezes survivors periodically and runs the maintenance collection when it pays."""

    def __init__(
        self,
        freeze_interval_s: float,
        full_interval_s: float,
        load: Callable[[], int] = lambda: 0,
        *,
        check_interval_s: float = 1.0,
        on_mass_disconnect: Callable[[], object] | None = None,
    ) -> None:
        self.freeze_interval_s = freeze_interval_s
        # Called before the maintenance collection that follows a mass disconnect (not the
        # periodic one): drop caches filled while the clients connected, so that their
        # entries do not pin the freed memory (see TokenVerifier.clear_cache).
        self.on_mass_disconnect = on_mass_disconnect
        self.full_interval_s = full_interval_s
        # How often the parked polls are counted for the mass-disconnect check: slower than
        # the freezes, so that "stopped falling" means a second without fewer polls, not one
        # tick of the freeze timer that fell between two batches of disconnects.
        self.check_interval_s = check_interval_s
        self.load = load  # parked polls right now
        self.full_collections = 0
        self._peak = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.freeze_interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="broker-gc")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self.full_interval_s
        next_check = loop.time()
        waiting = 0
        vanished = False  # the count fell below half its peak; collect once it stops falling
        while True:
            await asyncio.sleep(self.freeze_interval_s)
            if loop.time() < next_check:
                gc.freeze()
                continue
            next_check = loop.time() + self.check_interval_s
            waiting, before = self.load(), waiting
            self._peak = max(self._peak, waiting)
            if self._peak >= MASS_DISCONNECT_PEAK and waiting <= self._peak // 2:
                vanished = True
            # Only once the count has stopped falling (or risen again: clients reconnecting):
            # thousands of disconnects take a second or two to process, and a collection in
            # the middle of them would trim the heap before most of their memory is free.
            settled = vanished and waiting >= before
            due = self.full_interval_s > 0 and loop.time() >= next_full
            if settled or due:
                # Not when the clients came straight back (the count rose again past half its
                # peak): their new entries would be as scattered, and each of them would have
                # its token verified again for nothing.
                if settled and waiting <= self._peak // 2:
                    await self.collect_after_mass_disconnect(loop)
                else:
                    self.collect_all()
                vanished = False
                self._peak = waiting
                next_full = loop.time() + self.full_interval_s
            gc.freeze()

    async def collect_after_mass_disconnect(self, loop: asyncio.AbstractEventLoop) -> None:
        """The maintenance collection, with what would pin the freed pages let go first.

        The app's caches (on_mass_disconnect) and the process's (broker/heapcare.py) are
        dropped before the collection; the free lists the polls filled are remade after the
        trim, when their new entries can come out of a few free blocks, and the heap trimmed
        again for the pages their old entries held.
        """
        # None of these failing may end the policy: without it the young collections' pauses
        # grow back and no maintenance collection runs again.
        if self.on_mass_disconnect is not None:
            try:
                self.on_mass_disconnect()
            except Exception:
                log.exception("gc policy: the mass-disconnect hook failed")
        dropped: dict[str, int] = {}
        try:
            dropped = heapcare.release_caches()
        except Exception:
            log.exception("gc policy: dropping the process's caches failed")
        self.collect_all()
        renewed: list[str] = []
        try:
            renewed = await heapcare.renew_free_lists(loop)
        except Exception:
            log.exception("gc policy: remaking the free lists failed")
        _malloc_trim()
        log.info(
            "mass disconnect: heap trimmed after dropping %s; free lists remade: %s",
            ", ".join(f"{n} {what}" for what, n in dropped.items()) or "nothing",
            ", ".join(renewed) or "none",
        )

    def collect_all(self) -> None:
        gc.unfreeze()
        gc.collect()
        _malloc_trim()
        self.full_collections += 1


class GcStats:
    """Count and time collections per generation (installed as a gc callback)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self.max_seconds = [0.0, 0.0, 0.0]
        self._started = 0.0

    def install(self) -> GcStats:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        gen = int(info["generation"])
        took = time.perf_counter() - self._started
        self.count[gen] += 1
        self.seconds[gen] += took
        self.max_seconds[gen] = max(self.max_seconds[gen], took)

    def gauges(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for gen in range(3):
            out[f'gc_collections_total{{generation="{gen}"}}'] = self.count[gen]
            out[f'gc_pause_seconds_total{{generation="{gen}"}}'] = self.seconds[gen]
            out[f'gc_pause_seconds_max{{generation="{gen}"}}'] = self.max_seconds[gen]
        # Not gc.get_freeze_count(): it walks the whole frozen list (~100 ms at 10k parked
        # polls), and /metrics is scraped every few seconds.
        return out
