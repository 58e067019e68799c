"""The Oxlin event object: checking a producer's event and encoding it for storage.

Stored bodies hold every member but `id`, in the order the Oxlin documentation shows; the id
is kept beside the body so the broker can assign it inside the publish script.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

from broker import jsonutil
from broker.errors import InvalidRequest
from broker.store import QueueEvent

_ALLOWED = frozenset(
    {
        "topic",
        "id",
        "event_type",
        "resource_type",
        "creation_date",
        "channel_definition_id",
        "resource",
    }
)
# The resource type of the documented topics' events (spec §9.3: "connections" is CONNECTION
# events). Topics added by configuration carry whatever their producers send.
_CARRIES = {"connections": "CONNECTION"}
# Ids go into the JSON answer unescaped, so they are restricted to characters that need none.
_ID = re.compile(r"^[0-9A-Za-z._:-]{1,64}$")


def parse_subscribe_topics(body: Any, known: Sequence[str]) -> list[str]:
    """The topics of a `POST /queues/subscribe` body, or InvalidRequest saying what is wrong."""
    if not isinstance(body, dict):
        raise InvalidRequest('body must be a JSON object like {"topics": ["connections"]}')
    topics = body.get("topics")
    if not isinstance(topics, list) or not topics:
        raise InvalidRequest("'topics' must be a non-empty array of topic names", path="topics")
    out: list[str] = []
    for t in topics:
        if not isinstance(t, str):
            raise InvalidRequest("'topics' must contain strings only", path="topics")
        if t not in known:
            raise InvalidRequest(
                f"unknown topic {t!r}; known topics: {', '.join(known)}", path="topics"
            )
        if t not in out:
            out.append(t)
    return out


def encode_events(
    payload: Any, known_topics: Sequence[str], *, max_event_bytes: int, max_batch: int
) -> list[QueueEvent]:
    """Check one event object or an array of them; all must be valid or none is stored."""
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise InvalidRequest("no events given")
    if len(items) > max_batch:
        raise InvalidRequest(f"at most {max_batch} events per request, got {len(items)}")
    now = int(time.time())
    return [
        _encode_one(
            item, i if isinstance(payload, list) else None, known_topics, now, max_event_bytes
        )
        for i, item in enumerate(items)
    ]


def _encode_one(
    item: Any, index: int | None, known: Sequence[str], now: int, max_bytes: int
) -> QueueEvent:
    at = "" if index is None else f"[{index}]"

    def bad(msg: str, field: str = "") -> InvalidRequest:
        path = f"{at}.{field}" if field else at or None
        return InvalidRequest(f"event{at}: {msg}", path=path)

    if not isinstance(item, dict):
        raise bad("must be a JSON object")
    extra = set(item) - _ALLOWED
    if extra:
        raise bad(f"unknown member(s) {', '.join(sorted(extra))}")
    for name, limit in (("event_type", 128), ("resource_type", 64)):
        v = item.get(name)
        if not isinstance(v, str) or not v or len(v) > limit:
            raise bad(f"'{name}' must be a non-empty string of at most {limit} characters", name)
    topic = item.get("topic")
    if topic is None:
        guess = item["resource_type"].lower() + "s"  # CONNECTION -> connections
        if guess not in known:
            raise bad(f"'topic' is required (one of {', '.join(known)})", "topic")
        topic = guess
    elif not isinstance(topic, str) or topic not in known:
        raise bad(f"'topic' must be one of {', '.join(known)}", "topic")
    carries = _CARRIES.get(topic)
    if carries is not None and item["resource_type"] != carries:
        # A queue subscribed to the topic must never get another kind of event.
        raise bad(
            f"topic {topic!r} carries {carries} events, not {item['resource_type']}",
            "resource_type",
        )
    event_id = item.get("id", "")
    if event_id != "" and (not isinstance(event_id, str) or not _ID.match(event_id)):
        raise bad("'id' must be a string of 1-64 letters, digits or ._:-", "id")
    created = item.get("creation_date", now)
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise bad("'creation_date' must be a non-negative integer (epoch seconds)", "creation_date")
    channel = item.get("channel_definition_id")
    if channel is not None and (not isinstance(channel, str) or len(channel) > 128):
        raise bad("'channel_definition_id' must be a string", "channel_definition_id")
    resource = item.get("resource")
    if not isinstance(resource, dict):
        raise bad("'resource' must be a JSON object", "resource")
    ordered: dict[str, Any] = {
        "event_type": item["event_type"],
        "resource_type": item["resource_type"],
        "creation_date": created,
    }
    if channel is not None:
        ordered["channel_definition_id"] = channel
    ordered["resource"] = resource
    body = jsonutil.dumps(ordered)
    if len(body) > max_bytes:
        raise bad(f"is {len(body)} bytes, over the {max_bytes}-byte cap per event")
    return QueueEvent(topic=topic, id=event_id, body=body)
