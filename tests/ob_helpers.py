"""Helpers for the OB tests: SET payload factories, a checked HTTP client, SET verification.

Every `/events` and `/event-subscriptions` response that goes through `ob()` is checked
against the OB OpenAPI document (tests/obschema.py); every SET read back through
`verify_set()` is checked with jwcrypto (an independent JOSE library) against the broker's
published JWKS, and its payload against OBEventNotification2.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from jwcrypto import jwk, jws
from jwcrypto.common import JWException

from tests import obschema

PUBLISH = {"scopes": ["events:publish"]}
RU = obschema.RU
CAR = obschema.CAR
LAU = obschema.LAU
OB_CRIT = [
    "http://openbanking.org.uk/iat",
    "http://openbanking.org.uk/iss",
    "http://openbanking.org.uk/tan",
]
_seq = itertools.count(1)


def subject(rid: str, rty: str = "account-access-consent") -> dict[str, Any]:
    link = f"https://aspsp.example.com/open-banking/v3.1/aisp/{rty}s/{rid}"
    return {
        "subject_type": "http://openbanking.org.uk/rid_http://openbanking.org.uk/rty",
        "http://openbanking.org.uk/rid": rid,
        "http://openbanking.org.uk/rty": rty,
        "http://openbanking.org.uk/rlk": [{"version": "v3.1", "link": link}],
    }


def resource_update(rid: str | None = None, **extra: Any) -> dict[str, Any]:
    """A resource-update SET payload as a producer posts it."""
    rid = rid or f"aac-{next(_seq)}"
    payload = {
        "sub": f"https://aspsp.example.com/open-banking/v3.1/aisp/account-access-consents/{rid}",
        "events": {RU: {"subject": subject(rid)}},
    }
    payload.update(extra)
    return payload


def consent_revoked(rid: str | None = None) -> dict[str, Any]:
    rid = rid or f"aac-{next(_seq)}"
    return {
        "sub": f"https://aspsp.example.com/open-banking/v3.1/aisp/account-access-consents/{rid}",
        "events": {CAR: {"subject": subject(rid)}},
    }


@dataclass
class Reply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class TPP:
    """One TPP talking to the broker: polls and subscriptions checked against the OB schema."""

    def __init__(self, client: Any, auth: Any, client_id: str, scope: str = "accounts") -> None:
        self.client = client
        self.client_id = client_id
        self.headers = auth(f"svc-{client_id}", scopes=[scope], client_id=client_id)
        self._auth = auth

    async def ob(self, method: str, path: str, *, headers: Any = None, **kw: Any) -> Reply:
        h = dict(self.headers)
        h.update(headers or {})
        r = await self.client.request(method, path, headers=h, **kw)
        body = await r.read()
        obschema.check_response(method, path, r.status, r.headers, body)
        return Reply(r.status, r.headers, body)

    async def poll(self, body: Any = None, **kw: Any) -> Reply:
        if body is not None and "data" not in kw and "json" not in kw:
            kw["json"] = body
        return await self.ob("POST", "/events", **kw)

    async def poll_ok(self, body: dict[str, Any]) -> tuple[dict[str, str], bool]:
        r = await self.poll(body)
        assert r.status == 200, r.body
        doc = r.json()
        return doc["sets"], doc["moreAvailable"]

    async def subscribe(self, **data: Any) -> str:
        data.setdefault("Version", "3.1")
        r = await self.ob("POST", "/event-subscriptions", json={"Data": data})
        assert r.status == 201, r.body
        return str(r.json()["Data"]["EventSubscriptionId"])

    async def publish(self, *payloads: dict[str, Any]) -> list[str]:
        """Publish as the producer; returns the jtis queued, in order."""
        body: Any = payloads[0] if len(payloads) == 1 else list(payloads)
        r = await self.client.post(
            f"/publish/clients/{self.client_id}/sets",
            json=body,
            headers=self._auth("producer", **PUBLISH),
        )
        assert r.status == 202, await r.text()
        return list((await r.json())["jtis"])


async def fetch_jwks(client: Any) -> jwk.JWKSet:
    r = await client.get("/.well-known/jwks.json")
    assert r.status == 200
    return jwk.JWKSet.from_json(await r.text())


def verify_set(
    keys: jwk.JWKSet, token: str, *, jti: str, aud: str, profile: str = "ob"
) -> dict[str, Any]:
    """Verify a compact SET with jwcrypto; check header, claims and schema; return the claims."""
    assert token.count(".") == 2
    registry = {
        name: jws.JWSEHeaderParameter("OB message signing", False, True, None) for name in OB_CRIT
    }
    obj = jws.JWS(header_registry=registry)
    obj.deserialize(token)
    header = obj.jose_header
    assert header["alg"] == "PS256"
    key = keys.get_key(header["kid"])
    assert key is not None, f"kid {header['kid']!r} is not in the JWKS"
    try:
        obj.verify(key, alg="PS256")
    except JWException as e:  # pragma: no cover - the assertion message is the point
        raise AssertionError(f"SET signature does not verify: {e}") from e
    if profile == "ob":
        assert "typ" not in header
        assert header["crit"] == OB_CRIT
        assert isinstance(header["http://openbanking.org.uk/iat"], int)
        assert header["http://openbanking.org.uk/iss"]
        assert header["http://openbanking.org.uk/tan"]
    else:
        assert header["typ"] == "secevent+jwt"
        assert "crit" not in header
    claims: dict[str, Any] = json.loads(obj.payload)
    assert claims["jti"] == jti
    assert claims["aud"] == aud
    for name in ("iss", "iat", "sub", "txn", "toe", "events"):
        assert name in claims, name
    assert "exp" not in claims
    obschema.validate_set_payload(claims)
    return claims
