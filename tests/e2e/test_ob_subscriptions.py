"""/event-subscriptions (OB §5.8): spec §8 cases 51-57, every response checked against the
OB OpenAPI document (tests/ob_helpers.TPP.ob)."""

from __future__ import annotations

import pytest

from tests.ob_helpers import CAR, TPP, consent_revoked, resource_update, subject


async def test_51_create_returns_201_with_id_links_and_meta(client, auth):
    a = TPP(client, auth, "tpp-a")
    r = await a.ob("POST", "/event-subscriptions", json={"Data": {"Version": "3.1"}})
    assert r.status == 201
    doc = r.json()
    sub_id = doc["Data"]["EventSubscriptionId"]
    assert 1 <= len(sub_id) <= 40
    assert doc["Data"]["Version"] == "3.1"
    assert "EventTypes" not in doc["Data"]  # omitted means all types; never null
    assert doc["Links"]["Self"].endswith(f"/event-subscriptions/{sub_id}")
    assert doc["Meta"] == {}


async def test_51_callback_url_and_event_types_are_stored_and_returned(client, auth):
    a = TPP(client, auth, "tpp-a")
    data = {
        "CallbackUrl": "https://tpp.example.com/open-banking/v3.1/event-notifications",
        "Version": "3.1",
        "EventTypes": [
            "UK.OBIE.Resource-Update",
            "urn:uk:org:openbanking:events:consent-authorization-revoked",
        ],
    }
    r = await a.ob("POST", "/event-subscriptions", json={"Data": data})
    assert r.status == 201
    expected = {
        **data,
        "EventTypes": ["UK.OBIE.Resource-Update", "UK.OBIE.Consent-Authorization-Revoked"],
    }
    got = r.json()["Data"]
    assert {k: got[k] for k in expected} == expected
    r = await a.ob("GET", "/event-subscriptions")
    (listed,) = r.json()["Data"]["EventSubscription"]
    assert listed == got


async def test_52_second_subscription_of_a_tpp_is_409(client, auth):
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    r = await a.ob("POST", "/event-subscriptions", json={"Data": {"Version": "3.1"}})
    assert r.status == 409
    assert r.json()["Errors"][0]["ErrorCode"] == "UK.OBIE.Rules.ResourceAlreadyExists"
    # Another TPP is not affected.
    await TPP(client, auth, "tpp-b").subscribe()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ({}, "UK.OBIE.Field.Missing"),
        ({"Version": "3.1.11.0.0.1"}, "UK.OBIE.Field.Invalid"),
        ({"Version": ""}, "UK.OBIE.Field.Invalid"),
        ({"Version": 3.1}, "UK.OBIE.Field.Invalid"),
        ({"Version": "3.1", "CallbackUrl": "not a url"}, "UK.OBIE.Field.Invalid"),
        # TLS only (push.allow_http is off by default)
        (
            {"Version": "3.1", "CallbackUrl": "http://tpp.example/v3.1/event-notifications"},
            "UK.OBIE.Field.Invalid",
        ),
        (
            {"Version": "3.1", "CallbackUrl": "https://[zz/v3.1/event-notifications"},
            "UK.OBIE.Field.Invalid",
        ),
        (
            {"Version": "3.1", "CallbackUrl": "https://u:p@tpp.example/v3.1/event-notifications"},
            "UK.OBIE.Field.Invalid",
        ),
        # only public addresses (push.allow_private_addresses is off by default): cloud
        # metadata, loopback, a private range hidden in an IPv4-mapped IPv6 address
        *(
            (
                {"Version": "3.1", "CallbackUrl": f"https://{host}/v3.1/event-notifications"},
                "UK.OBIE.Field.Invalid",
            )
            for host in (
                "169.254.169.254",
                "127.0.0.1:8443",
                "[::1]",
                "[::ffff:10.0.0.7]",
                "[64:ff9b::a00:7]",  # NAT64 to 10.0.0.7
                "127.1",  # a legacy form of 127.0.0.1
            )
        ),
        # a real-time callback must end with <version>/event-notifications
        ({"Version": "3.1", "CallbackUrl": "https://evil.example/x"}, "UK.OBIE.Field.Invalid"),
        (
            {"Version": "3.1", "CallbackUrl": "https://tpp.example/v3.1/notifications"},
            "UK.OBIE.Field.Invalid",
        ),
        ({"Version": "3.1", "EventTypes": "UK.OBIE.Resource-Update"}, "UK.OBIE.Field.Invalid"),
    ],
)
async def test_53_invalid_body_is_400(client, auth, data, code):
    a = TPP(client, auth, "tpp-a")
    r = await a.ob("POST", "/event-subscriptions", json={"Data": data})
    assert r.status == 400
    assert r.json()["Errors"][0]["ErrorCode"] == code
    r = await a.ob("GET", "/event-subscriptions")
    assert r.json()["Data"]["EventSubscription"] == []  # nothing created


