"""Oxlin/Linxo "Queues & events": POST /queues/subscribe and GET /queues/{queue_id}."""

from __future__ import annotations

import asyncio

from aiohttp import web

from broker import jsonutil, keyspace, oxlin
from broker.appkeys import hub_key, metrics_key, settings_key, store_key
from broker.errors import NotFound
from broker.http import (
    authenticate,
    client_gone,
    finish,
    held,
    in_background,
    parked,
    read_json,
    requested_wait,
)
from broker.routing import answer_error, guards_itself
from broker.store import PollResult, QueueStore, new_poll_token

routes = web.RouteTableDef()


@routes.post("/queues/subscribe")
async def subscribe(request: web.Request) -> web.Response:
    principal = authenticate(request)
    settings = request.app[settings_key]
    topics = oxlin.parse_subscribe_topics(
        await read_json(request, lenient_type=True), settings.queues.topics
    )
    store = request.app[store_key]
    queue_id = await finish(request, lambda: store.subscribe(principal.sub, topics))
    location = f"/queues/{queue_id}"
    return jsonutil.json_response(
        {"id": queue_id, "topics": topics, "expires_in": settings.queues.ttl_s},
        status=201,
        headers={"Location": location},
    )


# No HEAD: a poll consumes what it returns, and a HEAD answer would drop the events.
@routes.get("/queues/{queue_id}", allow_head=False)
@guards_itself
async def poll(request: web.Request) -> web.Response:
    # Answers its own errors: a parked poll holds no wrapper frame (routing.guards_itself).
    try:
        app = request.app
        principal = authenticate(request, app)
        settings, store, hub = app[settings_key], app[store_key], app[hub_key]
        queue_id = request.match_info["queue_id"]
        user = principal.sub
        wait = requested_wait(request, settings.poll.max_wait_s)

        if wait <= 0:
            result = await _consume(request, store, user, queue_id)
        else:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + held(wait, settings.poll.hold_jitter)
            # Register first, then read: a publish landing between the read and the wait still
            # finds this waiter registered (see hub.py).
            with hub.watch(keyspace.user_tag(user)) as waiter:
                while True:
                    waiter.arm()
                    result = await _consume(request, store, user, queue_id)
                    remaining = deadline - loop.time()
                    if result.count or remaining <= 0 or hub.closing or client_gone(request):
                        break
                    parked(request)
                    if not await waiter.until(remaining) and loop.time() >= deadline:
                        # Timed out with no hint: nothing was published for this user, so
                        # no last read (a script per time-out saved). An event racing the
                        # deadline waits in the stream for the client's next poll.
                        break

        metrics = app[metrics_key]
        metrics.queue_polls_total += 1
        headers = {"Cache-Control": "no-store"}
        if result.dropped:
            metrics.queue_events_dropped_total += result.dropped
            headers["Broker-Events-Dropped"] = str(result.dropped)
        if result.body is None:
            return web.Response(status=204, headers=headers)
        if client_gone(request):
            # The answer cannot be sent; hand the events to the next poll instead of losing them.
            await finish(request, lambda: store.rewind(user, queue_id, result.token))
            metrics.queue_rewinds_total += 1
            return web.Response(status=204, headers=headers)
        metrics.queue_events_delivered_total += result.count
        return jsonutil.raw_json_response(result.body, headers=headers)
    except Exception as e:  # CancelledError is a BaseException: it goes through
        return answer_error(request, e)


async def _consume(request: web.Request, store: QueueStore, user: str, queue_id: str) -> PollResult:
    token = new_poll_token()
    try:
        result = await store.poll(user, queue_id, token)
    except asyncio.CancelledError:
        # The client left while we read. The script may have run (a sent command runs
        # whatever happens to its caller), so undo it by its token; a no-op if it did not.
        in_background(request, store.rewind(user, queue_id, token))
        request.app[metrics_key].queue_rewinds_total += 1
        raise
    if result is None:
        raise NotFound(f"queue {queue_id!r} does not exist or has expired", code="queue_not_found")
    return result
