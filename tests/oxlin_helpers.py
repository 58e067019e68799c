"""Helpers for Oxlin queue tests: subscribe, publish and event factories."""

from __future__ import annotations

import itertools
from typing import Any
from urllib.parse import quote

_seq = itertools.count(1)


def connection_event(**overrides: Any) -> dict[str, Any]:
    """A CONNECTION event as a producer sends it (the seed's example shape)."""
    n = next(_seq)
    event: dict[str, Any] = {
        "topic": "connections",
        "event_type": "SYNC_ALL_STARTED",
        "resource_type": "CONNECTION",
        "channel_definition_id": "redirect1",
        "resource": {
            "id": f"conn-{n}",
            "provider_id": "200",
            "name": "WBX Test Bank",
            "status": "SUCCESS",
            "creation_date": 0,
            "channels": [
                {
                    "channel_definition_id": "8701",
                    "expires": 1527761000,
                    "status": "RUNNING",
                    "last_success_date": 1527760963,
                    "last_end_date": 1527760963,
                },
            ],
        },
    }
    event.update(overrides)
    return event


async def subscribe(client: Any, auth: Any, user: str, topics: Any = ("connections",)) -> str:
    r = await client.post("/queues/subscribe", json={"topics": list(topics)}, headers=auth(user))
    assert r.status == 201, await r.text()
    return str(r.headers["Location"])


async def publish(client: Any, auth: Any, user: str, events: Any) -> dict[str, Any]:
    r = await client.post(
        f"/publish/users/{quote(user, safe='')}/events",
        json=events,
        headers=auth("producer", scopes=["events:publish"]),
    )
    assert r.status == 202, await r.text()
    body: dict[str, Any] = await r.json()
    return body