async def test_53_body_without_data_is_400(client, auth):
    r = await TPP(client, auth, "tpp-a").ob("POST", "/event-subscriptions", json={"Version": "3.1"})
    assert r.status == 400
    assert r.json()["Errors"][0]["ErrorCode"] == "UK.OBIE.Field.Missing"


async def test_54_unknown_event_type_is_400_unsupported(client, auth):
    a = TPP(client, auth, "tpp-a")
    body = {"Data": {"Version": "3.1", "EventTypes": ["UK.OBIE.Bogus"]}}
    r = await a.ob("POST", "/event-subscriptions", json=body)
    assert r.status == 400
    assert r.json()["Errors"][0]["ErrorCode"] == "UK.OBIE.Unsupported.EventType"
    assert r.json()["Errors"][0]["Path"] == "Data.EventTypes[0]"


async def test_55_list_is_empty_then_has_the_subscription(client, auth):
    a = TPP(client, auth, "tpp-a")
    r = await a.ob("GET", "/event-subscriptions")
    assert r.status == 200
    assert r.json()["Data"] == {"EventSubscription": []}
    sub_id = await a.subscribe()
    r = await a.ob("GET", "/event-subscriptions")
    (sub,) = r.json()["Data"]["EventSubscription"]
    assert sub == {"EventSubscriptionId": sub_id, "Version": "3.1"}
    # Another TPP sees only its own.
    r = await TPP(client, auth, "tpp-b").ob("GET", "/event-subscriptions")
    assert r.json()["Data"]["EventSubscription"] == []


async def test_56_put_narrows_event_types_and_filters_publishing(client, auth):
    a = TPP(client, auth, "tpp-a")
    sub_id = await a.subscribe()
    body = {
        "Data": {
            "EventSubscriptionId": sub_id,
            "Version": "3.1",
            "EventTypes": ["UK.OBIE.Resource-Update"],
        }
    }
    r = await a.ob("PUT", f"/event-subscriptions/{sub_id}", json=body)
    assert r.status == 200
    assert r.json()["Data"]["EventTypes"] == ["UK.OBIE.Resource-Update"]
    producer = await client.post(
        "/publish/clients/tpp-a/sets",
        json=[consent_revoked(), resource_update()],
        headers=a._auth("producer", scopes=["events:publish"]),
    )
    assert producer.status == 202
    out = await producer.json()
    assert len(out["jtis"]) == 1
    assert out["skipped"] == [{"index": 0, "reason": "event_type_not_subscribed"}]
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == out["jtis"]


async def test_56_a_set_with_one_subscribed_event_among_others_is_queued(client, auth):
    a = TPP(client, auth, "tpp-a")
    await a.subscribe(EventTypes=["UK.OBIE.Consent-Authorization-Revoked"])
    both = resource_update("x")
    both["events"][CAR] = {}  # the CBPII example: revoked beside a resource-update
    (jti,) = await a.publish(both)
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == [jti]


