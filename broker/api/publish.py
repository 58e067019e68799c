"""Producer API: how events get into the broker (scope events:publish)."""

from __future__ import annotations

from aiohttp import web

from broker import jsonutil, oxlin
from broker.appkeys import metrics_key, settings_key, store_key
from broker.auth import PUBLISH_SCOPE
from broker.http import authenticate, finish, read_json

routes = web.RouteTableDef()


@routes.post("/publish/users/{user_id}/events")
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
    # Once the script has run the events are stored; let it finish even if the producer leaves.
    result = await finish(request, lambda: store.publish(user_id, events))
    request.app[metrics_key].events_published_total += len(events)
    return jsonutil.json_response({"ids": result.ids, "queues": result.queues}, status=202)
