"""Spec §8 case 59: SETs pushed to a subscription's CallbackUrl, retried on 5xx with backoff.

The TPP's endpoint is an aiohttp server in the test, answering with the statuses given.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from aiohttp import web

from broker.appkeys import metrics_key, pusher_key
from tests.ob_helpers import TPP, fetch_jwks, resource_update, verify_set

# The TPP's endpoint listens on loopback: the address guard is lifted, except where tested.
PUSH = {
    "allow_http": True,
    "allow_private_addresses": True,
    "backoff_s": 0.2,
    "max_attempts": 3,
    "interval_s": 0.05,
}


class Callback:
    """The TPP's /event-notifications endpoint: answers `statuses` in turn, then the last."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.received: list[tuple[float, dict[str, str], str]] = []
        self._arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((time.monotonic(), dict(request.headers), await request.text()))
        self._arrived.set()
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return web.Response(status=status)

    async def until(self, n: int) -> None:
        async with asyncio.timeout(10):
            while len(self.received) < n:
                self._arrived.clear()
                await self._arrived.wait()


async def _pending_after_ack(a: TPP) -> dict[str, str]:
    """What the TPP still has to poll once the push's ack has landed (it follows the 2xx)."""
    for _ in range(100):
        sets, _more = await a.poll_ok({"returnImmediately": True})
        if not sets:
            break
        await asyncio.sleep(0.02)
    return sets


