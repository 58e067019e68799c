"""Bearer-token verification against a JWKS file and the dev issuer."""

from __future__ import annotations

import hashlib
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.auth import DevIssuer, Principal, TokenVerifier
from broker.config import AuthSettings
from broker.errors import AuthError, ConfigError, Forbidden

RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC = ec.generate_private_key(ec.SECP256R1())
ED = ed25519.Ed25519PrivateKey.generate()


def _jwk(key, kid, alg=None):
    pub = key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(pub))
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(pub))
    else:
        jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(pub))
    jwk["kid"] = kid
    if alg:
        jwk["alg"] = alg
    return jwk


@pytest.fixture
def verifier(tmp_path):
    def make(**settings):
        path = tmp_path / "jwks.json"
        path.write_text(
            json.dumps(
                {
                    "keys": [
                        _jwk(RSA, "rsa"),
                        _jwk(EC, "ec"),
                        _jwk(ED, "ed"),
                        {
                            "kty": "oct",
                            "kid": "hmac",
                            "k": "c3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3Nzc3M",
                        },
                    ]
                }
            )
        )
        return TokenVerifier.from_settings(AuthSettings(jwks_file=str(path), **settings), tmp_path)

    return make


def _claims(**extra):
    now = int(time.time())
    return {"sub": "alice", "exp": now + 600, "iat": now, **extra}


@pytest.mark.parametrize(
    ("key", "kid", "alg"),
    [
        (RSA, "rsa", "RS256"),
        (RSA, "rsa", "PS256"),
        (EC, "ec", "ES256"),
        (ED, "ed", "EdDSA"),
    ],
)
def test_accepts_each_supported_algorithm(verifier, key, kid, alg):
    token = jwt.encode(_claims(scope="a b"), key, algorithm=alg, headers={"kid": kid})
    p = verifier().verify(token)
    assert p.sub == "alice" and p.scopes == {"a", "b"} and p.client_id == "alice"


def test_rejects_none_and_hmac_with_a_public_key(verifier):
    v = verifier()
    unsigned = jwt.encode(_claims(), None, algorithm="none", headers={"kid": "rsa"})  # type: ignore[arg-type]
    with pytest.raises(AuthError, match="algorithm"):
        v.verify(unsigned)
    # the classic confusion attack: HS256 keyed with the RSA public key's PEM
    from cryptography.hazmat.primitives import serialization

    pem = RSA.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # pyjwt refuses to sign HS256 with a PEM key, so the forgery is built by hand
    import base64
    import hashlib
    import hmac

    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "kid": "rsa"}).encode())
    body = b64(json.dumps(_claims()).encode())
    sig = b64(hmac.new(pem, head + b"." + body, hashlib.sha256).digest())
    with pytest.raises(AuthError, match="algorithm"):
        v.verify((head + b"." + body + b"." + sig).decode())
    # an "oct" key in the JWKS is never trusted
    hs = jwt.encode(_claims(), "s" * 32, algorithm="HS256", headers={"kid": "hmac"})
    with pytest.raises(AuthError, match="unknown key"):
        v.verify(hs)


def test_expired_and_missing_exp_are_rejected(verifier):
    v = verifier()
    old = jwt.encode(
        _claims(exp=int(time.time()) - 3600), ED, algorithm="EdDSA", headers={"kid": "ed"}
    )
    with pytest.raises(AuthError, match="expired"):
        v.verify(old)
    claims = _claims()
    del claims["exp"]
    with pytest.raises(AuthError, match="exp"):
        v.verify(jwt.encode(claims, ED, algorithm="EdDSA", headers={"kid": "ed"}))


def test_issuer_and_audience_are_enforced_when_configured(verifier):
    v = verifier(issuer="https://idp", audience="broker")
    good = jwt.encode(
        _claims(iss="https://idp", aud="broker"), ED, algorithm="EdDSA", headers={"kid": "ed"}
    )
    assert v.verify(good).sub == "alice"
    for claims, msg in (
        (_claims(iss="https://evil", aud="broker"), "issuer"),
        (_claims(iss="https://idp", aud="other"), "audience"),
    ):
        with pytest.raises(AuthError, match=msg):
            v.verify(jwt.encode(claims, ED, algorithm="EdDSA", headers={"kid": "ed"}))


def test_scp_array_and_client_id_claims(verifier):
    v = verifier()
    t = jwt.encode(
        _claims(scp=["accounts", "payments"], azp="tpp-1"),
        EC,
        algorithm="ES256",
        headers={"kid": "ec"},
    )
    p = v.verify(t)
    assert p.scopes == {"accounts", "payments"} and p.client_id == "tpp-1"
    t = jwt.encode(
        _claims(client_id="tpp-2", azp="x"), EC, algorithm="ES256", headers={"kid": "ec"}
    )
    assert v.verify(t).client_id == "tpp-2"
    with pytest.raises(Forbidden):
        p.require_scope("events:publish")
    p.require_scope("payments", "eventpolling")


def test_wrong_signature_is_rejected(verifier):
    other = ed25519.Ed25519PrivateKey.generate()
    t = jwt.encode(_claims(), other, algorithm="EdDSA", headers={"kid": "ed"})
    with pytest.raises(AuthError, match="signature"):
        verifier().verify(t)


