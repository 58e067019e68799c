"""POST /events (RFC 8936 poll delivery, OB aggregated polling): spec §8 cases 21-50 and 58.

Each test runs on fakeredis and on a real server (the `client` fixture). Setup for most
cases: TPP a subscribes, then A, B, C are published in that order.
"""

from __future__ import annotations

import asyncio
import collections
import time
import uuid

import aiohttp
import orjson
import pytest

from broker import http
from broker.appkeys import hub_key, metrics_key, sets_key, settings_key
from tests import obschema
from tests.ob_helpers import TPP, consent_revoked, fetch_jwks, resource_update, verify_set
from tests.parking import parked_connection


async def setup_abc(client, auth, client_id="tpp-a"):
    a = TPP(client, auth, client_id)
    await a.subscribe()
    jtis = await a.publish(resource_update("A"), resource_update("B"), resource_update("C"))
    return a, jtis


# --- 21-22, 38-41: authentication, scope, body format, method, interaction id -------------


async def test_21_no_token_is_401_with_interaction_id(client, auth):
    r = await client.post("/events", json={"returnImmediately": True})
    assert r.status == 401
    assert r.headers["WWW-Authenticate"] == 'Bearer realm="broker"'  # RFC 6750 §3.1
    body = await r.read()
    obschema.check_response("POST", "/events", 401, r.headers, body)
    uuid.UUID(r.headers["x-fapi-interaction-id"])


async def test_22_token_without_an_accepted_scope_is_403(client, auth):
    tpp = TPP(client, auth, "tpp-a", scope="openid")
    r = await tpp.poll({"returnImmediately": True})
    assert r.status == 403
    assert r.json()["Errors"][0]["ErrorCode"].startswith("UK.OBIE.")


@pytest.mark.parametrize("scope", ["accounts", "payments", "fundsconfirmations", "eventpolling"])
async def test_22_each_ob_scope_is_accepted(client, auth, scope):
    r = await TPP(client, auth, "tpp-a", scope=scope).poll({"returnImmediately": True})
    assert r.status == 200