async def _until(check: Any, what: str, timeout_s: float = 10) -> None:
    """Wait until `check()` is true (polled), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"not reached in {timeout_s} s: {what}"
        await asyncio.sleep(0.02)


async def _attempts_then_pollable(tpp: TPP, cb: Callback, rid: str, attempts: int) -> None:
    """A SET whose pushes stop after `attempts` (given up on, or refused by the TPP): no
    attempt after those, and the SET stays pollable."""
    (jti,) = await tpp.publish(resource_update(rid))
    await cb.until(attempts)
    await asyncio.sleep(0.6)
    assert len(cb.received) == attempts
    sets, _more = await tpp.poll_ok({"returnImmediately": True})
    assert list(sets) == [jti]


async def _refused_and_pollable(tpp: TPP, cb: Callback, rid: str) -> None:
    """A SET published for a callback the broker must refuse: nothing reaches the callback,
    the refusal is counted once and not retried, and the SET stays pollable."""
    (jti,) = await tpp.publish(resource_update(rid))
    metrics = tpp.client.app[metrics_key]

    async def refused() -> bool:
        return bool(metrics.sets_push_refused_total >= 1)

    await _until(refused, "the push refused")
    await asyncio.sleep(0.3)  # time for a retry, which must not come
    assert cb.received == []
    sets, _more = await tpp.poll_ok({"returnImmediately": True})
    assert list(sets) == [jti]
    assert metrics.sets_push_refused_total == 1
    assert metrics.sets_push_retries_total == 0


async def _setup(make_client: Any, aiohttp_server: Any, auth: Any, cb: Callback, **push: Any):
    app = web.Application()
    app.router.add_post("/open-banking/v3.1/event-notifications", cb.handle)
    # A push cut off by the broker's shutdown can leave this server's handler waiting for
    # the rest of a body; the default 60 s wait for it at teardown would stall the test.
    server = await aiohttp_server(app, shutdown_timeout=1)
    client = await make_client(push={**PUSH, **push})
    a = TPP(client, auth, "tpp-a")
    await a.subscribe(CallbackUrl=str(server.make_url("/open-banking/v3.1/event-notifications")))
    return client, a


async def test_59_a_set_is_pushed_as_application_jwt_and_a_202_delivers_it(
    aiohttp_server, make_client, auth
):
    cb = Callback(202)
    client, a = await _setup(make_client, aiohttp_server, auth, cb)
    (jti,) = await a.publish(resource_update("r1"))
    await cb.until(1)
    _at, headers, body = cb.received[0]
    assert headers["Content-Type"] == "application/jwt"
    uuid.UUID(headers["x-fapi-interaction-id"])
    verify_set(await fetch_jwks(client), body, jti=jti, aud="tpp-a")
    # Delivered: acked, so a poll no longer returns it.
    assert await _pending_after_ack(a) == {}
    await asyncio.sleep(0.5)
    assert len(cb.received) == 1  # pushed once
    assert client.app[metrics_key].sets_pushed_total == 1


async def test_59_a_5xx_is_retried_with_growing_intervals_until_a_202(
    aiohttp_server, make_client, auth
):
    cb = Callback(503, 500, 202)
    client, a = await _setup(make_client, aiohttp_server, auth, cb)
    await a.publish(resource_update("r2"))
    await cb.until(3)
    (t1, _, b1), (t2, _, b2), (t3, _, b3) = cb.received
    assert b1 == b2 == b3  # the same SET each time
    # backoff_s 0.2, doubled: the second wait is longer than the first
    assert t2 - t1 >= 0.15 and t3 - t2 >= 0.35
    assert await _pending_after_ack(a) == {}  # delivered at the third attempt
    assert client.app[metrics_key].sets_push_retries_total == 2


async def test_59_a_callback_that_stays_down_is_given_up_and_the_set_stays_pollable(
    aiohttp_server, make_client, auth
):
    cb = Callback(503)
    client, a = await _setup(make_client, aiohttp_server, auth, cb, backoff_s=0.05)
    await _attempts_then_pollable(a, cb, "r3", 3)  # push.max_attempts, then no more
    assert client.app[metrics_key].sets_push_abandoned_total == 1


async def test_59_a_4xx_is_not_retried_and_the_set_stays_pollable(
    aiohttp_server, make_client, auth
):
    cb = Callback(400)
    client, a = await _setup(make_client, aiohttp_server, auth, cb)
    await _attempts_then_pollable(a, cb, "r4", 1)
    assert client.app[metrics_key].sets_push_refused_total == 1


async def test_a_plain_http_callback_is_not_pushed_to_unless_allowed(
    aiohttp_server, make_client, auth
):
    # Registered on a broker that allows it (and pushes nothing itself), then pushed by one
    # with push.allow_http off, as after a restart with the default.
    cb = Callback(202)
    await _setup(make_client, aiohttp_server, auth, cb, enabled=False)
    strict = await make_client(push={**PUSH, "allow_http": False})
    await _refused_and_pollable(TPP(strict, auth, "tpp-a"), cb, "r5")  # OB callbacks are TLS


async def test_a_callback_on_a_private_address_is_not_pushed_to_by_default(
    aiohttp_server, make_client, auth
):
    # Registered while the guard was lifted, then pushed by a broker with the default: the IP
    # literal is judged before the POST (aiohttp does not resolve a literal).
    cb = Callback(202)
    await _setup(make_client, aiohttp_server, auth, cb, enabled=False)
    strict = await make_client(push={**PUSH, "allow_private_addresses": False})
    await _refused_and_pollable(TPP(strict, auth, "tpp-a"), cb, "r6")


async def test_loopback_spelt_in_full_width_digits_is_not_pushed_to(
    aiohttp_server, make_client, auth
):
    # yarl, and so aiohttp, reads the host as 127.0.0.1 and connects to it without asking a
    # resolver; urllib's parse does not, and would have let it through as a host name.
    cb = Callback(202)
    app = web.Application()
    app.router.add_post("/open-banking/v3.1/event-notifications", cb.handle)
    server = await aiohttp_server(app, shutdown_timeout=1)
    wide = "\uff11\uff12\uff17.\uff10.\uff10.\uff11"  # 127.0.0.1, full width
    url = f"http://{wide}:{server.port}/open-banking/v3.1/event-notifications"
    lax = await make_client(push={**PUSH, "enabled": False})
    a = TPP(lax, auth, "tpp-a")
    await a.subscribe(CallbackUrl=url)  # written while the guard was off
    strict = await make_client(push={**PUSH, "allow_private_addresses": False})
    await _refused_and_pollable(TPP(strict, auth, "tpp-a"), cb, "r8")
    # The guarded broker does not take it at all.
    c = TPP(strict, auth, "tpp-c")
    r = await c.ob(
        "POST", "/event-subscriptions", json={"Data": {"Version": "3.1", "CallbackUrl": url}}
    )
    assert r.status == 400
    assert "127.0.0.1 is not a public address" in r.body.decode()


async def test_a_host_name_that_resolves_to_loopback_is_refused_at_connect_time(
    aiohttp_server, make_client, auth
):
    # A name passes the subscription check; the push session's resolver refuses the address
    # it resolves to, so no request leaves (the check is on the address connected to).
    cb = Callback(202)
    app = web.Application()
    app.router.add_post("/open-banking/v3.1/event-notifications", cb.handle)
    server = await aiohttp_server(app, shutdown_timeout=1)
    client = await make_client(push={**PUSH, "allow_private_addresses": False})
    a = TPP(client, auth, "tpp-a")
    await a.subscribe(
        CallbackUrl=f"http://localhost:{server.port}/open-banking/v3.1/event-notifications"
    )
    await _refused_and_pollable(a, cb, "r7")


class Hanging:
    """A TPP endpoint that answers nothing until released, counting requests in flight."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.in_flight = 0
        self.most = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await self.release.wait()
        finally:
            self.in_flight -= 1
        return web.Response(status=202)


async def _serve(aiohttp_server: Any, handler: Any) -> str:
    app = web.Application()
    app.router.add_post("/open-banking/v3.1/event-notifications", handler)
    server = await aiohttp_server(app, shutdown_timeout=1)
    return str(server.make_url("/open-banking/v3.1/event-notifications"))


