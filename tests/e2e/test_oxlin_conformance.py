"""Spec §8 cases 1-20: the Oxlin "Queues & events" API, on fakeredis and on a real server."""

from __future__ import annotations

import asyncio
import re

from broker.appkeys import store_key
from tests.oxlin_helpers import connection_event, publish, subscribe


async def test_case01_subscribe_returns_201_and_location(client, auth):
    r1 = await client.post(
        "/queues/subscribe", json={"topics": ["connections"]}, headers=auth("u1")
    )
    r2 = await client.post(
        "/queues/subscribe", json={"topics": ["connections"]}, headers=auth("u1")
    )
    assert r1.status == 201 and r2.status == 201
    loc1, loc2 = r1.headers["Location"], r2.headers["Location"]
    assert re.fullmatch(r"/queues/[^/]+", loc1)
    assert loc1 != loc2
    # >= 128 random bits: 22 URL-safe base64 characters
    assert len(loc1.rsplit("/", 1)[1]) >= 22


async def test_case02_subscribe_without_token_is_401_and_creates_nothing(client, auth):
    r = await client.post("/queues/subscribe", json={"topics": ["connections"]})
    assert r.status == 401
    # RFC 6750 §3.1: no credentials, no error code in the challenge
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="broker"'
    assert (await r.json())["error"] == "invalid_token"
    store = client.app[store_key]
    assert await store.redis.keys("*queues*") == []


async def test_case03_garbage_or_expired_token_is_401(client, token):
    for bad in ("garbage", "a.b.c", token("u1", ttl_s=-3600)):
        r = await client.post(
            "/queues/subscribe",
            json={"topics": ["connections"]},
            headers={"Authorization": f"Bearer {bad}"},
        )
        assert r.status == 401, bad
        assert r.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        body = await r.json()
        assert body["error"] == "invalid_token" and body["message"]
    r = await client.post(
        "/queues/subscribe",
        json={"topics": ["connections"]},
        headers={"Authorization": "Basic dTE6cHc="},
    )
    assert r.status == 401


async def test_case04_malformed_json_is_400(client, auth):
    r = await client.post("/queues/subscribe", data=b'{"topics":', headers=auth("u1"))
    assert r.status == 400
    assert "JSON" in (await r.json())["message"]


async def test_case04_an_empty_body_is_400(client, auth):
    for body in (b"", b"  "):
        r = await client.post("/queues/subscribe", data=body, headers=auth("u1"))
        assert r.status == 400, body
        assert "empty" in (await r.json())["message"]


async def test_case05_missing_or_mistyped_topics_is_400(client, auth):
    for body in (b"{}", b'{"topics":[]}', b'{"topics":"connections"}', b"[]", b'{"topics":[1]}'):
        r = await client.post("/queues/subscribe", data=body, headers=auth("u1"))
        assert r.status == 400, body
        assert "topics" in (await r.json())["message"] or "object" in (await r.json())["message"]


async def test_case06_unknown_topic_is_400(client, auth):
    r = await client.post("/queues/subscribe", json={"topics": ["nope"]}, headers=auth("u1"))
    assert r.status == 400
    body = await r.json()
    assert "nope" in body["message"] and body["path"] == "topics"


async def test_case07_form_urlencoded_json_body_is_accepted(client, auth):
    headers = {**auth("u1"), "Content-Type": "application/x-www-form-urlencoded"}
    r = await client.post("/queues/subscribe", data=b'{"topics": ["connections"]}', headers=headers)
    assert r.status == 201
    # and with no Content-Type at all
    r = await client.post(
        "/queues/subscribe",
        data=b'{"topics": ["connections"]}',
        headers={**auth("u1"), "Content-Type": ""},
    )
    assert r.status == 201


async def test_case08_fresh_queue_is_204_empty(client, auth):
    loc = await subscribe(client, auth, "u1")
    r = await client.get(loc, headers=auth("u1"))
    assert r.status == 204
    assert await r.read() == b""


async def test_case09_one_event_is_200_json_array_with_seed_fields(client, auth):
    loc = await subscribe(client, auth, "u1")
    await publish(client, auth, "u1", connection_event())
    r = await client.get(loc, headers=auth("u1"))
    assert r.status == 200
    assert r.headers["Content-Type"].startswith("application/json")
    events = await r.json()
    assert isinstance(events, list) and len(events) == 1
    e = events[0]
    assert list(e) == [
        "id",
        "event_type",
        "resource_type",
        "creation_date",
        "channel_definition_id",
        "resource",
    ]
    assert isinstance(e["id"], str) and e["id"].isdigit()
    assert isinstance(e["event_type"], str)
    assert e["resource_type"] == "CONNECTION"
    assert isinstance(e["creation_date"], int) and not isinstance(e["creation_date"], bool)
    assert isinstance(e["channel_definition_id"], str)
    for key in ("id", "provider_id", "name", "status", "channels"):
        assert key in e["resource"]
    assert isinstance(e["resource"]["channels"], list)


async def test_case10_events_are_consumed_once(client, auth):
    loc = await subscribe(client, auth, "u1")
    await publish(client, auth, "u1", connection_event())
    assert (await client.get(loc, headers=auth("u1"))).status == 200
    r = await client.get(loc, headers=auth("u1"))
    assert r.status == 204


