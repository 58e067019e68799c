"""Operations: liveness, readiness and Prometheus metrics (no authentication)."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from broker import __version__, allocator, jsonutil, process
from broker.appkeys import (
    gcstats_key,
    hub_key,
    looplag_key,
    metrics_key,
    persistence_key,
    pusher_key,
    store_key,
)

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process serves HTTP."""
    return jsonutil.json_response({"status": "ok", "version": __version__, "pid": os.getpid()})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """Readiness: Redis answers and the long-poll hub is reading its wake-up stream."""
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2):
            await request.app[store_key].redis.ping()
        checks["redis"] = "ok"
    except Exception as e:
        checks["redis"] = f"failed: {type(e).__name__}"
    checks["hub"] = "ok" if request.app[hub_key].running else "stopped"
    ready = all(v == "ok" for v in checks.values())
    return jsonutil.json_response(
        {"status": "ready" if ready else "not ready", "checks": checks},
        status=200 if ready else 503,
    )


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    hub = request.app[hub_key]
    push = await request.app[pusher_key].gauges() if pusher_key in request.app else {}
    # Which allocator and event loop this worker really runs on (config can be overridden).
    loop = type(asyncio.get_running_loop()).__module__.partition(".")[0]
    labels = f'version="{__version__}",allocator="{allocator.current()}",loop="{loop}"'
    text = request.app[metrics_key].render(
        {
            f"process_info{{{labels}}}": 1,
            "waiting_polls": hub.waiting,
            "hub_hints_total": hub.hints,
            "hub_reconnects_total": hub.reconnects,
            **request.app[gcstats_key].gauges(),
            **request.app[looplag_key].gauges(),
            **request.app[persistence_key].gauge(),
            **push,
        },
        process.gauges(),
    )
    return web.Response(text=text, content_type="text/plain", charset="utf-8")
