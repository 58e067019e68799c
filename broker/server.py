"""Running the broker: embedded Redis when needed, one or several worker processes.

Several workers share one port with SO_REUSEPORT (the kernel spreads connections); each has its
own hub and Redis connections, and all share one Redis, so an event reaches a poll whichever
worker holds it. uvloop is used when installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import resource
import signal
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from broker import gcstats
from broker.app import create_app
from broker.appkeys import hub_key, verifier_key
from broker.auth import DevIssuer
from broker.config import Settings
from broker.embedded import EmbeddedRedis

log = logging.getLogger("broker")


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop  # type: ignore[no-any-return,unused-ignore]


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one: each parked poll holds a socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def run_worker(settings: Settings, *, reuse_port: bool) -> None:
    """Serve HTTP in this process until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    limit = raise_fd_limit()
    if limit < 20_000:
        log.warning("open-files limit is %d: at most about that many parked polls", limit)
    loop = _loop_factory()()
    asyncio.set_event_loop(loop)
    app = create_app(settings)
    # The GC policy is process-wide, so the server (not create_app) owns it.
    policy = gc_policy(settings, app)

    async def start_policy(_app: web.Application) -> None:
        policy.start()

    async def stop_policy(_app: web.Application) -> None:
        await policy.stop()

    app.on_startup.append(start_policy)
    app.on_cleanup.append(stop_policy)
    gcstats.tune()
    web.run_app(
        app,
        host=settings.server.host,
        port=settings.server.port,
        reuse_port=reuse_port,
        backlog=settings.server.backlog,
        handler_cancellation=True,
        shutdown_timeout=settings.server.shutdown_timeout_s,
        access_log=log if settings.server.access_log else None,
        print=None,
        loop=loop,
    )


def gc_policy(settings: Settings, app: web.Application) -> gcstats.GcPolicy:
    """The worker's GC policy: it counts the app's parked polls, clears its caches after a
    mass disconnect."""
    return gcstats.GcPolicy(
        settings.server.gc_freeze_interval_s,
        settings.server.gc_full_interval_s,
        load=lambda: app[hub_key].waiting if hub_key in app else 0,
        on_mass_disconnect=lambda: _after_mass_disconnect(app),
    )


def _after_mass_disconnect(app: web.Application) -> None:
    """Before the maintenance collection that follows a mass disconnect: drop the token cache.

    Its entries were made while those clients connected, between their connections' objects;
    kept, they pin the freed pages (TokenVerifier.clear_cache). Clients still connected have
    their token verified once more on their next request.
    """
    dropped = app[verifier_key].clear_cache()
    log.info(
        "mass disconnect: token cache cleared (%d entries) before the heap is trimmed", dropped
    )


def serve(settings: Settings, *, dev_banner: bool = True) -> int:
    """Start the embedded server if redis.url is empty, then the worker process(es)."""
    embedded: EmbeddedRedis | None = None
    if not settings.redis.url:
        embedded = EmbeddedRedis(
            settings.data_dir / "redis",
            unix_socket=True,
            appendfsync=settings.redis.embedded_appendfsync,
        )
        embedded.start()
        url = embedded.client_url  # its Unix socket: cheaper round trips than TCP loopback
        print(
            f"embedded Redis-compatible server on {embedded.url} (data in {embedded.data_dir});"
            f" the broker uses {url}",
            flush=True,
        )
        settings = settings.replace(redis={"url": url})
    try:
        if dev_banner:
            _print_banner(settings)
        workers = settings.server.workers
        if workers == 1:
            run_worker(settings, reuse_port=False)
            return 0
        return _run_workers(settings, workers)
    finally:
        if embedded is not None:
            embedded.stop()


def _run_workers(settings: Settings, workers: int) -> int:
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(
            target=run_worker,
            args=(settings,),
            kwargs={"reuse_port": True},
            name=f"broker-worker-{i}",
        )
        for i in range(workers)
    ]
    for p in procs:
        p.start()

    def stop(signum: int, _frame: Any) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for p in procs:
        p.join()
    return max((p.exitcode or 0) for p in procs)


def _print_banner(settings: Settings) -> None:
    base = f"http://{settings.server.host}:{settings.server.port}"
    print(f"broker listening on {base} ({settings.server.workers} worker(s))", flush=True)
    if settings.auth.jwks_file:
        return
    issuer = DevIssuer.load_or_create(settings.data_dir)
    kwargs: dict[str, Any] = {"ttl_s": 24 * 3600, "audience": settings.auth.audience}
    if settings.auth.issuer:
        kwargs["issuer"] = settings.auth.issuer
    token = issuer.mint("alice", **kwargs)
    producer = issuer.mint("producer", scopes=["events:publish"], **kwargs)
    print(
        "\ndev tokens (24 h; mint more with `.venv/bin/python -m broker token --sub NAME`):\n"
        f"  export TOKEN={token}\n"
        f"  export PRODUCER_TOKEN={producer}\n\n"
        "try it:\n"
        f'  curl -si -X POST {base}/queues/subscribe -H "Authorization: Bearer $TOKEN" '
        '-d \'{"topics":["connections"]}\'\n'
        f"  curl -si '{base}/queues/QUEUE_ID?wait=30' -H \"Authorization: Bearer $TOKEN\"\n",
        file=sys.stdout,
        flush=True,
    )
