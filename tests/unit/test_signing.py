"""broker/signing.py: key loading, kid, JOSE headers and the JWKS document."""

from __future__ import annotations

import asyncio
import json

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwcrypto import jwk, jws

from broker.config import SigningSettings
from broker.errors import SigningError
from broker.signing import (
    DEV_KEY_NAME,
    LoopSigning,
    Signer,
    compact_jws,
    load_or_create_dev_key,
    thumbprint,
)
from tests.ob_helpers import OB_CRIT


def _pem(key, path):
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return str(path)


def _verify(signer, token):
    keys = jwk.JWKSet.from_json(signer.jwks_body)
    registry = {n: jws.JWSEHeaderParameter("OB", False, True, None) for n in OB_CRIT}
    obj = jws.JWS(header_registry=registry)
    obj.deserialize(token)
    obj.verify(keys.get_key(obj.jose_header["kid"]), alg="PS256")
    return obj.jose_header, json.loads(obj.payload)


def test_dev_key_is_generated_once_and_private(tmp_path):
    k1 = load_or_create_dev_key(tmp_path)
    k2 = load_or_create_dev_key(tmp_path)
    assert k1.private_numbers() == k2.private_numbers()
    assert (tmp_path / DEV_KEY_NAME).stat().st_mode & 0o077 == 0
    assert k1.key_size == 2048


def test_ob_header_and_signature_verify_with_jwcrypto(tmp_path):
    s = SigningSettings(ob_iss="org-1/ssa-1", ob_tan="openbanking.org.uk")
    signer = Signer.from_settings(s, tmp_path)
    token = signer.sign_set({"iss": "i", "iat": 1700000000, "jti": "j", "events": {}})
    header, claims = _verify(signer, token)
    assert header == {
        "alg": "PS256",
        "kid": signer.kid,
        "http://openbanking.org.uk/iat": 1700000000,
        "http://openbanking.org.uk/iss": "org-1/ssa-1",
        "http://openbanking.org.uk/tan": "openbanking.org.uk",
        "crit": OB_CRIT,
    }
    assert claims["jti"] == "j"


def test_rfc8417_header(tmp_path):
    signer = Signer.from_settings(SigningSettings(profile="rfc8417"), tmp_path)
    header, _ = _verify(signer, signer.sign_set({"jti": "j", "iat": 1}))
    assert header == {"alg": "PS256", "kid": signer.kid, "typ": "secevent+jwt"}


def test_kid_defaults_to_the_rfc7638_thumbprint(tmp_path):
    signer = Signer.from_settings(SigningSettings(), tmp_path)
    (key,) = json.loads(signer.jwks_body)["keys"]
    assert (
        signer.kid
        == jwk.JWK(**key).thumbprint()
        == thumbprint(load_or_create_dev_key(tmp_path).public_key())
    )
    assert Signer.from_settings(SigningSettings(kid="k1"), tmp_path).kid == "k1"


def test_key_file_and_previous_keys(tmp_path):
    current = _pem(
        rsa.generate_private_key(public_exponent=65537, key_size=2048), tmp_path / "c.pem"
    )
    old_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pub = tmp_path / "old.pub.pem"
    pub.write_bytes(
        old_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    s = SigningSettings(key_file=current, previous_key_files=(str(pub),), previous_kids=("old",))
    signer = Signer.from_settings(s, tmp_path)
    kids = [k["kid"] for k in json.loads(signer.jwks_body)["keys"]]
    assert kids == [signer.kid, "old"]
    assert all("d" not in k for k in json.loads(signer.jwks_body)["keys"])


def test_non_rsa_or_short_keys_are_refused(tmp_path):
    ec_pem = _pem(ec.generate_private_key(ec.SECP256R1()), tmp_path / "ec.pem")
    with pytest.raises(SigningError, match="not an RSA key"):
        Signer.from_settings(SigningSettings(key_file=ec_pem), tmp_path)
    short = _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024), tmp_path / "s.pem")
    with pytest.raises(SigningError, match="at least 2048"):
        Signer.from_settings(SigningSettings(key_file=short), tmp_path)
    garbage = tmp_path / "g.pem"
    garbage.write_text("not a key")
    with pytest.raises(SigningError, match="cannot be loaded"):
        Signer.from_settings(SigningSettings(key_file=str(garbage)), tmp_path)


def test_signing_uses_the_loaded_key_object(tmp_path, monkeypatch):
    """Sign once per SET with the key parsed at start: never the PEM again per call.

    (Re-parsing a PEM per SET would cost ~30 ms each, against ~0.25 ms to sign: checked by
    what is called, not by timing, which a shared machine makes flaky.)
    """
    signer = Signer.from_settings(SigningSettings(), tmp_path)

    def no_parsing(*_args, **_kwargs):
        raise AssertionError("the key was parsed again to sign")

    monkeypatch.setattr(serialization, "load_pem_private_key", no_parsing)
    tokens = [signer.sign_set({"jti": str(i), "iat": 1}) for i in range(5)]
    assert len(set(tokens)) == 5 and all(t.count(".") == 2 for t in tokens)