async def test_38_non_json_body_is_400_ob_error(client, auth):
    a, _ = await setup_abc(client, auth)
    r = await a.poll(data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status == 400
    err = r.json()
    assert err["Code"] == "400 BadRequest"
    assert err["Message"]
    assert err["Errors"][0]["ErrorCode"] == "UK.OBIE.Resource.InvalidFormat"


async def test_38_a_poll_with_no_body_is_400_and_changes_nothing(client, auth):
    a, jtis = await setup_abc(client, auth)
    r = await a.poll(data=b"", headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert r.json()["Errors"][0]["ErrorCode"] == "UK.OBIE.Resource.InvalidFormat"
    assert "empty" in r.json()["Errors"][0]["Message"]
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == jtis  # nothing was leased or acked by the refused poll


async def test_38_json_that_is_not_an_object_is_400(client, auth):
    a, _ = await setup_abc(client, auth)
    r = await a.poll([1, 2])
    assert r.status == 400


async def test_39_text_plain_is_415(client, auth):
    a, jtis = await setup_abc(client, auth)
    r = await a.poll(
        data=b'{"ack": ["%s"]}' % jtis[0].encode(), headers={"Content-Type": "text/plain"}
    )
    assert r.status == 415
    assert r.json()["Errors"][0]["Path"] == "Content-Type"
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert set(sets) == set(jtis)  # the ack inside the rejected request was not applied


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_40_other_methods_are_405(client, auth, method):
    r = await TPP(client, auth, "tpp-a").ob(method, "/events")
    assert r.status == 405
    assert "POST" in r.headers["Allow"]


async def test_41_interaction_id_is_echoed_or_generated(client, auth):
    a = TPP(client, auth, "tpp-a")
    r = await a.poll({"returnImmediately": True}, headers={"x-fapi-interaction-id": "X-123"})
    assert r.headers["x-fapi-interaction-id"] == "X-123"
    r = await a.poll({"returnImmediately": True})
    assert uuid.UUID(r.headers["x-fapi-interaction-id"]).version == 4
    r = await a.poll({"maxEvents": -1}, headers={"x-fapi-interaction-id": "X-err"})
    assert r.status == 400
    assert r.headers["x-fapi-interaction-id"] == "X-err"


# --- 23-30, 32-33, 45-46: delivery, redelivery, acks, nacks -------------------------------


async def test_23_poll_returns_all_pending_as_signed_sets(client, auth):
    a, jtis = await setup_abc(client, auth)
    sets, more = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == jtis  # oldest first
    assert more is False
    keys = await fetch_jwks(client)
    for jti, token in sets.items():
        verify_set(keys, token, jti=jti, aud="tpp-a")


async def test_24_unacked_sets_are_redelivered(client, auth):
    a, jtis = await setup_abc(client, auth)
    first, _ = await a.poll_ok({"returnImmediately": True})
    second, _ = await a.poll_ok({"returnImmediately": True})
    assert first == second
    assert list(second) == jtis


async def test_25_max_events_returns_the_oldest_and_more_available(client, auth):
    a, jtis = await setup_abc(client, auth)
    sets, more = await a.poll_ok({"returnImmediately": True, "maxEvents": 1})
    assert list(sets) == [jtis[0]]
    assert more is True


async def test_26_ack_only_returns_at_once_and_removes_the_set(make_client, auth):
    # A default hold far longer than the bound below: a poll that waited could not pass.
    client = await make_client(poll={"default_wait_s": 10, "max_wait_s": 10})
    a, (ja, jb, jc) = await setup_abc(client, auth)
    started = time.monotonic()
    r = await a.poll({"maxEvents": 0, "ack": [ja]})
    assert time.monotonic() - started < 1
    assert r.status == 200
    assert r.json()["sets"] == {}
    assert r.json()["moreAvailable"] is True  # B and C remain (spec §9.13)
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == [jb, jc]
    # Acking the rest leaves nothing that could end a wait early: still answered at once.
    started = time.monotonic()
    r = await a.poll({"maxEvents": 0, "ack": [jb, jc]})
    assert time.monotonic() - started < 1
    assert (r.status, r.json()["sets"], r.json()["moreAvailable"]) == (200, {}, False)


async def test_27_ack_is_applied_before_selection(client, auth):
    a, (ja, jb, jc) = await setup_abc(client, auth)
    sets, more = await a.poll_ok({"ack": [jb], "returnImmediately": True})
    assert list(sets) == [ja, jc]
    assert more is False


async def test_28_unknown_jti_in_ack_is_ignored(client, auth):
    a, jtis = await setup_abc(client, auth)
    sets, _ = await a.poll_ok({"ack": ["unknown-jti"], "returnImmediately": True})
    assert list(sets) == jtis


async def test_29_reacking_is_idempotent(client, auth):
    a, (ja, jb, jc) = await setup_abc(client, auth)
    await a.poll_ok({"ack": [ja], "maxEvents": 0})
    sets, _ = await a.poll_ok({"ack": [ja, ja], "returnImmediately": True})
    assert list(sets) == [jb, jc]
    assert client.app[metrics_key].sets_acked_total == 1


async def test_30_nacked_set_is_never_returned_again_but_kept(client, auth):
    a, (ja, jb, jc) = await setup_abc(client, auth)
    errs = {jc: {"err": "invalid_issuer", "description": "x"}}
    sets, _ = await a.poll_ok({"setErrs": errs, "returnImmediately": True})
    assert list(sets) == [ja, jb]
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == [ja, jb]
    kept = await client.app[sets_key].nacked("tpp-a")
    assert kept[jc]["err"] == "invalid_issuer"
    assert kept[jc]["description"] == "x"
    assert kept[jc]["set"].count(".") == 2


async def test_32_legacy_err_code_is_accepted(client, auth):
    a, (ja, jb, jc) = await setup_abc(client, auth)
    errs = {ja: {"err": "jwtIss", "description": "Issuer is invalid or could not be verified"}}
    sets, _ = await a.poll_ok({"setErrs": errs, "returnImmediately": True})
    assert list(sets) == [jb, jc]


async def test_33_ack_wins_over_set_errs(client, auth):
    a, (ja, jb, jc) = await setup_abc(client, auth)
    errs = {ja: {"err": "invalid_request", "description": "bad"}}
    sets, _ = await a.poll_ok({"ack": [ja], "setErrs": errs, "returnImmediately": True})
    assert list(sets) == [jb, jc]
    assert await client.app[sets_key].nacked("tpp-a") == {}
    assert client.app[metrics_key].sets_acked_total == 1


async def test_45_every_200_has_sets_object_and_boolean_more_available(client, auth):
    a, jtis = await setup_abc(client, auth)
    for body in ({"returnImmediately": True}, {"maxEvents": 0}, {"ack": jtis, "maxEvents": 2}):
        r = await a.poll(body)
        assert r.status == 200
        doc = r.json()
        assert isinstance(doc["sets"], dict)
        assert isinstance(doc["moreAvailable"], bool)


async def test_46_max_events_above_the_server_cap_is_capped(make_client, auth):
    client = await make_client(events={"max_events": 2})
    a, jtis = await setup_abc(client, auth)
    sets, more = await a.poll_ok({"returnImmediately": True, "maxEvents": 50})
    assert list(sets) == jtis[:2]
    assert more is True
    sets, more = await a.poll_ok({"returnImmediately": True})  # no maxEvents: the cap too
    assert len(sets) == 2


# --- 31, 34-37: request validation, with no side effect -----------------------------------


@pytest.mark.parametrize(
    ("entry", "code"),
    [
        ({"err": "invalid_issuer"}, "UK.OBIE.Field.Missing"),
        ({"description": "x"}, "UK.OBIE.Field.Missing"),
        ({"err": "e" * 41, "description": "x"}, "UK.OBIE.Field.Invalid"),
        ({"err": "invalid_issuer", "description": "d" * 257}, "UK.OBIE.Field.Invalid"),
        ({"err": "", "description": "x"}, "UK.OBIE.Field.Invalid"),
        ("invalid_issuer", "UK.OBIE.Field.Invalid"),
    ],
)
async def test_31_bad_set_errs_entry_is_400_and_nothing_applied(client, auth, entry, code):
    a, (ja, jb, jc) = await setup_abc(client, auth)
    r = await a.poll({"ack": [ja], "setErrs": {jb: entry}, "returnImmediately": True})
    assert r.status == 400
    assert r.json()["Errors"][0]["ErrorCode"] == code
    assert r.json()["Errors"][0]["Path"].startswith(f"setErrs.{jb}")
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == [ja, jb, jc]  # neither the ack nor the nack happened


@pytest.mark.parametrize(
    "body",
    [
        {"maxEvents": -1},  # 34
        {"maxEvents": "5"},  # 35
        {"maxEvents": 1.5},
        {"maxEvents": True},
        {"returnImmediately": "yes"},  # 36
        {"returnImmediately": 1},
        {"ack": "A"},  # 37
        {"ack": [1]},
        {"ack": [""]},
        {"ack": ["x" * 129]},
        {"setErrs": []},
    ],
)
async def test_34_to_37_invalid_members_are_400_with_no_side_effect(client, auth, body):
    a, (ja, jb, jc) = await setup_abc(client, auth)
    r = await a.poll(
        {**body, "setErrs": body.get("setErrs", {jc: {"err": "e", "description": "d"}})}
    )
    assert r.status == 400
    err = r.json()
    assert err["Code"] == "400 BadRequest"
    assert err["Errors"][0]["ErrorCode"] == "UK.OBIE.Field.Invalid"
    assert err["Errors"][0]["Path"].startswith(next(iter(body)))
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == [ja, jb, jc]


async def test_37_ack_string_of_128_chars_is_accepted(client, auth):
    a, jtis = await setup_abc(client, auth)
    sets, _ = await a.poll_ok({"ack": ["x" * 128], "returnImmediately": True})
    assert list(sets) == jtis


async def test_unknown_members_are_ignored(client, auth):
    a, jtis = await setup_abc(client, auth)
    sets, _ = await a.poll_ok({"returnImmediately": True, "timeoutSecs": 5, "x": None})
    assert list(sets) == jtis


async def test_too_many_acks_in_one_request_is_400(make_client, auth):
    client = await make_client(events={"max_acks": 2})
    a, jtis = await setup_abc(client, auth)
    r = await a.poll({"ack": jtis, "returnImmediately": True})
    assert r.status == 400


# --- 42-44: waiting -----------------------------------------------------------------------


async def test_42_nothing_pending_return_immediately(make_client, auth):
    # A default hold far longer than the bound below: a poll that waited could not pass.
    client = await make_client(poll={"default_wait_s": 10, "max_wait_s": 10})
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    started = time.monotonic()
    sets, more = await a.poll_ok({"returnImmediately": True})
    assert time.monotonic() - started < 1  # spec §8 case 42: within 1 s
    assert (sets, more) == ({}, False)


async def test_43_default_is_a_long_poll_until_the_timeout(make_client, auth):
    client = await make_client(poll={"default_wait_s": 1, "max_wait_s": 5})
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    started = time.monotonic()
    sets, more = await a.poll_ok({})
    elapsed = time.monotonic() - started
    assert (sets, more) == ({}, False)
    assert 0.9 <= elapsed < 3.0


async def test_41_a_long_poll_answers_with_the_interaction_id_it_came_with(make_client, auth):
    """The header is set when the answer is made (a parked poll holds no id of its own)."""
    client = await make_client(poll={"default_wait_s": 0.2, "max_wait_s": 5})
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    r = await a.poll({}, headers={"x-fapi-interaction-id": "X-parked"})
    assert r.status == 200 and r.json()["sets"] == {}
    assert r.headers["x-fapi-interaction-id"] == "X-parked"
    r = await a.poll({})
    assert uuid.UUID(r.headers["x-fapi-interaction-id"]).version == 4


async def test_43_hold_is_capped_by_max_wait(make_client, auth):
    client = await make_client(poll={"default_wait_s": 30, "max_wait_s": 1})
    a = TPP(client, auth, "tpp-a")
    started = time.monotonic()
    sets, _ = await a.poll_ok({"returnImmediately": False})
    assert sets == {}
    assert 0.9 <= time.monotonic() - started < 3.0


async def test_44_long_poll_wakes_when_a_set_is_published(make_client, auth):
    client = await make_client(poll={"default_wait_s": 5, "max_wait_s": 5})
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    started = time.monotonic()
    waiting = asyncio.ensure_future(a.poll_ok({"returnImmediately": False}))
    await asyncio.sleep(1.0)
    assert not waiting.done()
    assert client.app[hub_key].waiting == 1
    (jti,) = await a.publish(resource_update())
    sets, more = await asyncio.wait_for(waiting, 4)
    elapsed = time.monotonic() - started
    assert list(sets) == [jti]
    assert more is False
    assert 0.9 <= elapsed < 3.0  # woken by the publish, not by the 5 s timeout
    assert client.app[hub_key].waiting == 0


async def test_44_a_set_published_on_another_broker_process_wakes_the_poll(make_client, auth):
    poller = await make_client(poll={"default_wait_s": 5, "max_wait_s": 5})
    producer = await make_client()
    a = TPP(poller, auth, "tpp-a")
    await a.subscribe()
    waiting = asyncio.ensure_future(a.poll_ok({}))
    await asyncio.sleep(0.3)
    (jti,) = await TPP(producer, auth, "tpp-a").publish(resource_update())
    sets, _ = await asyncio.wait_for(waiting, 3)
    assert list(sets) == [jti]


async def test_44_other_clients_sets_do_not_end_the_wait(make_client, auth):
    client = await make_client(poll={"default_wait_s": 1, "max_wait_s": 5})
    a, b = TPP(client, auth, "tpp-a"), TPP(client, auth, "tpp-b")
    await a.subscribe()
    await b.subscribe()
    waiting = asyncio.ensure_future(a.poll_ok({}))
    await asyncio.sleep(0.2)
    await b.publish(resource_update())
    sets, _ = await asyncio.wait_for(waiting, 3)
    assert sets == {}


async def test_ack_in_a_long_poll_is_applied_once_before_waiting(make_client, auth):
    client = await make_client(poll={"default_wait_s": 1, "max_wait_s": 5})
    a, (ja, jb, jc) = await setup_abc(client, auth)
    sets, _ = await a.poll_ok({"ack": [ja, jb, jc]})
    assert sets == {}
    assert client.app[metrics_key].sets_acked_total == 3


async def test_a_parked_poll_holds_no_body_buffer_and_its_connection_serves_the_next(
    make_client, auth
):
    """http.parked drops a read body's empty buffer; the connection goes on as before.

    Also checks the aiohttp internals it relies on, so that an upgrade which renames them
    fails here instead of silently keeping ~760 bytes per parked OB poll.
    """
    client = await make_client(poll={"default_wait_s": 5, "max_wait_s": 5})
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    server = client.server.runner.server
    assert server is not None
    url = client.make_url("/events")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as poller:
        poll = asyncio.ensure_future(poller.post(url, json={}, headers=a.headers))
        busy = await parked_connection(server)
        request = busy._current_request
        assert request is not None and request._payload.is_eof()
        assert request._payload._buffer is http._DRAINED
        assert type(busy._messages) is not collections.deque
        (jti,) = await a.publish(resource_update("A"))
        r = await asyncio.wait_for(poll, 3)
        assert r.status == 200 and list((await r.json())["sets"]) == [jti]
        # the same connection reads the next request's body and applies its ack
        served = busy._manager.requests_count
        r = await poller.post(
            url, json={"ack": [jti], "returnImmediately": True}, headers=a.headers
        )
        assert r.status == 200 and (await r.json())["sets"] == {}
        assert busy._manager.requests_count == served + 1 and busy in server.connections
    assert client.app[metrics_key].sets_acked_total == 1


async def test_answers_found_empty_or_not_carry_the_same_headers(client, auth):
    """The empty answer is encoded once, ahead of time; it must read like any other."""
    a, jtis = await setup_abc(client, auth)
    full = await a.poll({"maxEvents": 1, "returnImmediately": True})
    await a.poll({"ack": jtis, "maxEvents": 0})
    empty = await a.poll({"returnImmediately": True}, headers={"x-fapi-interaction-id": "I-1"})
    for r in (full, empty):
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["x-fapi-interaction-id"]
    assert list(full.json()["sets"]) == [jtis[0]] and full.json()["moreAvailable"] is True
    assert empty.json() == {"sets": {}, "moreAvailable": False}
    assert empty.headers["x-fapi-interaction-id"] == "I-1"


async def test_a_body_that_comes_after_its_headers_is_read_whole(client, auth):
    """read_json's quick path takes a body already in; one still arriving is awaited."""
    a, jtis = await setup_abc(client, auth)
    body = orjson.dumps({"ack": jtis[:2], "returnImmediately": True})
    head = (
        "POST /events HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Authorization: {a.headers['Authorization']}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    try:
        writer.write(head.encode() + body[:5])
        await writer.drain()
        await asyncio.sleep(0.2)  # the handler runs and waits for the rest
        writer.write(body[5:])
        status = await asyncio.wait_for(reader.readline(), 3)
    finally:
        writer.close()
    assert status.startswith(b"HTTP/1.1 200")
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == [jtis[2]]  # both acks in the split body were applied


async def test_shutdown_answers_a_parked_poll(make_client, auth):
    client = await make_client(poll={"default_wait_s": 5, "max_wait_s": 5})
    a = TPP(client, auth, "tpp-a")
    waiting = asyncio.ensure_future(a.poll_ok({}))
    await asyncio.sleep(0.2)
    client.app[hub_key].release_all()
    sets, _ = await asyncio.wait_for(waiting, 2)
    assert sets == {}


# --- 47-50, 58: isolation, SET format, concurrency, no subscription ----------------------


async def test_47_clients_are_isolated(client, auth):
    a, (ja, jb, jc) = await setup_abc(client, auth)
    b = TPP(client, auth, "tpp-b")
    await b.subscribe()
    sets, more = await b.poll_ok({"ack": [ja], "returnImmediately": True})
    assert (sets, more) == ({}, False)
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == [ja, jb, jc]


async def test_47_client_id_comes_from_azp_then_sub(client, auth):
    _, jtis = await setup_abc(client, auth)
    for headers in (
        auth("whoever", scopes=["accounts"], extra={"azp": "tpp-a"}),
        auth("tpp-a", scopes=["accounts"]),
    ):
        r = await client.post("/events", json={"returnImmediately": True}, headers=headers)
        assert list((await r.json())["sets"]) == jtis


async def test_48_set_format(client, auth):
    a, jtis = await setup_abc(client, auth)
    sets, _ = await a.poll_ok({"returnImmediately": True, "maxEvents": 1})
    keys = await fetch_jwks(client)
    claims = verify_set(keys, sets[jtis[0]], jti=jtis[0], aud="tpp-a")
    assert claims["iss"] == client.app[settings_key].signing.issuer
    assert abs(claims["iat"] - time.time()) < 60
    assert claims["txn"] == claims["jti"]  # defaulted to the jti
    assert claims["toe"] == claims["iat"]  # defaulted to now


async def test_49_resource_update_payload(client, auth):
    a, jtis = await setup_abc(client, auth)
    sets, _ = await a.poll_ok({"returnImmediately": True, "maxEvents": 1})
    claims = verify_set(await fetch_jwks(client), sets[jtis[0]], jti=jtis[0], aud="tpp-a")
    subject = claims["events"]["urn:uk:org:openbanking:events:resource-update"]["subject"]
    assert subject["subject_type"] == "http://openbanking.org.uk/rid_http://openbanking.org.uk/rty"
    assert subject["http://openbanking.org.uk/rid"] == "A"
    assert isinstance(subject["http://openbanking.org.uk/rty"], str)
    links = subject["http://openbanking.org.uk/rlk"]
    assert links and all(set(link) == {"version", "link"} for link in links)


async def test_50_two_concurrent_polls_lose_nothing(client, auth):
    a, jtis = await setup_abc(client, auth)
    r1, r2 = await asyncio.gather(
        a.poll_ok({"returnImmediately": True, "maxEvents": 2}),
        a.poll_ok({"returnImmediately": True}),
    )
    assert set(r1[0]) | set(r2[0]) == set(jtis)
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == jtis  # nothing acked implicitly


async def test_58_no_subscription_means_empty_sets(client, auth):
    a = TPP(client, auth, "tpp-a")
    r = await client.post(
        "/publish/clients/tpp-a/sets",
        json=resource_update(),
        headers=auth("producer", scopes=["events:publish"]),
    )
    assert r.status == 202
    assert await r.json() == {"jtis": [], "skipped": [{"index": 0, "reason": "no_subscription"}]}
    sets, more = await a.poll_ok({"returnImmediately": True})
    assert (sets, more) == ({}, False)


async def test_concurrent_pollers_acking_while_a_producer_publishes(make_client, auth):
    """Several pollers of one client ack in parallel while SETs are published: at the end
    every SET was delivered at least once and none is left unacked or lost."""
    poll_app = await make_client(poll={"default_wait_s": 0.3, "max_wait_s": 1})
    other_app = await make_client(poll={"default_wait_s": 0.3, "max_wait_s": 1})
    a = TPP(poll_app, auth, "tpp-a")
    a2 = TPP(other_app, auth, "tpp-a")
    await a.subscribe()
    published: list[str] = []
    delivered: set[str] = set()
    done = asyncio.Event()

    async def producer():
        for i in range(20):
            batch = [resource_update() for _ in range(1 + i % 3)]
            published.extend(await a.publish(*batch))
            await asyncio.sleep(0.01)
        done.set()

    async def poller(tpp, n):
        pending_acks: list[str] = []
        while True:
            sets, _ = await tpp.poll_ok({"ack": pending_acks, "maxEvents": n})
            delivered.update(sets)
            pending_acks = list(sets)
            if done.is_set() and not sets:
                return  # this empty poll carried the ack of the previous batch

    await asyncio.gather(producer(), poller(a, 2), poller(a, 5), poller(a2, 3), poller(a2, 1))
    # A last ack-only sweep for anything delivered in the pollers' final rounds.
    sets, more = await a.poll_ok({"returnImmediately": True})
    assert (sets, more) == ({}, False)
    assert len(published) == len(set(published)) == sum(1 + i % 3 for i in range(20))
    assert delivered == set(published)
    assert await poll_app.app[sets_key].pending("tpp-a") == 0


async def test_consent_revoked_set_is_delivered(client, auth):
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    (jti,) = await a.publish(consent_revoked("aac-9"))
    sets, _ = await a.poll_ok({"returnImmediately": True})
    verify_set(await fetch_jwks(client), sets[jti], jti=jti, aud="tpp-a")


async def test_lease_holds_sets_back_and_a_long_poll_wakes_when_it_ends(make_client, auth):
    client = await make_client(
        events={"redelivery_s": 0.5}, poll={"default_wait_s": 3, "max_wait_s": 3}
    )
    a, jtis = await setup_abc(client, auth)
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == jtis
    sets, more = await a.poll_ok({"returnImmediately": True})
    assert (sets, more) == ({}, False)  # all three leased
    started = time.monotonic()
    sets, _ = await a.poll_ok({"ack": jtis[:2]})
    assert list(sets) == jtis[2:]  # redelivered when the lease ended, not at the 3 s timeout
    assert time.monotonic() - started < 2.0


async def test_retention_drops_are_counted(make_client, auth):
    client = await make_client(events={"retention_s": 1})
    a, _ = await setup_abc(client, auth)
    await asyncio.sleep(1.1)
    sets, more = await a.poll_ok({"returnImmediately": True})
    assert (sets, more) == ({}, False)
    assert client.app[metrics_key].sets_expired_total == 3


async def test_errors_off_the_ob_paths_keep_the_generic_body(client, auth):
    r = await client.get("/queues/nope")
    assert "x-fapi-interaction-id" not in r.headers
    assert "error" in await r.json()
    r = await client.get("/event-subscriptions/x/y")
    assert r.status == 404
    assert r.headers["x-fapi-interaction-id"]
    assert (await r.json())["Errors"][0]["ErrorCode"] == "UK.OBIE.Resource.NotFound"


async def test_metrics_count_polls_deliveries_and_acks(client, auth):
    a, jtis = await setup_abc(client, auth)
    await a.poll_ok({"returnImmediately": True})
    await a.poll_ok({"ack": jtis, "setErrs": {}, "returnImmediately": True})
    text = await (await client.get("/metrics")).text()
    assert "broker_event_polls_total 2" in text
    assert "broker_sets_delivered_total 3" in text
    assert "broker_sets_acked_total 3" in text
    assert "broker_sets_published_total 3" in text