async def test_case11_three_events_in_creation_order(client, auth):
    loc = await subscribe(client, auth, "u1")
    types = ["SYNC_ALL_STARTED", "LIST_ACCOUNTS_DONE", "SYNC_ALL_SUCCESS"]
    result = await publish(client, auth, "u1", [connection_event(event_type=t) for t in types])
    events = await (await client.get(loc, headers=auth("u1"))).json()
    assert [e["event_type"] for e in events] == types
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [e["id"] for e in events] == result["ids"]
    dates = [e["creation_date"] for e in events]
    assert dates == sorted(dates)


async def test_case12_event_before_subscription_is_not_returned(client, auth):
    result = await publish(client, auth, "u1", connection_event())
    assert result["queues"] == 0
    loc = await subscribe(client, auth, "u1")
    assert (await client.get(loc, headers=auth("u1"))).status == 204


async def test_case13_other_users_events_are_not_in_the_queue(client, auth):
    loc = await subscribe(client, auth, "u1")
    await publish(client, auth, "u2", connection_event())
    assert (await client.get(loc, headers=auth("u1"))).status == 204


async def test_case14_each_queue_of_a_user_gets_its_own_copy(client, auth):
    loc_a = await subscribe(client, auth, "u1")
    loc_b = await subscribe(client, auth, "u1")
    result = await publish(client, auth, "u1", connection_event())
    assert result["queues"] == 2
    a = await (await client.get(loc_a, headers=auth("u1"))).json()
    b = await (await client.get(loc_b, headers=auth("u1"))).json()
    assert a == b and len(a) == 1


async def test_case15_both_channels_are_delivered_with_their_ids(client, auth):
    loc = await subscribe(client, auth, "u1")
    await publish(
        client,
        auth,
        "u1",
        [
            connection_event(channel_definition_id="redirect1"),
            connection_event(channel_definition_id="embedded1"),
        ],
    )
    events = await (await client.get(loc, headers=auth("u1"))).json()
    assert [e["channel_definition_id"] for e in events] == ["redirect1", "embedded1"]


async def test_case16_foreign_queue_is_404_and_not_consumed(client, auth):
    loc = await subscribe(client, auth, "u1")
    await publish(client, auth, "u1", connection_event())
    r = await client.get(loc, headers=auth("u2"))
    assert r.status == 404
    assert (await r.json())["error"] == "queue_not_found"
    r = await client.get(loc, headers=auth("u1"))
    assert r.status == 200 and len(await r.json()) == 1


async def test_case17_unknown_queue_is_404_and_no_token_is_401(client, auth):
    r = await client.get("/queues/does-not-exist", headers=auth("u1"))
    assert r.status == 404
    assert (await r.json())["message"]
    loc = await subscribe(client, auth, "u1")
    r = await client.get(loc)
    assert r.status == 401


async def test_case18_queue_expires_after_ttl_without_polls(make_client, auth):
    client = await make_client(queues={"ttl_s": 1})
    loc = await subscribe(client, auth, "u1")
    await asyncio.sleep(1.3)
    result = await publish(client, auth, "u1", connection_event())
    assert result["queues"] == 0  # later events are not stored
    r = await client.get(loc, headers=auth("u1"))
    assert r.status == 404


async def test_case18_a_queue_also_expires_ttl_after_its_last_poll(make_client, auth):
    # The timer runs from the last query: a queue that was polled expires one ttl after that
    # poll, with the event published meanwhile (a later poll would have been its only read).
    client = await make_client(queues={"ttl_s": 2})
    loc = await subscribe(client, auth, "u1")
    await asyncio.sleep(1.1)
    assert (await client.get(loc, headers=auth("u1"))).status == 204  # resets the timer
    await asyncio.sleep(1.1)  # past one ttl since subscribe, not since the poll: alive
    assert (await publish(client, auth, "u1", connection_event()))["queues"] == 1
    await asyncio.sleep(2.3)  # now past one ttl since the last poll
    assert (await publish(client, auth, "u1", connection_event()))["queues"] == 0
    assert (await client.get(loc, headers=auth("u1"))).status == 404


async def test_case19_every_poll_resets_the_idle_timer(make_client, auth):
    client = await make_client(queues={"ttl_s": 2})
    loc = await subscribe(client, auth, "u1")
    # Polls 1.2 s apart: 3.6 s in all, well past one ttl, never 2 s without a query.
    for _ in range(3):
        await asyncio.sleep(1.2)
        r = await client.get(loc, headers=auth("u1"))
        assert r.status == 204
    await publish(client, auth, "u1", connection_event())
    assert (await client.get(loc, headers=auth("u1"))).status == 200


async def test_case20_wrong_methods_are_405(client, auth):
    loc = await subscribe(client, auth, "u1")
    r = await client.delete(loc, headers=auth("u1"))
    assert r.status == 405
    assert (await r.json())["error"] == "method_not_allowed"
    r = await client.put("/queues/subscribe", json={"topics": ["connections"]}, headers=auth("u1"))
    assert r.status == 405
    # the queue is untouched by the refused DELETE
    assert (await client.get(loc, headers=auth("u1"))).status == 204