def _recording(signer: Signer, monkeypatch, log: list[str] | None = None) -> list[bytes]:
    """Record what `signer` signs (and "sig" in `log`); an input b"bad" fails to sign."""
    made: list[bytes] = []
    sign = signer.signature

    def recorded(data: bytes) -> bytes:
        made.append(data)
        if log is not None:
            log.append("sig")
        if data == b"bad":
            raise ValueError("no")
        return sign(data)

    monkeypatch.setattr(signer, "signature", recorded)
    return made


async def test_loop_signing_signs_in_order_one_signature_per_loop_turn(tmp_path, monkeypatch):
    """Other callbacks run between two signatures of one batch: a publish of many SETs does
    not hold the loop (and every parked poll's wake-up) for all of its RSA work at once."""
    signer = Signer.from_settings(SigningSettings(), tmp_path)
    claims = [{"iss": "i", "iat": 1, "jti": f"j{i}", "events": {}} for i in range(4)]
    inputs = [signer.signing_input(c) for c in claims]
    log: list[str] = []
    signed = _recording(signer, monkeypatch, log)
    loop = asyncio.get_running_loop()

    def tick(n: int) -> None:  # a callback that re-arms itself each turn, as loop work does
        log.append("tick")
        if n:
            loop.call_soon(tick, n - 1)

    signing = LoopSigning(signer)
    loop.call_soon(tick, 10)
    first = asyncio.ensure_future(signing.sign(inputs[:3]))
    await asyncio.sleep(0)
    second = await signing.sign(inputs[3:])  # asked later: signed after the first batch
    sigs = [*await first, *second]
    assert signed == inputs  # first come, first signed
    for c, data, sig in zip(claims, inputs, sigs, strict=True):  # each the right signature
        _, got = _verify(signer, compact_jws(data, sig))
        assert got["jti"] == c["jti"]
    first_sig, last_sig = log.index("sig"), len(log) - 1 - log[::-1].index("sig")
    between = log[first_sig : last_sig + 1]
    assert between.count("sig") == 4
    assert "sig,sig" not in ",".join(between)  # never two signatures in one turn


async def test_loop_signing_skips_the_signatures_of_a_cancelled_publish(tmp_path, monkeypatch):
    signer = Signer.from_settings(SigningSettings(), tmp_path)
    made = _recording(signer, monkeypatch)
    signing = LoopSigning(signer)
    gone = asyncio.ensure_future(signing.sign([b"a.b", b"c.d", b"e.f"]))
    await asyncio.sleep(0)  # queued, not yet signed
    gone.cancel()
    kept = await asyncio.wait_for(signing.sign([b"g.h"]), 10)  # the cancelled ones passed over
    assert made == [b"g.h"] and len(kept) == 1
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_a_failed_signature_fails_its_publish_only(tmp_path, monkeypatch):
    """The rest of the failed publish's batch is not signed; a publish queued beside it is."""
    signer = Signer.from_settings(SigningSettings(), tmp_path)
    made = _recording(signer, monkeypatch)
    signing = LoopSigning(signer)
    failing = asyncio.ensure_future(signing.sign([b"bad", b"never.signed"]))
    beside = asyncio.ensure_future(signing.sign([b"x.y"]))
    with pytest.raises(ValueError, match="no"):
        await asyncio.wait_for(failing, 10)
    assert len(await asyncio.wait_for(beside, 10)) == 1
    assert made == [b"bad", b"x.y"]


def test_loop_signing_goes_on_signing_on_a_new_event_loop(tmp_path):
    """An app started again on a new loop: what the old loop left queued (a turn it never
    ran) does not stop the new loop's signatures."""
    signing = LoopSigning(Signer.from_settings(SigningSettings(), tmp_path))

    left: list[asyncio.Future[list[bytes]]] = []

    async def leave_one_queued() -> None:
        left.append(asyncio.ensure_future(signing.sign([b"a.b"])))  # its turn never runs

    old = asyncio.new_event_loop()
    old.run_until_complete(leave_one_queued())
    old.close()
    assert not left[0].done()
    left[0]._log_destroy_pending = False  # type: ignore[attr-defined]  # left on purpose

    async def sign_again() -> list[bytes]:
        return await asyncio.wait_for(signing.sign([b"c.d", b"e.f"]), 10)

    assert len(asyncio.run(sign_again())) == 2
