"""OB event subscriptions: POST/GET /event-subscriptions, PUT/DELETE /event-subscriptions/{id}.

One subscription per TPP (the token's client id). An unknown or foreign id in the URL is a
400, not a 404 (OB: 404 is for endpoints that are not implemented).
"""

from __future__ import annotations

from aiohttp import web

from broker import jsonutil, ob
from broker.appkeys import settings_key, subscriptions_key
from broker.errors import Conflict, InvalidRequest
from broker.http import authenticate, finish, read_json
from broker.subscriptions import Subscription, parse_subscription

routes = web.RouteTableDef()
PATH = "/event-subscriptions"


def _client(request: web.Request) -> str:
    principal = authenticate(request)
    principal.require_scope(*ob.POLL_SCOPES)
    return principal.client_id


def _self_link(request: web.Request, sub_id: str | None = None) -> str:
    return f"{request.scheme}://{request.host}{PATH}" + (f"/{sub_id}" if sub_id else "")


def _one(request: web.Request, sub: Subscription, status: int) -> web.Response:
    body = {"Data": sub.to_data(), "Links": {"Self": _self_link(request, sub.id)}, "Meta": {}}
    return jsonutil.json_response(body, status=status)


def _unknown(sub_id: str) -> InvalidRequest:
    return ob.bad(
        f"no event subscription {sub_id!r} for this client", "EventSubscriptionId", ob.NOT_FOUND
    )


@routes.post(PATH)
async def create(request: web.Request) -> web.Response:
    client = _client(request)
    push = request.app[settings_key].push
    new = parse_subscription(
        await read_json(request),
        allow_http=push.allow_http,
        allow_private=push.allow_private_addresses,
    )
    store = request.app[subscriptions_key]
    sub = await finish(request, lambda: store.create(client, new))
    if sub is None:
        raise Conflict(
            "an event subscription already exists for this client; PUT or DELETE it",
            code=ob.ALREADY_EXISTS,
        )
    return _one(request, sub, 201)


@routes.get(PATH)
async def list_all(request: web.Request) -> web.Response:
    client = _client(request)
    sub = await request.app[subscriptions_key].get(client)
    body = {
        "Data": {"EventSubscription": [sub.to_data()] if sub else []},
        "Links": {"Self": _self_link(request)},
        "Meta": {},
    }
    return jsonutil.json_response(body)


@routes.put(PATH + "/{sub_id}")
async def change(request: web.Request) -> web.Response:
    client = _client(request)
    sub_id = request.match_info["sub_id"]
    push = request.app[settings_key].push
    new = parse_subscription(
        await read_json(request),
        path_id=sub_id,
        allow_http=push.allow_http,
        allow_private=push.allow_private_addresses,
    )
    store = request.app[subscriptions_key]
    if not await finish(request, lambda: store.update(client, sub_id, new)):
        raise _unknown(sub_id)
    return _one(request, Subscription(sub_id, new.version, new.callback_url, new.event_types), 200)


@routes.delete(PATH + "/{sub_id}")
async def delete(request: web.Request) -> web.Response:
    client = _client(request)
    sub_id = request.match_info["sub_id"]
    store = request.app[subscriptions_key]
    if not await finish(request, lambda: store.delete(client, sub_id)):
        raise _unknown(sub_id)
    return web.Response(status=204)
