"""Long polling on GET /queues/{id}: ?wait / Prefer: wait, wake-ups, time-outs, disconnects."""

from __future__ import annotations

import asyncio
import collections
import time

import aiohttp

from broker import http
from broker.appkeys import background_key, hub_key, metrics_key, store_key
from tests.oxlin_helpers import connection_event, publish, subscribe
from tests.parking import parked_connection


async def test_wait_returns_as_soon_as_an_event_is_published(client, auth):
    loc = await subscribe(client, auth, "u1")
    started = time.monotonic()
    poll = asyncio.ensure_future(client.get(loc + "?wait=5", headers=auth("u1")))
    await asyncio.sleep(0.3)
    assert not poll.done()
    assert client.app[hub_key].waiting == 1
    await publish(client, auth, "u1", connection_event(event_type="SYNC_ALL_SUCCESS"))
    r = await asyncio.wait_for(poll, 3)
    elapsed = time.monotonic() - started
    assert r.status == 200
    assert [e["event_type"] for e in await r.json()] == ["SYNC_ALL_SUCCESS"]
    assert elapsed < 2.5  # woken, not timed out at 5 s
    assert client.app[hub_key].waiting == 0


async def test_wait_times_out_with_204(client, auth):
    loc = await subscribe(client, auth, "u1")
    started = time.monotonic()
    r = await client.get(loc + "?wait=0.6", headers=auth("u1"))
    elapsed = time.monotonic() - started
    assert r.status == 204
    assert 0.5 <= elapsed < 3


async def test_polls_that_find_nothing_are_answered_at_spread_times(make_client, auth):
    """poll.hold_jitter: clients that came at once and re-poll at once drift apart."""
    client = await make_client(poll={"hold_jitter": 0.5})
    locs = [await subscribe(client, auth, f"u{i}") for i in range(6)]

    async def hold(i: int, loc: str) -> float:
        started = time.monotonic()
        r = await client.get(loc + "?wait=2", headers=auth(f"u{i}"))
        assert r.status == 204
        return time.monotonic() - started

    holds = await asyncio.gather(*(hold(i, loc) for i, loc in enumerate(locs)))
    assert all(0.95 <= h < 3 for h in holds)  # 1-2 s, never past the 2 s asked for (+slack)
    assert min(holds) < 1.9  # fails only if six holds all land within ~0.12 s of 2 s: ~3e-6


async def test_prefer_wait_header_holds_the_poll(client, auth):
    loc = await subscribe(client, auth, "u1")
    started = time.monotonic()
    r = await client.get(loc, headers={**auth("u1"), "Prefer": "respond-async, wait=0.5"})
    assert r.status == 204
    assert time.monotonic() - started >= 0.45


async def test_without_wait_the_poll_answers_at_once(client, auth):
    loc = await subscribe(client, auth, "u1")
    started = time.monotonic()
    r = await client.get(loc, headers=auth("u1"))
    assert r.status == 204
    assert time.monotonic() - started < 5  # not held (the longest hold is 30 s)


async def test_wait_is_capped_by_max_wait(make_client, auth):
    client = await make_client(poll={"max_wait_s": 0.5})
    loc = await subscribe(client, auth, "u1")
    started = time.monotonic()
    r = await client.get(loc + "?wait=60", headers=auth("u1"))
    assert r.status == 204
    assert time.monotonic() - started < 3


async def test_bad_wait_is_400_and_consumes_nothing(client, auth):
    loc = await subscribe(client, auth, "u1")
    await publish(client, auth, "u1", connection_event())
    for bad in ("abc", "-1", "nan"):
        r = await client.get(f"{loc}?wait={bad}", headers=auth("u1"))
        assert r.status == 400, bad
        assert (await r.json())["path"] == "wait"
    assert (await client.get(loc, headers=auth("u1"))).status == 200


async def test_waiting_on_unknown_queue_is_404_at_once(client, auth):
    started = time.monotonic()
    r = await client.get("/queues/nope?wait=5", headers=auth("u1"))
    assert r.status == 404
    assert time.monotonic() - started < 4  # not held for the 5 s asked
    assert client.app[hub_key].waiting == 0


async def test_event_published_between_check_and_wait_is_not_missed(client, auth):
    """Register-then-check: a publish landing right after the poll's read still wakes it."""
    loc = await subscribe(client, auth, "u1")
    store = client.app[store_key]
    original = store.poll
    calls = 0

    async def poll_then_publish(user, queue_id, token=None):
        nonlocal calls
        calls += 1
        result = await original(user, queue_id, token)
        if calls == 1:  # the stream was read empty; publish before the handler parks
            await store.publish("u1", [_encoded(connection_event())])
        return result

    store.poll = poll_then_publish
    started = time.monotonic()
    r = await client.get(loc + "?wait=4", headers=auth("u1"))
    assert r.status == 200
    assert len(await r.json()) == 1
    assert time.monotonic() - started < 2.5


