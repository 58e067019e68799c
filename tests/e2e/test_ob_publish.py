"""SET issuing (POST /publish/clients/{id}/sets) and GET /.well-known/jwks.json."""

from __future__ import annotations

from typing import Any

import pytest
from jwcrypto import jwk

from broker.appkeys import metrics_key, sets_key, signer_key
from tests.ob_helpers import (
    CAR,
    LAU,
    RU,
    TPP,
    consent_revoked,
    fetch_jwks,
    resource_update,
    subject,
    verify_set,
)


def producer(auth):
    return auth("producer", scopes=["events:publish"])


async def test_publish_returns_the_jtis_queued_and_they_are_unique(client, auth):
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    jtis = await a.publish(*[resource_update() for _ in range(20)])
    assert len(jtis) == len(set(jtis)) == 20
    assert client.app[metrics_key].sets_published_total == 20
    sets, _ = await a.poll_ok({"returnImmediately": True})
    assert list(sets) == jtis


async def test_producer_txn_and_toe_are_kept(client, auth):
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    (jti,) = await a.publish(resource_update(txn="dfc51628-interaction", toe=1516239022))
    sets, _ = await a.poll_ok({"returnImmediately": True})
    claims = verify_set(await fetch_jwks(client), sets[jti], jti=jti, aud="tpp-a")
    assert claims["txn"] == "dfc51628-interaction"
    assert claims["toe"] == 1516239022


async def test_publish_needs_the_publish_scope(client, auth):
    r = await client.post(
        "/publish/clients/tpp-a/sets",
        json=resource_update(),
        headers=auth("x", scopes=["accounts"]),
    )
    assert r.status == 403
    r = await client.post("/publish/clients/tpp-a/sets", json=resource_update())
    assert r.status == 401


def _without_rlk() -> dict[str, Any]:
    p = resource_update()
    del p["events"][RU]["subject"]["http://openbanking.org.uk/rlk"]
    return p


def _bad_subject_type() -> dict[str, Any]:
    p = resource_update()
    p["events"][RU]["subject"]["subject_type"] = "x"
    return p


def _revoked_without_subject() -> dict[str, Any]:
    p = consent_revoked()
    p["events"][CAR] = {}
    return p


def _linked_wrong_rty() -> dict[str, Any]:
    return {
        "sub": "https://aspsp.example.com/x",
        "events": {LAU: {"subject": subject("acc-1", rty="account")}},
    }


@pytest.mark.parametrize(
    "payload",
    [
        {"events": {RU: {"subject": subject("a")}}},  # no sub
        {"sub": "not a uri", "events": {RU: {"subject": subject("a")}}},
        {"sub": "https://x/y", "events": {}},
        {"sub": "https://x/y", "events": {"urn:example:custom": {}}},
        {"sub": "https://x/y", "events": {RU: {}}},
        {"sub": "https://x/y", "events": {RU: {"subject": subject("a"), "extra": 1}}},
        _without_rlk(),
        _bad_subject_type(),
        _revoked_without_subject(),
        _linked_wrong_rty(),
        resource_update(jti="mine"),
        resource_update(iss="https://evil/"),
        resource_update(exp=1),
        resource_update(toe="now"),
        resource_update(txn=""),
        resource_update(colour="blue"),
        [],
        "a string",
    ],
)
async def test_malformed_payload_is_400_and_nothing_is_stored(client, auth, payload):
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    # A good SET in the same batch is not stored either: all or nothing.
    batch = [resource_update(), payload] if isinstance(payload, dict) else payload
    r = await client.post("/publish/clients/tpp-a/sets", json=batch, headers=producer(auth))
    assert r.status == 400, await r.text()
    assert await client.app[sets_key].pending("tpp-a") == 0


async def test_batch_over_the_cap_is_400(make_client, auth):
    client = await make_client(publish={"max_batch": 2})
    r = await client.post(
        "/publish/clients/tpp-a/sets",
        json=[resource_update() for _ in range(3)],
        headers=producer(auth),
    )
    assert r.status == 400


async def test_large_batches_are_signed_and_queued(client, auth):
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    jtis = await a.publish(*[resource_update() for _ in range(40)])  # signed on a thread
    sets, more = await a.poll_ok({"returnImmediately": True, "maxEvents": 40})
    assert list(sets) == jtis
    assert more is False
    keys = await fetch_jwks(client)
    verify_set(keys, sets[jtis[-1]], jti=jtis[-1], aud="tpp-a")


async def test_rfc8417_profile_sets_typ_secevent_jwt(make_client, auth):
    client = await make_client(signing={"profile": "rfc8417"})
    a = TPP(client, auth, "tpp-a")
    await a.subscribe()
    (jti,) = await a.publish(resource_update())
    sets, _ = await a.poll_ok({"returnImmediately": True})
    verify_set(await fetch_jwks(client), sets[jti], jti=jti, aud="tpp-a", profile="rfc8417")


async def test_jwks_publishes_public_signing_keys_only(client, auth):
    r = await client.get("/.well-known/jwks.json")
    assert r.status == 200
    assert r.content_type == "application/json"
    assert "max-age=" in r.headers["Cache-Control"]
    doc = await r.json()
    (key,) = doc["keys"]
    assert key["kty"] == "RSA"
    assert key["use"] == "sig"
    assert key["alg"] == "PS256"
    assert key["kid"] == client.app[signer_key].kid
    assert not {"d", "p", "q", "dp", "dq", "qi"} & set(key)
    # The default kid is the RFC 7638 thumbprint, as jwcrypto computes it.
    assert jwk.JWK(**key).thumbprint() == key["kid"]


async def test_jwks_keeps_the_previous_key_during_a_rotation(make_client, auth, tmp_path):
    """SETs signed before the rotation, still unacked, verify with the previous key."""
    from broker.signing import load_or_create_dev_key

    old_dir, new_dir = tmp_path / "old", tmp_path / "new"
    old_key = load_or_create_dev_key(old_dir)
    load_or_create_dev_key(new_dir)
    old_pem = str(old_dir / "set-signing.pem")
    new_pem = str(new_dir / "set-signing.pem")

    before = await make_client(signing={"key_file": old_pem})
    a = TPP(before, auth, "tpp-a")
    await a.subscribe()
    (jti,) = await a.publish(resource_update())

    after = await make_client(
        signing={"key_file": new_pem, "previous_key_files": [old_pem], "kid": "k-2025"}
    )
    keys = await fetch_jwks(after)
    doc = (await (await after.get("/.well-known/jwks.json")).json())["keys"]
    assert [k["kid"] for k in doc][:1] == ["k-2025"]
    assert len(doc) == 2
    sets, _ = await TPP(after, auth, "tpp-a").poll_ok({"returnImmediately": True})
    claims = verify_set(keys, sets[jti], jti=jti, aud="tpp-a")
    assert claims["jti"] == jti
    assert old_key.key_size == 2048
