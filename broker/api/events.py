"""UK OB aggregated polling (RFC 8936): POST /events, and the producer's SET publishing.

- `POST /publish/clients/{client_id}/sets` (scope events:publish): check the payloads, sign
  each SET once, queue the ones the client's subscription accepts (202 with their jtis).
- `POST /events` (client-credentials token, one of the OB scopes): ack, nack, select, and
  long-poll through the hub when nothing is ready.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from broker import ids, jsonutil, keyspace, ob
from broker.appkeys import (
    hub_key,
    metrics_key,
    pusher_key,
    sets_key,
    settings_key,
    signer_key,
    signing_pool_key,
    store_key,
    subscriptions_key,
)
from broker.auth import PUBLISH_SCOPE
from broker.errors import InvalidRequest, PayloadTooLarge
from broker.http import authenticate, client_gone, finish, held, parked, read_json
from broker.metrics import Metrics
from broker.push import Pusher
from broker.routing import guards_itself
from broker.sets import NO_SUBSCRIPTION, NOTHING, QUEUED, PollOutcome, SetStore, SignedSet
from broker.signing import compact_jws
from broker.subscriptions import SubscriptionStore

routes = web.RouteTableDef()
log = logging.getLogger(__name__)


async def ob_ctx(app: web.Application) -> AsyncIterator[None]:
    """The OB stores, on the command client of the queue store (registered after redis_ctx)."""
    settings = app[settings_key]
    store = app[store_key]
    redis = store.redis
    app[sets_key] = SetStore(
        redis,
        retention_s=settings.events.retention_s,
        redelivery_s=settings.events.redelivery_s,
        runner=store.runner,
    )
    app[subscriptions_key] = SubscriptionStore(redis)
    pusher = Pusher(
        redis,
        app[sets_key],
        settings.push,
        app[metrics_key],
        redis_timeout_s=settings.redis.socket_timeout_s,
    )
    app[pusher_key] = pusher
    pusher.start()
    try:
        yield
    finally:
        await pusher.aclose()


@routes.post("/publish/clients/{client_id}/sets")
async def publish_sets(request: web.Request) -> web.Response:
    """Sign and queue one SET payload or an array of them; 202 with the jtis queued."""
    authenticate(request).require_scope(PUBLISH_SCOPE)
    app = request.app
    settings = app[settings_key]
    payload = await read_json(request)
    items = payload if isinstance(payload, list) else [payload]
    if not items:
        raise InvalidRequest("no SETs given")
    if len(items) > settings.publish.max_batch:
        raise InvalidRequest(f"at most {settings.publish.max_batch} SETs, got {len(items)}")
    many = isinstance(payload, list)
    inputs = [ob.parse_set_input(item, f"[{i}]" if many else "") for i, item in enumerate(items)]
    client_id = request.match_info["client_id"]
    claims = [_claims(settings.signing.issuer, client_id, s) for s in inputs]
    for i, c in enumerate(claims):
        if len(jsonutil.dumps(c)) > settings.publish.max_event_bytes:
            raise PayloadTooLarge(
                f"SET[{i}] is over {settings.publish.max_event_bytes} bytes", path=f"[{i}]"
            )
    signer = app[signer_key]
    # The RSA work in the signing processes, or on the loop one signature per turn.
    to_sign = [signer.signing_input(c) for c in claims]
    sigs = await app[signing_pool_key].sign(to_sign)
    jws = [compact_jws(data, sig) for data, sig in zip(to_sign, sigs, strict=True)]
    signed = [
        SignedSet(c["jti"], j, s.event_codes) for c, j, s in zip(claims, jws, inputs, strict=True)
    ]
    store = app[sets_key]
    # Once the script has run the SETs are stored; let it finish even if the producer leaves.
    outcome = await finish(request, lambda: store.publish(client_id, signed))
    metrics = app[metrics_key]
    queued = [s.jti for s, f in zip(signed, outcome.flags, strict=True) if f == QUEUED]
    metrics.sets_published_total += len(queued)
    if outcome.callback and queued:
        # Stored already: a failure to schedule the push leaves them pollable, so the
        # producer's 202 stands.
        try:
            await finish(request, lambda: app[pusher_key].schedule(client_id, queued))
        except Exception:
            metrics.sets_push_unscheduled_total += len(queued)
            log.exception("push: scheduling %d SETs of %s failed", len(queued), client_id)
    if outcome.expired:
        _count_expired(request, client_id, outcome.expired)
    skipped = [
        {
            "index": i,
            "reason": "no_subscription" if f == NO_SUBSCRIPTION else "event_type_not_subscribed",
        }
        for i, f in enumerate(outcome.flags)
        if f != QUEUED
    ]
    body: dict[str, Any] = {"jtis": queued}
    if skipped:
        body["skipped"] = skipped
    return jsonutil.json_response(body, status=202)


def _claims(issuer: str, client_id: str, s: ob.SetInput) -> dict[str, Any]:
    now = int(time.time())
    # A fresh random UUID per SET; jtis are never reused (OB "jti recycling": never).
    jti = ids.uuid4()
    return {
        "iss": issuer,
        "iat": now,
        "jti": jti,
        "aud": client_id,
        "sub": s.sub,
        # OB: txn may carry the same value as jti when the producer has no interaction id.
        "txn": s.txn if s.txn is not None else jti,
        "toe": s.toe if s.toe is not None else now,
        "events": s.events,
    }


@routes.post("/events")
@guards_itself
async def poll_events(request: web.Request) -> web.Response:
    """RFC 8936 poll: validate, ack, nack, select; long-poll when nothing is ready."""
    # Answers its own errors: a parked poll holds no wrapper frame (routing.guards_itself).
    response: web.Response
    try:
        app = request.app
        principal = authenticate(request, app)
        principal.require_scope(*ob.POLL_SCOPES)
        settings, store, hub = app[settings_key], app[sets_key], app[hub_key]
        metrics = app[metrics_key]
        poll = ob.parse_poll_request(
            await read_json(request, app=app), max_acks=settings.events.max_acks
        )
        client = principal.client_id
        cap = settings.events.max_events
        limit = cap if poll.max_events is None else min(poll.max_events, cap)
        # maxEvents 0 answers at once (spec §9.10); absent returnImmediately means a long poll.
        immediate = poll.return_immediately is True or limit == 0
        ack: tuple[str, ...] = poll.ack
        set_errs: dict[str, tuple[str, str]] | None = poll.set_errs
        del poll  # a parked poll keeps only what it still needs
        wait = 0.0 if immediate else min(settings.poll.default_wait_s, settings.poll.max_wait_s)

        # Acks and nacks ride on the first read only: applied exactly once per request. Not
        # shielded (no task per poll): if the client vanishes mid-call the script still runs or
        # not, and either is safe: acks are idempotent and a SET selected for an answer that is
        # never sent stays unacked, so it is delivered again.
        if wait <= 0:
            outcome = await store.poll(client, limit=limit, ack=ack, set_errs=set_errs)
            _count(metrics, request, client, outcome)
        else:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + held(wait, settings.poll.hold_jitter)
            # Register first, then read: a publish landing between the read and the wait still
            # finds this waiter registered (see hub.py).
            with hub.watch(keyspace.client_tag(client)) as waiter:
                while True:
                    waiter.arm()
                    outcome = await store.poll(client, limit=limit, ack=ack, set_errs=set_errs)
                    _count(metrics, request, client, outcome)
                    ack, set_errs = (), None
                    remaining = deadline - loop.time()
                    if outcome.flat or remaining <= 0 or hub.closing or client_gone(request):
                        break
                    # A lease ending makes a SET deliverable without any publish: wake for it,
                    # and read after that wake even if it falls past the deadline.
                    lease_end = False
                    if outcome.next_lease_s is not None:
                        lease_end = outcome.next_lease_s + 0.005 < remaining
                        remaining = min(remaining, outcome.next_lease_s + 0.005)
                    parked(request)
                    woken = await waiter.until(remaining)
                    if not woken and not lease_end and loop.time() >= deadline:
                        break  # timed out with no hint: no last read (see queues.poll)

        metrics.event_polls_total += 1
        metrics.sets_delivered_total += outcome.count
        body = _NOTHING_BODY if outcome is NOTHING else outcome.body()
    except Exception as e:  # CancelledError is a BaseException: it goes through
        response = ob.answer_error(request, e)
        response.headers[ob.INTERACTION_ID] = ob.interaction_id(request)
        return response
    # All headers in one go. The interaction id is taken (or made) now, not on arrival: a
    # parked poll need not hold a UUID string.
    headers = {
        "Content-Type": "application/json",
        "Cache-Control": "no-store",
        ob.INTERACTION_ID: ob.interaction_id(request),
    }
    return web.Response(body=body, headers=headers)


# The answer to every poll that found nothing (most of them), encoded once.
_NOTHING_BODY = NOTHING.body()


def _count(metrics: Metrics, request: web.Request, client: str, outcome: PollOutcome) -> None:
    metrics.sets_acked_total += outcome.acked
    metrics.sets_nacked_total += outcome.nacked
    if outcome.expired:
        _count_expired(request, client, outcome.expired)


def _count_expired(request: web.Request, client: str, n: int) -> None:
    request.app[metrics_key].sets_expired_total += n
    log.warning(
        "dropped %d unacked SETs of client %r: older than events.retention_s (%ss)",
        n,
        client,
        request.app[settings_key].events.retention_s,
    )
