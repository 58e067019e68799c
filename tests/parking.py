"""Finding the connection of a parked poll, once broker.http.parked has trimmed it."""

from __future__ import annotations

import asyncio
from typing import Any

from broker import http


async def parked_connection(server: Any) -> Any:
    """The aiohttp RequestHandler of the one poll `parked` has run for (waits up to 2 s).

    Waits for parked itself, not for the hub's waiter count: a poll registers with the hub
    before its first read, and parked runs only after that read.
    """
    for _ in range(100):
        busy = [
            p
            for p in server.connections
            if p._request_in_progress and type(p._messages) is http._MessageQueue
        ]
        if busy:
            (conn,) = busy
            return conn
        await asyncio.sleep(0.02)
    raise AssertionError("no poll was parked (or parked no longer trims the message queue)")
