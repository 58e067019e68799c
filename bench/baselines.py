"""Baseline servers the broker is compared with, run in the same way (uvloop, no access log).

    python -m bench.baselines trivial --port P   # every request: 204, nothing else
    python -m bench.baselines memlp --port P     # in-memory long poll, futures, no Redis

The in-memory long poll is the floor for Python: the Oxlin-shaped routes of the broker
(`GET /queues/{q}?wait=N` -> 200 JSON array or 204; publish -> 202) with events in a dict of
lists and one future per parked poll; no auth, no Redis, default GC unless --gc-tuned.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import resource

import orjson
from aiohttp import web


def trivial_app() -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def memlp_app(max_batch: int = 1000) -> web.Application:
    queues: dict[str, list[bytes]] = {}
    waiters: dict[str, asyncio.Future[None]] = {}
    ids = itertools.count(1)
    stats = {"published": 0, "polls": 0}

    async def publish(request: web.Request) -> web.Response:
        q = request.match_info["q"]
        doc = orjson.loads(await request.read())
        events = doc if isinstance(doc, list) else [doc]
        stored = queues.setdefault(q, [])
        out = []
        for event in events:
            event["id"] = str(next(ids))
            stored.append(orjson.dumps(event))
            out.append(event["id"])
        stats["published"] += len(events)
        fut = waiters.get(q)
        if fut is not None and not fut.done():
            fut.set_result(None)
        return web.json_response({"ids": out, "queues": 1}, status=202)

    async def poll(request: web.Request) -> web.Response:
        q = request.match_info["q"]
        wait = min(float(request.query.get("wait", "0")), 3600.0)
        stats["polls"] += 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            pending = queues.get(q)
            if pending:
                out, queues[q] = pending[:max_batch], pending[max_batch:]
                return web.Response(
                    body=b"[" + b",".join(out) + b"]", content_type="application/json"
                )
            remaining = deadline - loop.time()
            if remaining <= 0:
                return web.Response(status=204)
            fut = loop.create_future()
            waiters[q] = fut
            handle = loop.call_later(remaining, _expire, fut)
            try:
                await fut
            finally:
                handle.cancel()
                if waiters.get(q) is fut:
                    del waiters[q]

    async def metrics(request: web.Request) -> web.Response:
        text = (
            f"memlp_waiting_polls {len(waiters)}\n"
            f"memlp_published_total {stats['published']}\n"
            f"memlp_polls_total {stats['polls']}\n"
        )
        return web.Response(text=text)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/publish/{q}", publish)
    app.router.add_get("/queues/{q}", poll)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["trivial", "memlp"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=1000)
    parser.add_argument("--gc-tuned", action="store_true", help="the broker's GC thresholds")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = trivial_app() if args.kind == "trivial" else memlp_app(args.max_batch)
    if args.gc_tuned:
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 50, 100)
    web.run_app(
        app,
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        handler_cancellation=True,
        print=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