async def test_disconnected_waiter_is_removed(client, auth):
    loc = await subscribe(client, auth, "u1")
    hub = client.app[hub_key]
    poll = asyncio.ensure_future(client.get(loc + "?wait=5", headers=auth("u1")))
    for _ in range(100):
        if hub.waiting == 1:
            break
        await asyncio.sleep(0.02)
    assert hub.waiting == 1
    poll.cancel()  # the client goes away
    for _ in range(100):
        if hub.waiting == 0:
            break
        await asyncio.sleep(0.02)
    assert hub.waiting == 0
    # nothing was consumed on its behalf: an event published now is still there
    await publish(client, auth, "u1", connection_event())
    r = await client.get(loc, headers=auth("u1"))
    assert r.status == 200


async def test_events_read_for_a_vanished_client_are_handed_out_again(client, auth):
    """A poll whose answer cannot be sent rewinds the queue, so the events are not lost."""
    loc = await subscribe(client, auth, "u1")
    store = client.app[store_key]
    await publish(client, auth, "u1", [connection_event(), connection_event()])
    result = await store.poll("u1", loc.rsplit("/", 1)[1])
    assert result is not None and result.count == 2
    assert await store.rewind("u1", loc.rsplit("/", 1)[1], result.token)
    events = await (await client.get(loc, headers=auth("u1"))).json()
    assert len(events) == 2
    # once a later poll moved past them, a stale rewind changes nothing
    assert not await store.rewind("u1", loc.rsplit("/", 1)[1], result.token)
    assert (await client.get(loc, headers=auth("u1"))).status == 204


async def test_shutdown_answers_parked_polls(make_client, auth):
    client = await make_client()
    loc = await subscribe(client, auth, "u1")
    poll = asyncio.ensure_future(client.get(loc + "?wait=5", headers=auth("u1")))
    hub = client.app[hub_key]
    for _ in range(100):
        if hub.waiting:
            break
        await asyncio.sleep(0.02)
    started = time.monotonic()
    hub.release_all()
    r = await asyncio.wait_for(poll, 3)
    assert r.status == 204
    assert time.monotonic() - started < 2


async def test_many_waiters_each_get_their_own_event(client, auth):
    users = [f"user{i}" for i in range(30)]
    locs = {u: await subscribe(client, auth, u) for u in users}
    polls = {
        u: asyncio.ensure_future(client.get(locs[u] + "?wait=5", headers=auth(u))) for u in users
    }
    hub = client.app[hub_key]
    for _ in range(200):
        if hub.waiting == len(users):
            break
        await asyncio.sleep(0.02)
    assert hub.waiting == len(users)
    for u in users:
        await publish(client, auth, u, connection_event(resource={"id": u}))
    for u in users:
        r = await asyncio.wait_for(polls[u], 4)
        assert r.status == 200
        assert [e["resource"]["id"] for e in await r.json()] == [u]
    assert client.app[metrics_key].queue_events_delivered_total == len(users)


def _encoded(event):
    from broker.oxlin import encode_events

    return encode_events(event, ["connections"], max_event_bytes=65536, max_batch=10)[0]


async def test_a_poll_is_undone_by_its_token_even_if_its_reply_was_never_seen(client, auth):
    """What the handler does when its client vanishes mid-read: rewind by token, blind."""
    from broker.store import new_poll_token

    loc = await subscribe(client, auth, "u1")
    qid = loc.rsplit("/", 1)[1]
    store = client.app[store_key]
    await publish(client, auth, "u1", connection_event(event_type="KEEP"))
    token = new_poll_token()
    await store.poll("u1", qid, token)  # consumed; pretend the reply was lost
    assert await store.rewind("u1", qid, token)
    assert not await store.rewind("u1", qid, token)  # twice changes nothing
    assert not await store.rewind("u1", qid, new_poll_token())  # a poll that never ran
    r = await client.get(loc, headers=auth("u1"))
    assert [e["event_type"] for e in await r.json()] == ["KEEP"]


async def test_cancelled_poll_mid_read_gives_its_events_to_the_next_poll(client, auth):
    loc = await subscribe(client, auth, "u1")
    store = client.app[store_key]
    await publish(client, auth, "u1", [connection_event(), connection_event()])
    original = store.poll
    read_done = asyncio.Event()

    async def slow_poll(user, queue_id, token=None):
        result = await original(user, queue_id, token)
        read_done.set()
        await asyncio.sleep(5)  # the client vanishes before the answer is written
        return result

    store.poll = slow_poll
    request = asyncio.ensure_future(client.get(loc, headers=auth("u1")))
    await asyncio.wait_for(read_done.wait(), 3)
    request.cancel()
    store.poll = original
    for _ in range(100):
        await asyncio.sleep(0.02)
        if not client.app[background_key]:
            break
    r = await client.get(loc, headers=auth("u1"))
    assert r.status == 200 and len(await r.json()) == 2


