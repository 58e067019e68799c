"""Producer API: how events get into the broker (scope events:publish)."""

from __future__ import annotations

import re

from aiohttp import web

from broker import jsonutil, oxlin
from broker.appkeys import metrics_key, settings_key, store_key
from broker.auth import PUBLISH_SCOPE
from broker.errors import InvalidRequest
from broker.http import authenticate, finish, read_json

routes = web.RouteTableDef()
_KEY = re.compile(r"^[\x21-\x7e]{1,128}$")


def idempotency_key(request: web.Request) -> str | None:
    """The producer's Idempotency-Key: a retry with the same key gets the first answer."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _KEY.match(key):
        raise InvalidRequest(
            "Idempotency-Key must be 1-128 visible ASCII characters", path="Idempotency-Key"
        )
    return key


# Any character but "/" (the default pattern refuses braces, which user ids may hold).
@routes.post("/publish/users/{user_id:[^/]+}/events")
async def publish_user_events(request: web.Request) -> web.Response:
    """Fan one event or an array of events out to the user's live queues; 202 when stored."""
    authenticate(request).require_scope(PUBLISH_SCOPE)
    settings = request.app[settings_key]
    events = oxlin.encode_events(
        await read_json(request),
        settings.queues.topics,
        max_event_bytes=settings.publish.max_event_bytes,
        max_batch=settings.publish.max_batch,
    )
    store = request.app[store_key]
    user_id = request.match_info["user_id"]
    key = idempotency_key(request)
    # Once the script has run the events are stored; let it finish even if the producer leaves.
    result = await finish(request, lambda: store.publish(user_id, events, idempotency_key=key))
    request.app[metrics_key].events_published_total += len(events)
    return jsonutil.json_response({"ids": result.ids, "queues": result.queues}, status=202)
