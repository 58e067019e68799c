"""Producer API: POST /publish/users/{user}/events."""

from __future__ import annotations

from broker.appkeys import store_key
from tests.oxlin_helpers import connection_event, publish, subscribe

PUB = {"scopes": ["events:publish"]}


async def test_publish_assigns_increasing_ids_and_reports_queues(client, auth):
    await subscribe(client, auth, "u1")
    a = await publish(client, auth, "u1", connection_event())
    b = await publish(client, auth, "u1", [connection_event(), connection_event()])
    ids = [int(i) for i in a["ids"] + b["ids"]]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert a["queues"] == 1 and b["queues"] == 1


async def test_publish_keeps_given_id_and_creation_date(client, auth):
    loc = await subscribe(client, auth, "u1")
    await publish(client, auth, "u1", connection_event(id="evt-7", creation_date=1527761001))
    (e,) = await (await client.get(loc, headers=auth("u1"))).json()
    assert e["id"] == "evt-7" and e["creation_date"] == 1527761001


async def test_publish_needs_the_publish_scope(client, auth):
    r = await client.post("/publish/users/u1/events", json=connection_event(), headers=auth("p"))
    assert r.status == 403
    assert (await r.json())["error"] == "insufficient_scope"
    r = await client.post("/publish/users/u1/events", json=connection_event())
    assert r.status == 401


async def test_topic_is_derived_from_resource_type_when_absent(client, auth):
    loc = await subscribe(client, auth, "u1")
    event = connection_event()
    del event["topic"]
    await publish(client, auth, "u1", event)
    assert (await client.get(loc, headers=auth("u1"))).status == 200


async def test_one_bad_event_rejects_the_whole_batch(client, auth):
    loc = await subscribe(client, auth, "u1")
    bad_cases = [
        [connection_event(), {**connection_event(), "event_type": ""}],
        [connection_event(), {**connection_event(), "resource": "x"}],
        [connection_event(), {**connection_event(), "topic": "nope"}],
        [connection_event(), {**connection_event(), "extra": 1}],
        [connection_event(), {**connection_event(), "id": 'a"b'}],
        [connection_event(), {**connection_event(), "creation_date": "yesterday"}],
        [connection_event(), 42],
        [],
    ]
    for batch in bad_cases:
        r = await client.post("/publish/users/u1/events", json=batch, headers=auth("p", **PUB))
        assert r.status == 400, batch
        body = await r.json()
        assert body["error"] == "invalid_request" and body["message"]
    assert (await client.get(loc, headers=auth("u1"))).status == 204


async def test_oversized_event_is_rejected_and_nothing_stored(make_client, auth):
    client = await make_client(publish={"max_event_bytes": 1024})
    loc = await subscribe(client, auth, "u1")
    big = connection_event(resource={"blob": "x" * 2000})
    r = await client.post(
        "/publish/users/u1/events", json=[connection_event(), big], headers=auth("p", **PUB)
    )
    assert r.status == 400
    assert "1024-byte cap" in (await r.json())["message"]
    assert (await client.get(loc, headers=auth("u1"))).status == 204


async def test_body_over_the_request_cap_is_413(make_client, auth):
    client = await make_client(publish={"max_event_bytes": 1024, "max_body_bytes": 4096})
    r = await client.post(
        "/publish/users/u1/events",
        json=[connection_event(resource={"b": "x" * 900}) for _ in range(8)],
        headers=auth("p", **PUB),
    )
    assert r.status == 413
    assert (await r.json())["error"] == "payload_too_large"


async def test_non_json_content_type_is_415(client, auth):
    r = await client.post(
        "/publish/users/u1/events",
        data=b"{}",
        headers={**auth("p", **PUB), "Content-Type": "text/plain"},
    )
    assert r.status == 415


async def test_stream_cap_drops_oldest_and_reports_it(make_client, auth):
    client = await make_client(queues={"maxlen": 3})
    loc = await subscribe(client, auth, "u1")
    await publish(client, auth, "u1", [connection_event(event_type=f"E{i}") for i in range(5)])
    r = await client.get(loc, headers=auth("u1"))
    events = await r.json()
    assert [e["event_type"] for e in events] == ["E2", "E3", "E4"]
    assert r.headers["Broker-Events-Dropped"] == "2"
    # delivered events make room first: nothing more is counted as dropped
    await publish(client, auth, "u1", [connection_event(event_type=f"F{i}") for i in range(3)])
    r = await client.get(loc, headers=auth("u1"))
    assert [e["event_type"] for e in await r.json()] == ["F0", "F1", "F2"]
    assert "Broker-Events-Dropped" not in r.headers


async def test_queue_keys_share_the_user_hash_tag(client, auth):
    await subscribe(client, auth, "weird{user}")
    await publish(client, auth, "weird{user}", connection_event())
    keys = [k.decode() for k in await client.app[store_key].redis.keys("brk:{u:*")]
    assert keys and all(k.startswith("brk:{u:weird%7Buser%7D}") for k in keys)


async def test_idempotency_key_makes_a_retried_publish_store_once(client, auth):
    loc = await subscribe(client, auth, "u1")
    headers = {**auth("p", **PUB), "Idempotency-Key": "order-42-update-1"}
    answers = []
    for _ in range(2):
        r = await client.post("/publish/users/u1/events", json=connection_event(), headers=headers)
        assert r.status == 202
        answers.append(await r.json())
    assert answers[0] == answers[1]
    events = await (await client.get(loc, headers=auth("u1"))).json()
    assert len(events) == 1 and events[0]["id"] == answers[0]["ids"][0]
    r = await client.post(
        "/publish/users/u1/events",
        json=connection_event(),
        headers={**auth("p", **PUB), "Idempotency-Key": "k" * 200},
    )
    assert r.status == 400


async def test_a_topic_carries_its_own_resource_type_only(client, auth):
    # spec §9.3: "connections" maps to CONNECTION events; an ACCOUNT event must not reach
    # a connections queue, and the whole batch is refused.
    loc = await subscribe(client, auth, "u1")
    batch = [connection_event(), connection_event(resource_type="ACCOUNT")]
    r = await client.post("/publish/users/u1/events", json=batch, headers=auth("p", **PUB))
    assert r.status == 400
    body = await r.json()
    assert "carries CONNECTION events, not ACCOUNT" in body["message"]
    assert (await client.get(loc, headers=auth("u1"))).status == 204  # nothing stored