@pytest.mark.parametrize(
    ("event_types", "queued"),
    [
        (None, [1]),
        (["UK.OBIE.Resource-Update", "UK.OBIE.Consent-Authorization-Revoked"], [1]),
        (["UK.OBIE.Consent-Authorization-Revoked"], []),
    ],
)
async def test_a_3_1_1_subscription_gets_resource_update_events_only(
    client, auth, event_types, queued
):
    # OB event-notification API profile (spec §5.8): "Version 3.1.1 ... limits events to
    # resource-update": a consent-revoked SET, or one carrying both, is not queued for it, nor
    # is anything if its EventTypes leave resource-update out; GET shows what the TPP sent.
    a = TPP(client, auth, "tpp-a")
    sub_id = await a.subscribe(
        Version="3.1.1", **({"EventTypes": event_types} if event_types else {})
    )
    mixed = resource_update("m")
    mixed["events"][CAR] = {}
    r = await client.post(
        "/publish/clients/tpp-a/sets",
        json=[consent_revoked(), resource_update(), mixed],
        headers=a._auth("producer", scopes=["events:publish"]),
    )
    assert r.status == 202
    out = await r.json()
    skipped = [
        {"index": i, "reason": "event_type_not_subscribed"} for i in range(3) if i not in queued
    ]
    assert out["skipped"] == skipped and len(out["jtis"]) == len(queued)
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == out["jtis"]
    (sub,) = (await a.ob("GET", "/event-subscriptions")).json()["Data"]["EventSubscription"]
    assert sub["EventSubscriptionId"] == sub_id and sub.get("EventTypes") == event_types


async def test_56_put_with_mismatched_body_id_is_400(client, auth):
    a = TPP(client, auth, "tpp-a")
    sub_id = await a.subscribe()
    body = {"Data": {"EventSubscriptionId": "other", "Version": "3.1"}}
    r = await a.ob("PUT", f"/event-subscriptions/{sub_id}", json=body)
    assert r.status == 400


async def test_57_delete_then_list_is_empty_and_publishing_stops(client, auth):
    a = TPP(client, auth, "tpp-a")
    sub_id = await a.subscribe()
    r = await a.ob("DELETE", f"/event-subscriptions/{sub_id}")
    assert r.status == 204
    assert r.body == b""
    r = await a.ob("GET", "/event-subscriptions")
    assert r.json()["Data"]["EventSubscription"] == []
    assert await a.publish(resource_update()) == []
    await a.subscribe()  # a new one may be created after the delete


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
async def test_57_unknown_or_foreign_id_is_400(client, auth, method):
    a, b = TPP(client, auth, "tpp-a"), TPP(client, auth, "tpp-b")
    b_id = await b.subscribe()
    body = {"json": {"Data": {"Version": "3.1"}}} if method == "PUT" else {}
    for sub_id in ("does-not-exist", b_id):
        r = await a.ob(method, f"/event-subscriptions/{sub_id}", **body)
        assert r.status == 400
        assert r.json()["Errors"][0]["ErrorCode"] == "UK.OBIE.Resource.NotFound"
    r = await b.ob("GET", "/event-subscriptions")
    assert r.json()["Data"]["EventSubscription"][0]["EventSubscriptionId"] == b_id


async def test_subscriptions_need_a_token_and_an_ob_scope(client, auth):
    r = await client.get("/event-subscriptions")
    assert r.status == 401
    assert r.headers["x-fapi-interaction-id"]
    r = await TPP(client, auth, "tpp-a", scope="openid").ob("GET", "/event-subscriptions")
    assert r.status == 403


async def test_linked_account_update_is_queued_for_its_subscribed_type(client, auth):
    a = TPP(client, auth, "tpp-a")
    await a.subscribe(EventTypes=["UK.OBIE.Account-Access-Consent-Linked-Account-Update"])
    payload = {
        "sub": "https://aspsp.example.com/open-banking/v3.1/aisp/account-access-consents/aac-1",
        "events": {
            "urn:uk:org:openbanking:events:account-access-consent-linked-account-update": {
                "reason": "UK.OBIE.AccountClosure",
                "subject": subject("acc-1"),
            }
        },
    }
    (jti,) = await a.publish(payload)
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == [jti]
