"""Letting go of the small survivors that pin freed heap pages after a mass disconnect.

Why: when thousands of parked polls vanish at once, their memory is freed, but malloc_trim
can hand a page of the C heap back to the OS only if nothing on it is still alive (this is
about the C allocator, the broker's default: broker/allocator.py). A few hundred small
objects made while the clients were connected, and kept after they left, each pin a 4 KiB
page among the freed ones. A walk of the heap's chunks after 2,000 parked polls (half Oxlin,
half OB, 1,000 events published) vanished found ~8 MB of pages kept, and these among what
pinned them (all bounded: a second wave reuses the pages):

- CPython's type-attribute cache (4,096 slots) holds a strong reference to each attribute
  name it looked up, in a slot chosen by the name's address. C code that asks for an
  attribute by a fresh string leaves that string in a slot: cryptography does so for
  `digest_size` on every PS256 signature, so hundreds of copies of that one name were alive;
- yarl's URL caches (lru_caches of 128 entries): aiohttp builds each request's URL through
  them, and every queue path is a new entry;
- the free lists of asyncio's FutureIter objects (`await future`, 255), uvloop's Handle and
  aiohttp's parsed request heads (250 each), filled as the polls ended;
- the pool of random 16-byte ids (broker/ids.py), refilled during the wave into whatever
  holes the heap had.

Letting go of the caches and remaking the FutureIter list took what the heap kept from
+8.0-8.5 MB to +4.8-4.9 MB in that driver's runs; remaking uvloop's and aiohttp's lists too,
to +3.7-3.9 MB. It costs a little work later (a lookup or a URL parse done again) and happens
only after a mass disconnect (gcstats.GcPolicy). What stays pinned is peak-sized tables of
dicts and sets, small C allocations, and the buffers of the connections that stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable
from types import ModuleType

from broker import ids

# At least the length of each free list remade: asyncio's C Future keeps 255 FutureIter objects
# (FI_FREELIST_MAXLEN in CPython's _asynciomodule.c), Cython's free lists 250 (uvloop's and
# aiohttp's DEFAULT_FREELIST_SIZE). Taking more than a list holds only frees the extra again.
_FREELIST = 255


def release_caches() -> dict[str, int]:
    """Drop the caches whose entries outlive the clients; call before the heap is trimmed.

    Returns what was dropped, for the log line.
    """
    dropped: dict[str, int] = {}
    # Each on its own: one failing must not keep the others.
    with contextlib.suppress(Exception):
        dropped["yarl_urls"] = _clear_yarl_caches()
    with contextlib.suppress(Exception):
        dropped["random_ids"] = ids.clear_pool()
    # Not countable; the slots are refilled by the next lookups of each name.
    with contextlib.suppress(Exception):
        _clear_type_cache()
    return dropped


def _clear_type_cache() -> None:
    if sys.version_info >= (3, 13):
        # 3.13 deprecated sys._clear_type_cache (3.14 warns) for this, which clears it too.
        sys._clear_internal_caches()
    else:
        sys._clear_type_cache()


async def renew_free_lists(loop: asyncio.AbstractEventLoop) -> list[str]:
    """Replace the entries of the free lists the polls filled with fresh ones made together.

    Call right after the heap was trimmed, and trim again after: a free list's entries were
    freed one by one as the polls ended, scattered over the heap; made now, after a trim
    consolidated the free memory, the new ones tend to come out of a few free blocks together
    (with the C allocator; small requests take exact-size holes first). The lists are the
    process's: asyncio's FutureIter (255 entries), uvloop's Handle and aiohttp's parsed
    request heads (Cython free lists of 250). Returns the ones remade.
    """
    renewed = []
    # The two made at once first, while nothing else has run since the trim.
    fut = loop.create_future()
    try:
        _renew(lambda: iter(fut))
        renewed.append("FutureIter")
    finally:
        fut.cancel()
    make_head = _request_head_maker()
    if make_head is not None:
        _renew(make_head)
        renewed.append("RawRequestMessage")
    if await _renew_handles(loop):
        renewed.append("Handle")
    return renewed


def _renew(make: Callable[[], object]) -> None:
    # The first objects take every entry the free list holds; the rest are new memory.
    _free_newest_first([make() for _ in range(2 * _FREELIST)])


def _free_newest_first(taken: list[object]) -> None:
    """Free the objects made from new memory first, so they refill the free list, then the
    ones it held before, which find it full and go back to malloc."""
    scattered, fresh = taken[:_FREELIST], taken[_FREELIST:]
    taken.clear()
    fresh.clear()
    scattered.clear()


async def _renew_handles(loop: asyncio.AbstractEventLoop) -> bool:
    """uvloop's Handle (call_soon): the loop holds each until its next turn, so two turns pass
    before ours are the last references. asyncio's own Handle has no free list: harmless."""

    def nothing() -> None:
        pass

    taken: list[object] = []
    for _ in range(2 * _FREELIST):
        handle = loop.call_soon(nothing)
        handle.cancel()
        taken.append(handle)
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    _free_newest_first(taken)
    return type(loop).__module__.startswith("uvloop")


def _request_head_maker() -> Callable[[], object] | None:
    """A maker of aiohttp's C request heads (RawRequestMessage), or None if this aiohttp has
    none or builds them otherwise (a private class: aiohttp is pinned below 3.15)."""
    try:
        from aiohttp._http_parser import RawRequestMessage  # type: ignore[import-not-found]
        from aiohttp.http import HttpVersion11
        from multidict import CIMultiDict, CIMultiDictProxy
        from yarl import URL

        headers, url = CIMultiDictProxy(CIMultiDict[str]()), URL("/")

        def make() -> object:
            return RawRequestMessage(
                "GET", "/", HttpVersion11, headers, (), False, None, False, False, url
            )

        make()  # the signature still matches
    except Exception:
        return None
    return make


def _clear_yarl_caches() -> int:
    """Clear yarl's module-level lru_caches; returns the entries dropped (0 if none found)."""
    dropped = 0
    for module in _yarl_modules():
        for value in list(vars(module).values()):
            with contextlib.suppress(Exception):  # not an lru_cache after all: skip it
                info = getattr(value, "cache_info", None)
                clear = getattr(value, "cache_clear", None)
                if callable(info) and callable(clear):
                    dropped += int(info().currsize)
                    clear()
    return dropped


def _yarl_modules() -> list[ModuleType]:
    modules: list[ModuleType] = []
    # yarl's caches live in its private modules (yarl.cache_clear() clears only the host
    # caches); a later yarl that moves them leaves this a no-op, which tests/unit notices.
    for name in ("yarl._url", "yarl._parse"):
        module = sys.modules.get(name)
        if module is not None:
            modules.append(module)
    return modules
