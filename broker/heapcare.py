"""Letting go of the small survivors that pin freed heap pages after a mass disconnect.

Why: when thousands of parked polls vanish at once, their memory is freed, but malloc_trim
can hand a page of the C heap back to the OS only if nothing on it is still alive. A few
hundred small objects made while the clients were connected, and kept after they left,
each pin a 4 KiB page among the freed ones. A walk of the heap's chunks after 2,000 parked
polls (half Oxlin, half OB, 1,000 events published) vanished found ~8 MB of pages kept, and
these among what pinned them (all bounded: a second wave reuses the pages):

- CPython's type-attribute cache (4,096 slots) holds a strong reference to each attribute
  name it looked up. C code that asks for an attribute by a fresh string leaves that string
  in a slot: cryptography does so for `digest_size` on every PS256 signature, so hundreds of
  copies of that one name were alive (~1.8 MB of pages);
- yarl's URL caches (lru_cache, 128 entries each): aiohttp builds each request's URL through
  them, and every queue path is a new entry (~1.2 MB);
- the free list of asyncio's FutureIter objects (`await future`), filled with up to 255 of
  them as the polls ended (~0.7 MB);
- the pool of random 16-byte ids (broker/ids.py), refilled during the wave into whatever
  holes the heap had (~0.7 MB).

Dropping them costs a little work later (a lookup or a URL parse done again) and happens only
after a mass disconnect (gcstats.GcPolicy). What remains pinned after this is mostly the free
lists of uvloop's handles and aiohttp's parsed request heads (Cython free lists of 250
objects each, out of reach from Python), and the buffers of the connections that stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from types import ModuleType
from typing import Any

from broker import ids

# asyncio's C Future keeps at most this many FutureIter objects for reuse (FI_FREELIST_MAXLEN
# in CPython's _asynciomodule.c).
_FUTURE_ITER_FREELIST = 255


def release_caches() -> dict[str, int]:
    """Drop the caches whose entries outlive the clients; call before the heap is trimmed.

    Returns what was dropped, for the log line.
    """
    dropped = {"yarl_urls": _clear_yarl_caches(), "random_ids": ids.clear_pool()}
    # Not introspectable: the slots are refilled by the next lookups of each name.
    sys._clear_type_cache()
    return dropped


def renew_future_iter_freelist(loop: asyncio.AbstractEventLoop) -> None:
    """Replace the FutureIter free list's entries with fresh ones made side by side.

    Call right after the heap was trimmed, and trim again after: the free list's current
    entries were freed one by one as the polls ended, scattered over the heap; made now, after
    a trim consolidated the free memory, the new ones come out of one free block together.
    """
    fut = loop.create_future()
    try:
        # The first iterators take every entry the free list holds; the rest are new memory.
        taken = [iter(fut) for _ in range(2 * _FUTURE_ITER_FREELIST)]
        scattered, fresh = (
            taken[:_FUTURE_ITER_FREELIST],
            taken[_FUTURE_ITER_FREELIST:],
        )
        del taken
        fresh.clear()  # freed first: they fill the free list again
        scattered.clear()  # the list is full by now: these go back to malloc
    finally:
        fut.cancel()


def _clear_yarl_caches() -> int:
    """Clear yarl's module-level lru_caches; returns the entries dropped (0 if none found)."""
    dropped = 0
    for module in _yarl_modules():
        for value in list(vars(module).values()):
            info = getattr(value, "cache_info", None)
            clear = getattr(value, "cache_clear", None)
            if callable(info) and callable(clear):
                with contextlib.suppress(Exception):  # not an lru_cache after all: skip it
                    dropped += int(info().currsize)
                    clear()
    return dropped


def _yarl_modules() -> list[ModuleType]:
    modules: list[Any] = []
    # yarl's caches live in its private modules (yarl.cache_clear() clears only the host
    # caches); a later yarl that moves them leaves this a no-op, which tests/unit notices.
    for name in ("yarl._url", "yarl._parse"):
        module = sys.modules.get(name)
        if module is not None:
            modules.append(module)
    return modules