async def test_a_hanging_endpoint_holds_a_few_slots_and_other_tpps_are_still_pushed_to(
    aiohttp_server, make_client, auth
):
    # TPP A's endpoint never answers and has 1,100 SETs due, published before B's one. A claim
    # that looked at due SETs oldest first would find only A's ahead of B's; without a cap
    # per TPP, A's would take all 32 of the worker's slots for push.timeout_s.
    slow = Hanging()
    cb = Callback(202)
    client = await make_client(push={**PUSH, "timeout_s": 30})
    a, b = TPP(client, auth, "tpp-a"), TPP(client, auth, "tpp-b")
    await a.subscribe(CallbackUrl=await _serve(aiohttp_server, slow.handle))
    await b.subscribe(CallbackUrl=await _serve(aiohttp_server, cb.handle))
    for k in range(11):
        await a.publish(*(resource_update(f"a{k}.{i}") for i in range(100)))

    async def a_holds_four() -> bool:
        return slow.in_flight == 4

    await _until(a_holds_four, "A's pushes started")
    t0 = time.monotonic()
    await b.publish(resource_update("b1"))
    await cb.until(1)
    assert time.monotonic() - t0 < 10  # not after A's 30 s time-outs
    assert slow.most == slow.in_flight == 4  # A holds 4 of the worker's slots, no more
    slow.release.set()
    assert await _pending_after_ack(b) == {}


async def test_metrics_show_the_push_backlog(aiohttp_server, make_client, auth):
    slow = Hanging()
    cb = Callback(202)
    client = await make_client(push={**PUSH, "timeout_s": 30})
    a, b = TPP(client, auth, "tpp-a"), TPP(client, auth, "tpp-b")
    await a.subscribe(CallbackUrl=await _serve(aiohttp_server, slow.handle))
    await b.subscribe(CallbackUrl=await _serve(aiohttp_server, cb.handle))

    async def gauges() -> dict[str, float]:
        text = await (await client.get("/metrics")).text()
        return {
            name: float(value)
            for name, _, value in (line.partition(" ") for line in text.splitlines())
            if name.startswith("broker_push_")
        }

    nothing = {
        "broker_push_tpps_scheduled": 0,
        "broker_push_tpps_due": 0,
        "broker_push_oldest_due_seconds": 0,
    }
    assert await gauges() == nothing
    await a.publish(*(resource_update(f"m{i}") for i in range(6)))
    await b.publish(resource_update("b1"))
    await cb.until(1)

    async def a_waits() -> bool:
        g = await gauges()
        # A: four in flight to its hanging endpoint, two due and waiting for a slot; B done.
        return g["broker_push_tpps_scheduled"] == 1 and g["broker_push_tpps_due"] == 1

    await _until(a_waits, "A's two SETs waiting")
    await asyncio.sleep(0.3)
    assert 0.3 <= (await gauges())["broker_push_oldest_due_seconds"] < 30
    slow.release.set()

    async def drained() -> bool:
        return await gauges() == nothing

    await _until(drained, "the schedule empty once A's endpoint answers")


async def test_a_subscription_without_callback_is_never_pushed_for(make_client, auth):
    client = await make_client(push=PUSH)
    scheduled: list[tuple[str, list[str]]] = []

    async def record(client_id: str, jtis: list[str]) -> None:
        scheduled.append((client_id, list(jtis)))

    client.app[pusher_key].schedule = record
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    (jti,) = await a.publish(resource_update("r6"))
    sets, _more = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == [jti]
    assert scheduled == []
    b = TPP(client, auth, "tpp-b")  # the same, with a callback: scheduled (the spy works)
    await b.subscribe(CallbackUrl="http://127.0.0.1:9/v3.1/event-notifications")
    (jtb,) = await b.publish(resource_update("r6b"))
    assert scheduled == [("tpp-b", [jtb])]


async def test_a_push_due_for_a_subscription_that_lost_its_callback_is_dropped(make_client, auth):
    # Scheduled while the subscription had a callback, pushed after it was removed: nothing
    # is sent, the push leaves the schedule, and the SET stays pollable.
    client = await make_client(push=PUSH)
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()  # no callback
    (jti,) = await a.publish(resource_update("r9"))
    pusher = client.app[pusher_key]
    await pusher.schedule("tpp-a", [jti])

    async def left() -> bool:
        return bool((await pusher.gauges())["push_tpps_scheduled"] == 0)

    await _until(left, "the push off the schedule")
    metrics = client.app[metrics_key]
    assert metrics.sets_pushed_total == metrics.sets_push_retries_total == 0
    assert metrics.sets_push_refused_total == 0
    sets, _more = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == [jti]


async def test_a_429_is_retried(aiohttp_server, make_client, auth):
    cb = Callback(429, 202)
    client, a = await _setup(make_client, aiohttp_server, auth, cb)
    await a.publish(resource_update("r7"))
    await cb.until(2)
    assert await _pending_after_ack(a) == {}
    assert client.app[metrics_key].sets_push_refused_total == 0
