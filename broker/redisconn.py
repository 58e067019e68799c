"""Redis clients: a small pooled client for commands and a dedicated one for blocking reads.

Both never retry on their own: a retried XADD or EVAL can store an event twice, and a retried
blocking XREAD hides an outage for minutes (redis-py's default is 10 silent retries).
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from broker.config import RedisSettings

# Names shown by CLIENT LIST, so an operator can tell the broker's connections apart.
CLIENT_NAME = "broker"
HUB_CLIENT_NAME = "broker-hub"


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def create_command_client(url: str, settings: RedisSettings) -> Redis:
    """Pooled client for scripts and commands; waits for a free connection instead of raising."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=settings.max_connections,
        timeout=settings.socket_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        retry=_no_retry(),
        client_name=CLIENT_NAME,
    )
    return Redis(connection_pool=pool, retry=_no_retry())


def create_blocking_client(url: str, settings: RedisSettings, block_ms: int) -> Redis:
    """One connection for the hub's XREAD BLOCK; its socket time-out is longer than the block."""
    return Redis.from_url(
        url,
        single_connection_client=True,
        socket_timeout=block_ms / 1000 + settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        retry=_no_retry(),
        client_name=HUB_CLIENT_NAME,
    )
