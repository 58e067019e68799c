"""The application factory: wires settings, Redis, the hub, auth and the HTTP surfaces."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from redis.asyncio import Redis

from broker import http, persistence, routing
from broker.api import events, health, publish, queues, subscriptions, wellknown
from broker.appkeys import (
    background_key,
    gcstats_key,
    hub_key,
    looplag_key,
    metrics_key,
    persistence_key,
    settings_key,
    signer_key,
    signing_pool_key,
    store_key,
    verifier_key,
)
from broker.auth import TokenVerifier
from broker.config import Settings
from broker.errors import ConfigError
from broker.gcstats import GcStats
from broker.hub import Hub, RedisPyWakeSource, RespWakeSource, WakeSource
from broker.looplag import LoopLag
from broker.metrics import Metrics
from broker.redisconn import (
    CLIENT_NAME,
    HUB_CLIENT_NAME,
    create_blocking_client,
    create_command_client,
)
from broker.resp import RespClient
from broker.scripts import RedisPyRunner, RespRunner, ScriptRunner
from broker.signing import LoopSigning, Signer, key_path
from broker.signproc import SigningProcesses
from broker.store import QueueStore

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    redis: Redis | None = None,
    blocking_redis: Redis | None = None,
) -> web.Application:
    """Build the application. Clients can be injected (tests); else they come from redis.url."""
    http.hide_versions()
    if redis is None and not settings.redis.url:
        raise ConfigError(
            "Config 'redis.url' is empty: start the embedded server first "
            "(`python -m broker serve` does) or set BROKER_REDIS_URL."
        )
    # No middleware: routing.install wraps each handler instead (see routing.py for why).
    app = web.Application(client_max_size=settings.publish.max_body_bytes)
    app[settings_key] = settings
    app[metrics_key] = Metrics()
    app[gcstats_key] = GcStats()
    app[looplag_key] = LoopLag()
    app[background_key] = set()
    app[verifier_key] = TokenVerifier.from_settings(settings.auth, settings.data_dir)
    app[signer_key] = Signer.from_settings(settings.signing, settings.data_dir)
    app[signing_pool_key] = LoopSigning(app[signer_key])

    async def signing_ctx(app: web.Application) -> AsyncIterator[None]:
        if settings.signing.processes <= 0:
            yield
            return
        procs = SigningProcesses(
            key_path(settings.signing, settings.data_dir), settings.signing.processes
        )
        await procs.start()
        app[signing_pool_key] = procs
        try:
            yield
        finally:
            await procs.aclose()

    app.cleanup_ctx.append(signing_ctx)

    async def redis_ctx(app: web.Application) -> AsyncIterator[None]:
        command = redis or create_command_client(settings.redis.url, settings.redis)
        # Scripts (every poll and publish) and the hub's blocking reads each go through one
        # RespClient connection; injected clients (tests, fakeredis) and TLS (rediss://)
        # stay on redis-py.
        runner: ScriptRunner
        source: WakeSource
        r = settings.redis
        if redis is None and not r.url.startswith("rediss://"):
            runner = RespRunner(
                RespClient(
                    r.url,
                    timeout_s=r.socket_timeout_s,
                    connect_timeout_s=r.socket_timeout_s,
                    name=CLIENT_NAME,
                )
            )
            source = RespWakeSource(
                RespClient(
                    r.url,
                    # the watchdog must not mistake a blocking read for a hung server
                    timeout_s=settings.poll.hub_block_ms / 1000 + r.socket_timeout_s,
                    connect_timeout_s=r.socket_timeout_s,
                    name=HUB_CLIENT_NAME,
                )
            )
        else:
            runner = RedisPyRunner(command)
            source = RedisPyWakeSource(
                blocking_redis or create_blocking_client(r.url, r, settings.poll.hub_block_ms)
            )
        app[store_key] = QueueStore(
            command,
            ttl_s=settings.queues.ttl_s,
            maxlen=settings.queues.maxlen,
            max_batch=settings.queues.max_batch,
            idempotency_ttl_s=settings.publish.idempotency_ttl_s,
            runner=runner,
        )
        # What an acknowledged event survives, said once per worker (broker/persistence.py).
        app[persistence_key] = await persistence.read(command)
        persistence.announce(app[persistence_key])
        hub = Hub(source, block_ms=settings.poll.hub_block_ms)
        await hub.start()
        app[hub_key] = hub
        try:
            yield
        finally:
            await hub.aclose()
            if app[background_key]:
                await asyncio.gather(*app[background_key], return_exceptions=True)
            await app[store_key].aclose()

    async def release_waiters(app: web.Application) -> None:
        # Parked polls answer now (with what they have) instead of being cancelled later.
        app[hub_key].release_all()

    async def gc_ctx(app: web.Application) -> AsyncIterator[None]:
        app[gcstats_key].install()
        app[looplag_key].start()
        yield
        await app[looplag_key].stop()
        app[gcstats_key].uninstall()

    app.cleanup_ctx.append(gc_ctx)
    app.cleanup_ctx.append(redis_ctx)
    app.cleanup_ctx.append(events.ob_ctx)  # after redis_ctx: it uses the command client
    app.on_shutdown.append(release_waiters)
    routing.install(
        app, (api.routes for api in (queues, publish, health, events, subscriptions, wellknown))
    )
    return app