async def test_a_parked_poll_holds_no_idle_timer_and_its_connection_stays_alive(client, auth):
    """http.parked drops aiohttp's keep-alive timer while a poll waits (memory at 10k polls).

    This also checks the aiohttp internals it relies on, so an aiohttp upgrade that renames
    them fails here instead of silently keeping the timers.
    """
    loc = await subscribe(client, auth, "u1")
    server = client.server.runner.server
    assert server is not None
    poll_url = client.make_url(loc + "?wait=5")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as poller:
        poll = asyncio.ensure_future(poller.get(poll_url, headers=auth("u1")))
        busy = await parked_connection(server)
        assert hasattr(busy, "_keepalive_handle") and busy._keepalive_handle is None
        # its (empty) queue of pipelined requests is a list now, not a ~760-byte deque
        assert type(busy._messages) is not collections.deque and len(busy._messages) == 0
        await publish(client, auth, "u1", connection_event())
        r = await asyncio.wait_for(poll, 3)
        assert r.status == 200
        await r.read()
        # answered: the connection is idle again, with a fresh idle timer, and reused
        assert busy._keepalive_handle is not None and not busy.transport.is_closing()
        served = busy._manager.requests_count
        r = await poller.get(client.make_url(loc), headers=auth("u1"))
        assert r.status == 204
        assert busy._manager.requests_count == served + 1 and busy in server.connections


async def test_a_request_pipelined_behind_a_parked_poll_is_answered_after_it(client, auth):
    """The parked poll's connection queues the next request in the list http.parked put there."""
    loc = await subscribe(client, auth, "u1")
    await publish(client, auth, "u1", connection_event(event_type="FIRST"))
    r = await client.get(loc, headers=auth("u1"))  # the queue is empty again
    assert r.status == 200
    token = auth("u1")["Authorization"]

    def get(target: str) -> bytes:
        return f"GET {target} HTTP/1.1\r\nHost: t\r\nAuthorization: {token}\r\n\r\n".encode()

    server = client.server.runner.server
    assert server is not None
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(get(loc + "?wait=5"))
        busy = await parked_connection(server)
        writer.write(get(loc))  # sent while the first waits: it queues behind it, in the list
        for _ in range(100):
            if len(busy._messages) == 1:
                break
            await asyncio.sleep(0.02)
        assert type(busy._messages) is http._MessageQueue and len(busy._messages) == 1
        await publish(client, auth, "u1", connection_event(event_type="SECOND"))

        async def answer() -> tuple[bytes, bytes]:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            return head.split(b"\r\n")[0], await reader.readexactly(length)

        first = await asyncio.wait_for(answer(), 3)
        second = await asyncio.wait_for(answer(), 3)
    finally:
        writer.close()
    assert first[0].endswith(b"200 OK") and b'"SECOND"' in first[1]
    assert second[0].endswith(b"204 No Content")  # answered, in order, after the poll


async def test_a_timed_out_poll_reads_its_queue_once(client, auth, monkeypatch):
    """No hint came, so nothing was published: the time-out answers 204 without a re-read."""
    loc = await subscribe(client, auth, "u1")
    store = client.app[store_key]
    calls = 0
    real = store.poll

    async def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "poll", counting)
    r = await client.get(loc + "?wait=0.3", headers=auth("u1"))
    assert r.status == 204 and calls == 1
    # a woken poll re-reads, and gets the event
    poll = asyncio.ensure_future(client.get(loc + "?wait=5", headers=auth("u1")))
    for _ in range(100):
        if client.app[hub_key].waiting == 1:
            break
        await asyncio.sleep(0.02)
    await publish(client, auth, "u1", connection_event())
    r = await asyncio.wait_for(poll, 3)
    # (3, or more if an extra hint came: on a fresh server the first publish's NOSCRIPT
    # retry sends its hint twice)
    assert r.status == 200 and calls >= 3


async def test_after_a_mass_disconnect_the_token_cache_is_dropped_and_clients_go_on(
    client, auth, settings
):
    from broker import server
    from broker.appkeys import verifier_key

    loc = await subscribe(client, auth, "u1")
    headers = auth("u1")
    assert (await client.get(loc, headers=headers)).status == 204
    verifier = client.app[verifier_key]
    assert len(verifier._cache) >= 1
    policy = server.gc_policy(settings, client.app)  # the worker's policy, as serve builds it
    assert policy.on_mass_disconnect is not None
    policy.on_mass_disconnect()
    assert verifier._cache == {}
    # the same token still works: verified again, and cached again
    assert (await client.get(loc, headers=headers)).status == 204
    assert len(verifier._cache) == 1
