"""What the broker reads and says of Redis's persistence at start."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis.exceptions
from redis.asyncio import Redis

from broker import persistence
from broker.config import Settings
from broker.embedded import EmbeddedRedis
from broker.errors import ConfigError
from broker.persistence import Persistence


@pytest.mark.parametrize(
    ("p", "level", "says"),
    [
        (Persistence("yes", "always", ""), logging.INFO, "survive a host crash"),
        (Persistence("yes", "everysec", ""), logging.INFO, "about the last second"),
        (Persistence("yes", "no", "3600 1"), logging.INFO, "the last ~30 s"),
        (
            Persistence("no", "everysec", "3600 1 300 100"),
            logging.WARNING,
            "since the last snapshot",
        ),
        (Persistence("no", "everysec", ""), logging.WARNING, "loses every queue"),
        (Persistence(), logging.WARNING, "unknown"),
    ],
)
def test_each_setting_is_said_at_its_level(p: Persistence, level: int, says: str):
    got_level, message = p.describe()
    assert got_level == level
    assert says in message


def test_the_gauge_names_the_settings_or_says_unknown():
    assert Persistence("yes", "everysec", "").gauge() == {
        'redis_persistence_info{appendonly="yes",appendfsync="everysec",snapshots="no"}': 1
    }
    # snapshots only and nothing at all differ in the gauge too, as in the log
    assert Persistence("no", "everysec", "3600 1").gauge() == {
        'redis_persistence_info{appendonly="no",appendfsync="everysec",snapshots="yes"}': 1
    }
    assert Persistence(error="ResponseError: no").gauge() == {
        'redis_persistence_info{appendonly="unknown",appendfsync="unknown",snapshots="unknown"}': 1
    }
    odd = Persistence('y"es', "a\\b", "")  # whatever a Redis-compatible server answers
    assert 'appendonly="y\\"es",appendfsync="a\\\\b"' in next(iter(odd.gauge()))


async def test_a_refused_config_get_is_unknown_with_its_reason_not_an_error():
    class Refusing:
        async def config_get(self, name: str) -> dict[str, str]:
            raise redis.exceptions.ResponseError("unknown command 'CONFIG'")

    p = await persistence.read(Refusing())
    assert not p.known and p.error == "ResponseError: unknown command 'CONFIG'"
    assert "ResponseError: unknown command 'CONFIG'" in p.describe()[1]
    fake = await persistence.read(fakeredis.FakeAsyncRedis())  # fakeredis has no CONFIG GET
    assert not fake.known and fake.error


async def test_the_embedded_servers_fsync_is_read_back(tmp_path: Path):
    server = EmbeddedRedis(tmp_path / "always", appendfsync="always")
    url = server.start()
    try:
        client = Redis.from_url(url)
        try:
            p = await persistence.read(client)
        finally:
            await client.aclose()
    finally:
        server.stop()
    assert (p.appendonly, p.appendfsync, p.save) == ("yes", "always", "")
    assert p.describe()[0] == logging.INFO


async def test_a_server_without_persistence_is_warned_of(
    real_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture
):
    client = Redis.from_url(real_server.url)  # the tests' server: no AOF, no snapshots
    try:
        p = await persistence.read(client)
    finally:
        await client.aclose()
    persistence.announce(p)
    assert (p.appendonly, p.save) == ("no", "")
    assert any(
        r.levelno == logging.WARNING and "loses every queue" in r.getMessage()
        for r in caplog.records
    )


async def test_metrics_show_what_redis_said(client: Any, redis_pair: Any):
    text = await (await client.get("/metrics")).text()
    # fakeredis refuses CONFIG GET; the tests' real server keeps nothing on disk
    said = "unknown" if redis_pair.kind == "fake" else "no"
    assert f'broker_redis_persistence_info{{appendonly="{said}",' in text


def test_the_embedded_fsync_setting_is_checked(settings: Settings):
    assert settings.redis.embedded_appendfsync == "everysec"
    with pytest.raises(ConfigError, match=r"redis\.embedded_appendfsync"):
        settings.replace(redis={"embedded_appendfsync": "sometimes"})
