"""Shared fixtures: settings from config/test.toml, fake and real Redis, apps and tokens.

`redis_kind` runs a test body against fakeredis and against a real Redis-compatible server
that the session starts itself (the embedded valkey binary), so `make test` needs nothing
installed or running beforehand.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from broker.app import create_app
from broker.auth import DevIssuer
from broker.config import Settings, load_settings
from broker.embedded import EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("broker-data")


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """One real server for the session, on a free port; tests flush it."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("valkey"), appendonly=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(data_dir: Path) -> Settings:
    s = load_settings(ROOT / "config" / "test.toml", environ={})
    return s.replace(redis={"data_dir": str(data_dir)})


@pytest.fixture
def issuer(data_dir: Path) -> DevIssuer:
    return DevIssuer.load_or_create(data_dir)


@pytest.fixture
def token(issuer: DevIssuer) -> Callable[..., str]:
    """token("alice", scopes=[...], client_id=...) -> a bearer token the app accepts."""

    def make(sub: str, **kwargs: Any) -> str:
        return issuer.mint(sub, **kwargs)

    return make


@pytest.fixture
def auth(token: Callable[..., str]) -> Callable[..., dict[str, str]]:
    """auth("alice") -> headers with a bearer token for alice."""

    def make(sub: str, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(sub, **kwargs)}"}

    return make


class RedisPair:
    """A command client and a blocking client on one server (fake or real)."""

    def __init__(self, kind: str, make: Callable[[], Redis], url: str | None) -> None:
        self.kind = kind
        self._make = make
        self.url = url
        self.clients: list[Redis] = []

    def client(self) -> Redis:
        c = self._make()
        self.clients.append(c)
        return c


@pytest.fixture(params=["fake", "real"])
async def redis_pair(
    request: pytest.FixtureRequest, real_server: EmbeddedRedis
) -> AsyncIterator[RedisPair]:
    if request.param == "fake":
        server = fakeredis.FakeServer()
        pair = RedisPair("fake", lambda: fakeredis.FakeAsyncRedis(server=server), None)
    else:
        url = real_server.url
        pair = RedisPair("real", lambda: Redis.from_url(url), url)
        admin = Redis.from_url(url)
        await admin.flushall()
        await admin.aclose()
    yield pair
    for c in pair.clients:
        await c.aclose()


@pytest.fixture
async def real_redis(real_server: EmbeddedRedis) -> AsyncIterator[RedisPair]:
    """Real server only: for blocking, expiry and multi-process behaviour."""
    url = real_server.url
    admin = Redis.from_url(url)
    await admin.flushall()
    await admin.aclose()
    pair = RedisPair("real", lambda: Redis.from_url(url), url)
    yield pair
    for c in pair.clients:
        await c.aclose()


AppFactory = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
def make_client(aiohttp_client: Any, settings: Settings, redis_pair: RedisPair) -> AppFactory:
    """make_client(**settings_changes) -> a test client of a full app on `redis_pair`.

    Each call builds a new app (a new "broker process") on the same Redis server. On fakeredis
    the app gets injected redis-py clients; on the real server it connects by URL, so its
    scripts go through the auto-pipelined RespClient as in production.
    """

    async def make(**changes: Any) -> TestClient[web.Request, web.Application]:
        s = settings.replace(**changes) if changes else settings
        if redis_pair.url is None:
            app = create_app(s, redis=redis_pair.client(), blocking_redis=redis_pair.client())
        else:
            # A real server: the app builds its own clients, as in production (RespClient).
            app = create_app(s.replace(redis={"url": redis_pair.url}))
        client: TestClient[web.Request, web.Application] = await aiohttp_client(
            app, server_kwargs={"handler_cancellation": True}
        )
        return client

    return make


@pytest.fixture
async def client(make_client: AppFactory) -> TestClient[web.Request, web.Application]:
    return await make_client()


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("PYTHONASYNCIODEBUG", "0")
