"""What the broker lets go of after a mass disconnect, so that freed pages can be trimmed."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest
from aiohttp import web

from broker import heapcare, ids


class _Probe:
    pass


def test_the_type_cache_lets_go_of_the_names_it_looked_up():
    # A fresh string, as C code passes it (cryptography's `digest_size` on every signature).
    name = "".join(["never_", "an_attribute"])
    before = sys.getrefcount(name)
    getattr(_Probe(), name, None)
    assert sys.getrefcount(name) > before  # the cache holds it: the case this is about
    heapcare.release_caches()
    assert sys.getrefcount(name) == before


async def test_the_url_caches_aiohttp_fills_are_cleared(aiohttp_client: Any):
    async def ok(_request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_get("/queues/{queue_id}", ok)
    client = await aiohttp_client(app)
    heapcare.release_caches()
    for i in range(3):
        r = await client.get(f"/queues/q{i}?wait=1")
        assert r.status == 204
    # If a yarl release moved its caches, this finds none and says so.
    assert heapcare.release_caches()["yarl_urls"] >= 3
    assert heapcare.release_caches()["yarl_urls"] == 0


def test_the_random_id_pool_is_dropped_and_refills():
    ids.clear_pool()
    ids.uuid4()  # fetches a chunk: the rest stays in the pool
    dropped = heapcare.release_caches()["random_ids"]
    assert dropped > 0
    assert ids.clear_pool() == 0
    fresh = {ids.uuid4() for _ in range(300)}  # refills (twice) after the drop
    assert len(fresh) == 300


async def test_the_future_iter_free_list_is_remade_from_new_memory():
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    held = [iter(fut) for _ in range(600)]  # empties the free list and keeps it empty
    listed = [iter(fut) for _ in range(255)]
    listed_at = {id(x) for x in listed}
    del listed  # the free list is empty: all 255 go into it, memory and all
    assert "FutureIter" in await heapcare.renew_free_lists(loop)
    after = [iter(fut) for _ in range(255)]  # served from the free list
    assert not listed_at & {id(x) for x in after}
    del held, after
    fut.cancel()


def test_uvloops_handle_free_list_is_remade_from_new_memory():
    uvloop = pytest.importorskip("uvloop")  # the `fast` extra, which make installs

    async def check() -> None:
        loop = asyncio.get_running_loop()

        def nothing() -> None:
            pass

        def handles(n: int) -> list[asyncio.Handle]:
            out = [loop.call_soon(nothing) for _ in range(n)]
            for h in out:
                h.cancel()
            return out

        held = handles(600)
        listed = handles(250)
        listed_at = {id(x) for x in listed}
        await asyncio.sleep(0)  # the loop lets go of them
        del listed
        again = handles(250)  # without a renewal the free list hands them out again
        assert listed_at & {id(x) for x in again}
        await asyncio.sleep(0)
        del again
        assert "Handle" in await heapcare.renew_free_lists(loop)
        after = handles(250)
        assert not listed_at & {id(x) for x in after}
        await asyncio.sleep(0)
        del held, after

    loop = uvloop.new_event_loop()
    try:
        loop.run_until_complete(check())
    finally:
        loop.close()


async def test_aiohttps_request_head_free_list_is_remade_from_new_memory():
    make = heapcare._request_head_maker()
    assert make is not None  # this aiohttp still builds them in C, as the pin says
    held = [make() for _ in range(600)]
    listed = [make() for _ in range(250)]
    listed_at = {id(x) for x in listed}
    del listed
    assert "RawRequestMessage" in await heapcare.renew_free_lists(asyncio.get_running_loop())
    after = [make() for _ in range(250)]
    assert not listed_at & {id(x) for x in after}
    del held, after