def test_verified_tokens_are_cached_until_expiry(verifier):
    v = verifier()
    t = jwt.encode(_claims(exp=int(time.time()) + 5), ED, algorithm="EdDSA", headers={"kid": "ed"})
    first = v.verify(t)
    assert v.verify(t) is not first  # the cached copy, bounded by token_cache_s
    (cached,) = v._cache.values()
    assert cached.expires_at <= first.expires_at
    # keyed by the token's digest, not by a second copy of the token
    assert list(v._cache) == [hashlib.sha256(t.encode()).digest()]


def test_expired_cache_entries_are_dropped_as_the_cache_grows(verifier):
    v = verifier()
    now = time.time()
    gone = Principal("gone", frozenset(), "gone", now - 1)  # a client that left
    live = Principal("live", frozenset(), "live", now + 60)
    for i in range(700):
        v._cache[b"gone%012d" % i] = gone
    for i in range(400):
        v._cache[b"live%012d" % i] = live
    t = jwt.encode(_claims(exp=int(now) + 60), ED, algorithm="EdDSA", headers={"kid": "ed"})
    v.verify(t)  # the cache is over 1,024 entries: the expired ones go, the live ones stay
    assert len(v._cache) == 401
    assert all(p.expires_at > now for p in v._cache.values())
    # the next purge waits until the cache has doubled from what was left
    assert v._purge_at == 1024
    for i in range(2000):
        v._cache[b"more%012d" % i] = live
    v.verify(jwt.encode(_claims(exp=int(now) + 61), ED, algorithm="EdDSA", headers={"kid": "ed"}))
    assert len(v._cache) == 2402  # all live: nothing dropped, no wholesale clear
    assert v._purge_at == 2 * 2401
    # the hard cap holds between sweeps: the next one is due at 100,000 at the latest
    for i in range(60_000):
        v._cache[b"big%013d" % i] = live
    v.verify(jwt.encode(_claims(exp=int(now) + 62), ED, algorithm="EdDSA", headers={"kid": "ed"}))
    assert v._purge_at == 100_000


def test_dev_issuer_key_is_created_once_and_its_tokens_verify(tmp_path):
    a = DevIssuer.load_or_create(tmp_path)
    b = DevIssuer.load_or_create(tmp_path)
    assert a.kid == b.kid
    v = TokenVerifier.from_settings(AuthSettings(), tmp_path)
    p = v.verify(a.mint("bob", scopes=["events:publish"], client_id="c1"))
    assert p.sub == "bob" and p.scopes == {"events:publish"} and p.client_id == "c1"
    other = DevIssuer.load_or_create(tmp_path / "elsewhere")
    with pytest.raises(AuthError):
        v.verify(other.mint("bob"))


def test_jwks_without_usable_keys_is_a_config_error(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ConfigError, match="no usable"):
        TokenVerifier.from_settings(AuthSettings(jwks_file=str(path)), tmp_path)
    path.write_text("not json")
    with pytest.raises(ConfigError, match=r"auth\.jwks_file"):
        TokenVerifier.from_settings(AuthSettings(jwks_file=str(path)), tmp_path)


def test_key_file_is_created_once_and_never_seen_half_written(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from broker.keyfiles import create_once

    calls = []

    def make() -> bytes:
        calls.append(1)
        return b"K" * 4096 + str(len(calls)).encode()

    path = tmp_path / "k" / "key.pem"
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: create_once(path, make), range(16)))
    assert len(set(results)) == 1 and len(results[0]) > 4096  # one winner, read whole
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in path.parent.iterdir()] == ["key.pem"]  # no temp files left


def test_cached_principals_share_equal_scope_sets_and_strings(verifier):
    # Tens of thousands of consumers each keep a cached principal: equal parts are shared.
    v = verifier()
    principals = [
        v.verify(
            jwt.encode(
                _claims(sub=f"tpp-{i}", scope="accounts payments", client_id=f"tpp-{i}"),
                ED,
                algorithm="EdDSA",
                headers={"kid": "ed"},
            )
        )
        for i in range(3)
    ]
    assert principals[0].scopes == {"accounts", "payments"}
    assert principals[0].scopes is principals[1].scopes is principals[2].scopes
    assert all(p.client_id is p.sub for p in principals)


def test_clearing_the_cache_makes_the_next_use_verify_again(verifier, monkeypatch):
    v = verifier()
    t = jwt.encode(_claims(exp=int(time.time()) + 60), ED, algorithm="EdDSA", headers={"kid": "ed"})
    v.verify(t)
    decoded: list[str] = []
    real_decode = v._decode

    def decode(tok: str) -> Principal:
        decoded.append(tok)
        principal: Principal = real_decode(tok)
        return principal

    monkeypatch.setattr(v, "_decode", decode)
    v.verify(t)
    assert decoded == []  # cached
    v._purge_at = 4096  # as after a sweep of a big cache
    assert v.clear_cache() == 1
    assert v._cache == {}
    assert v._purge_at == 1024  # the next sweep counts from an empty cache
    assert v.verify(t).sub == _claims()["sub"]
    assert decoded == [t]  # verified again, and cached again
    assert len(v._cache) == 1
