"""Behaviour that needs a real server: two broker apps on one Redis, restarts, blocking reads."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest
from redis.asyncio import Redis

from broker import keyspace
from broker.app import create_app
from broker.appkeys import hub_key
from broker.config import Settings
from broker.embedded import EmbeddedRedis
from broker.errors import ConfigError
from broker.hub import Hub, RedisPyWakeSource, RespWakeSource, WakeSource
from broker.redisconn import (
    CLIENT_NAME,
    HUB_CLIENT_NAME,
    create_blocking_client,
    create_command_client,
)
from broker.resp import RespClient
from tests.oxlin_helpers import connection_event, publish, subscribe


@pytest.fixture
async def two_apps(aiohttp_client, settings, real_redis):
    clients = []
    for _ in range(2):
        app = create_app(settings.replace(redis={"url": real_redis.url}))
        clients.append(await aiohttp_client(app, server_kwargs={"handler_cancellation": True}))
    return clients


async def test_poll_on_one_app_is_woken_by_a_publish_on_another(two_apps, auth):
    a, b = two_apps
    loc = await subscribe(a, auth, "u1")
    poll = asyncio.ensure_future(a.get(loc + "?wait=5", headers=auth("u1")))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await publish(b, auth, "u1", connection_event(event_type="FROM_B"))
    r = await asyncio.wait_for(poll, 4)
    assert r.status == 200
    assert [e["event_type"] for e in await r.json()] == ["FROM_B"]
    assert time.monotonic() - started < 3.5  # woken, not timed out at 5 s


async def test_event_is_delivered_once_across_two_apps_polling_one_queue(two_apps, auth):
    a, b = two_apps
    loc = await subscribe(a, auth, "u1")
    polls = [asyncio.ensure_future(c.get(loc + "?wait=3", headers=auth("u1"))) for c in (a, b)]
    await asyncio.sleep(0.3)
    await publish(a, auth, "u1", [connection_event(), connection_event()])
    got = []
    for r in await asyncio.gather(*polls):
        if r.status == 200:
            got += [e["id"] for e in await r.json()]
        else:
            assert r.status == 204
    assert len(got) == 2 and len(set(got)) == 2


async def test_an_app_keeps_at_most_four_redis_connections_whatever_the_waiters(
    aiohttp_client, settings, real_redis, auth
):
    admin = real_redis.client()
    for _ in range(100):  # connections of earlier tests may still be closing
        if len(await admin.client_list()) == 1:
            break
        await asyncio.sleep(0.05)
    assert len(await admin.client_list()) == 1, "earlier apps left connections open"
    app = create_app(settings.replace(redis={"url": real_redis.url}))
    a = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
    locs = [await subscribe(a, auth, f"user{i}") for i in range(60)]
    polls = [
        asyncio.ensure_future(a.get(loc + "?wait=3", headers=auth(f"user{i}")))
        for i, loc in enumerate(locs)
    ]
    for _ in range(150):
        if a.app[hub_key].waiting == 60:
            break
        await asyncio.sleep(0.02)
    assert a.app[hub_key].waiting == 60
    clients = await admin.client_list()
    # pooled redis-py (max_connections) + the auto-pipelined RESP connection + the blocking
    # hub reader, plus the admin client asking
    assert len(clients) - 1 <= settings.redis.max_connections + 2 == 4
    await publish(a, auth, "user7", connection_event())
    r = await polls[7]
    assert r.status == 200
    for p in polls:
        p.cancel()
    await asyncio.gather(*polls, return_exceptions=True)


def _wake_source(kind: str, url: str, settings: Settings) -> WakeSource:
    if kind == "resp":
        return RespWakeSource(RespClient(url, timeout_s=0.2 + settings.redis.socket_timeout_s))
    return RedisPyWakeSource(create_blocking_client(url, settings.redis, 200))


@pytest.mark.parametrize("kind", ["resp", "redis-py"])
async def test_hub_read_outlives_its_block_time_without_errors(settings, real_redis, kind):
    hub = Hub(_wake_source(kind, real_redis.url, settings), block_ms=200)
    await hub.start()
    await asyncio.sleep(1.0)  # five empty blocking reads
    assert hub.running and hub.reconnects == 0
    await hub.aclose()


@pytest.mark.parametrize("kind", ["resp", "redis-py"])
async def test_hub_wakes_the_waiters_of_the_tags_it_reads(settings, real_redis, kind):
    writer = real_redis.client()
    await writer.xadd(keyspace.WAKE_STREAM, {"t": "u:old"})  # before start: not a hint for us
    hub = Hub(_wake_source(kind, real_redis.url, settings), block_ms=200)
    await hub.start()
    with hub.watch("u:a") as a, hub.watch("u:b") as b, hub.watch("u:old") as old:
        fa, fb, fold = a.until(5), b.until(0.5), old.until(0.5)
        await writer.xadd(keyspace.WAKE_STREAM, {"t": "u:a"})
        await writer.xadd(keyspace.WAKE_STREAM, {"x": "1", "t": "u:a"})  # field order is free
        assert await asyncio.wait_for(fa, 2) is True
        assert await fb is False and await fold is False
    assert hub.hints == 2
    await hub.aclose()


async def test_an_app_names_its_redis_connections(aiohttp_client, settings, real_redis):
    app = create_app(settings.replace(redis={"url": real_redis.url}))
    client = await aiohttp_client(app)
    r = await client.get("/readyz")
    assert r.status == 200
    names = {c["name"] for c in await real_redis.client().client_list()}
    assert {CLIENT_NAME, HUB_CLIENT_NAME} <= names


async def test_events_survive_a_server_restart_with_aof(tmp_path, settings, auth, aiohttp_client):
    server = EmbeddedRedis(tmp_path / "aof", appendonly=True)
    url = server.start()
    try:
        s = settings.replace(redis={"url": url}, queues={"ttl_s": 600})
        client = await aiohttp_client(create_app(s))
        loc = await subscribe(client, auth, "u1")
        await publish(client, auth, "u1", connection_event(event_type="DURABLE"))
        await client.close()
        # appendfsync everysec: give the AOF its second, then stop (SIGTERM flushes anyway)
        server.stop()
        server.start()
        client = await aiohttp_client(create_app(s))
        r = await client.get(loc, headers=auth("u1"))
        assert r.status == 200
        assert [e["event_type"] for e in await r.json()] == ["DURABLE"]
        await client.close()
    finally:
        server.stop()


async def test_hub_resumes_after_redis_restarts_and_waiters_still_wake(
    tmp_path, settings, auth, aiohttp_client
):
    server = EmbeddedRedis(tmp_path / "restart", appendonly=True)
    url = server.start()
    port = server.port
    try:
        s = settings.replace(redis={"url": url}, poll={"hub_block_ms": 300})
        client = await aiohttp_client(create_app(s), server_kwargs={"handler_cancellation": True})
        loc = await subscribe(client, auth, "u1")
        hub = client.app[hub_key]
        server.stop()
        await asyncio.sleep(0.6)  # the hub notices and backs off
        server.port = port
        server.start()
        for _ in range(100):
            if hub.reconnects and hub.running:
                break
            await asyncio.sleep(0.05)
        assert hub.running and hub.reconnects >= 1
        poll = asyncio.ensure_future(client.get(loc + "?wait=5", headers=auth("u1")))
        await asyncio.sleep(0.5)
        started = time.monotonic()
        await publish(client, auth, "u1", connection_event(event_type="AFTER_RESTART"))
        r = await asyncio.wait_for(poll, 5)
        assert r.status == 200
        assert [e["event_type"] for e in await r.json()] == ["AFTER_RESTART"]
        assert time.monotonic() - started < 3.5  # woken, not timed out at 5 s
        await client.close()
    finally:
        server.stop()


async def test_store_unavailable_is_a_503_not_a_hang(settings, auth, aiohttp_client, tmp_path):
    server = EmbeddedRedis(tmp_path / "gone", appendonly=False)
    url = server.start()
    s = settings.replace(redis={"url": url, "socket_timeout_s": 1.0})
    client = await aiohttp_client(create_app(s))
    loc = await subscribe(client, auth, "u1")
    server.stop()
    started = time.monotonic()
    r = await client.get(loc, headers=auth("u1"))
    assert r.status == 503
    assert (await r.json())["error"] == "unavailable"
    assert r.headers["Retry-After"] == "1"
    assert time.monotonic() - started < 5
    await client.close()


async def test_command_client_never_retries_writes(settings, real_redis):
    r: Redis = create_command_client(real_redis.url, settings.redis)
    retry = r.get_retry()
    assert retry is not None and retry.get_retries() == 0
    pool = r.connection_pool
    assert pool.max_connections == settings.redis.max_connections
    await r.aclose()


async def test_embedded_server_on_a_unix_socket_serves_the_whole_app(
    tmp_path, aiohttp_client, settings, auth
):
    """serve's embedded server: clients connect over its socket file, only this user may."""
    # A short base: pytest's tmp_path can pass the ~100 bytes a socket path may have (macOS).
    base = Path(tempfile.mkdtemp(prefix="brk-", dir="/tmp"))
    server = EmbeddedRedis(base / "with space", appendonly=False, unix_socket=True)
    server.start()
    try:
        url = server.client_url
        assert url.startswith("unix://") and "with%20space" in url
        assert stat.S_IMODE(os.stat(server.socket_path).st_mode) == 0o700
        app = create_app(settings.replace(redis={"url": url}))
        client = await aiohttp_client(app, server_kwargs={"handler_cancellation": True})
        loc = await subscribe(client, auth, "u1")
        poll = asyncio.ensure_future(client.get(loc + "?wait=5", headers=auth("u1")))
        for _ in range(100):
            if app[hub_key].waiting == 1:
                break
            await asyncio.sleep(0.02)
        await publish(client, auth, "u1", connection_event(event_type="OVER_UNIX"))
        r = await asyncio.wait_for(poll, 4)
        assert r.status == 200
        assert [e["event_type"] for e in await r.json()] == ["OVER_UNIX"]
        # every connection of the app came over the socket (flag U), none over TCP
        admin = Redis.from_url(url)
        clients = await admin.client_list()
        await admin.aclose()
        assert {CLIENT_NAME, HUB_CLIENT_NAME} <= {c["name"] for c in clients}
        assert all("U" in c["flags"] for c in clients)
        # a second embedded server on the same data directory would take the socket over
        with pytest.raises(ConfigError, match="Another embedded server"):
            EmbeddedRedis(base / "with space", appendonly=False, unix_socket=True).start()
        assert await RespClient(url).execute("PING") in (b"PONG", "PONG")
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_embedded_server_falls_back_to_tcp_when_it_cannot_make_its_socket(tmp_path):
    base = Path(tempfile.mkdtemp(prefix="brk-", dir="/tmp"))
    try:
        server = EmbeddedRedis(base / "r", appendonly=False, unix_socket=True)
        server.socket_path.mkdir(parents=True)  # a directory where the socket should go
        url = server.start()
        try:
            assert not server.unix_socket and server.client_url == url
            with socket.create_connection(("127.0.0.1", server.port)) as s:
                s.sendall(b"PING\r\n")
                assert s.recv(16).startswith(b"+PONG")
        finally:
            server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_embedded_server_keeps_to_tcp_when_the_socket_path_is_too_long(tmp_path):
    deep = tmp_path / ("d" * 120)
    server = EmbeddedRedis(deep, unix_socket=True)
    assert not server.unix_socket
    server.port = 6390
    assert server.client_url == "redis://127.0.0.1:6390/0"
