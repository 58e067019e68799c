"""Answers that no handler writes: unknown paths, wrong methods, unexpected failures."""

from __future__ import annotations

import uuid

import pytest

from broker import ob
from broker.appkeys import sets_key, store_key
from tests.oxlin_helpers import connection_event, publish, subscribe


async def test_unknown_path_is_a_json_404(client, auth):
    r = await client.get("/nothing/here", headers=auth("u1"))
    assert r.status == 404
    body = await r.json()
    assert body["error"] == "not_found" and "/nothing/here" in body["message"]


async def test_unknown_path_under_the_ob_prefix_is_an_ob_404(client, auth):
    r = await client.get(
        "/event-subscriptions/a/b/c", headers={**auth("t"), ob.INTERACTION_ID: "X-404"}
    )
    assert r.status == 404
    body = await r.json()
    assert body["Errors"][0]["ErrorCode"] == ob.NOT_FOUND
    assert r.headers[ob.INTERACTION_ID] == "X-404"


async def test_405_names_the_methods_the_path_has(client, auth):
    loc = await subscribe(client, auth, "u1")
    r = await client.post(loc, headers=auth("u1"))
    assert r.status == 405
    assert (await r.json())["error"] == "method_not_allowed"
    assert r.headers["Allow"] == "GET"
    # /queues/subscribe is a path of its own, not a queue called "subscribe"
    r = await client.get("/queues/subscribe", headers=auth("u1"))
    assert r.status == 405 and r.headers["Allow"] == "POST"
    r = await client.delete("/publish/users/u1/events", headers=auth("u1"))
    assert r.status == 405 and r.headers["Allow"] == "POST"


async def test_ob_405_carries_an_interaction_id_and_allow(client, auth):
    r = await client.get("/events", headers={**auth("t"), ob.INTERACTION_ID: "X-405"})
    assert r.status == 405
    assert r.headers["Allow"] == "POST"
    assert r.headers[ob.INTERACTION_ID] == "X-405"
    assert (await r.json())["Errors"][0]["ErrorCode"] == ob.INVALID_FORMAT


async def test_head_answers_on_get_routes(client):
    r = await client.head("/healthz")
    assert r.status == 200


@pytest.mark.parametrize("path", ["/queues/q1", "/events"])
async def test_an_unexpected_failure_is_a_500_with_a_json_body(client, auth, path, monkeypatch):
    store = client.app[store_key]

    async def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(store, "poll", boom)
    if path == "/events":
        monkeypatch.setattr(client.app[sets_key], "poll", boom)
        r = await client.post(
            path,
            json={"returnImmediately": True},
            headers=auth("t", scopes=["accounts"], client_id="t"),
        )
        assert r.status == 500
        assert (await r.json())["Errors"][0]["ErrorCode"] == ob.UNEXPECTED
        assert uuid.UUID(r.headers[ob.INTERACTION_ID]).version == 4
    else:
        r = await client.get(path, headers=auth("u1"))
        assert r.status == 500
        assert await r.json() == {"error": "internal_error", "message": "internal error"}
    assert "disk on fire" not in await r.text()


async def test_head_on_a_queue_is_405_and_consumes_nothing(client, auth):
    """A poll consumes what it returns: HEAD would throw the events away unseen."""
    loc = await subscribe(client, auth, "u1")
    await publish(client, auth, "u1", connection_event())
    r = await client.head(loc, headers=auth("u1"))
    assert r.status == 405 and r.headers["Allow"] == "GET"
    r = await client.get(loc, headers=auth("u1"))
    assert r.status == 200 and len(await r.json()) == 1


async def test_no_answer_names_the_server_software_versions(client, auth):
    """Security scans flag "Server: Python/3.11 aiohttp/3.x" as version disclosure."""
    loc = await subscribe(client, auth, "u1")
    answers = [
        await client.get("/healthz"),
        await client.get(loc, headers=auth("u1")),  # 204
        await client.get("/nothing/here", headers=auth("u1")),  # 404 written by routing
        await client.post("/events", headers=auth("t1"), json={"returnImmediately": True}),
        await client.get(loc),  # 401
    ]
    for r in answers:
        assert r.headers["Server"] == "broker", (r.status, r.headers["Server"])
