"""Bearer-token authentication: JWT verification against a JWKS file or the dev issuer.

Accepted algorithms follow the key type (RSA: RS256/PS256, EC P-256: ES256, Ed25519: EdDSA),
or the key's own `alg` when the JWK names one; `none` and HMAC are never accepted, so a public
key can never be used as an HMAC secret. `exp` is required; `iss` and `aud` are checked when
configured. Verified tokens are cached for a short while, keyed by the raw token, so a client
that polls in a loop does not pay for a signature check on every request.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.config import AuthSettings
from broker.errors import AuthError, ConfigError, Forbidden, MissingToken
from broker.keyfiles import create_once, pem_of

DEV_ISSUER = "urn:broker:dev-issuer"
DEV_KEY_NAME = "dev-issuer.pem"
PUBLISH_SCOPE = "events:publish"
_ALGS_BY_KTY = {"RSA": ("RS256", "PS256"), "EC": ("ES256",), "OKP": ("EdDSA",)}
_CACHE_MAX = 100_000
_PURGE_MIN = 1024


@dataclass(frozen=True, slots=True)
class Principal:
    """Who made the request, from a verified token."""

    sub: str
    scopes: frozenset[str]
    client_id: str  # client_id, else azp, else sub (the OB TPP)
    expires_at: float

    def require_scope(self, *accepted: str) -> None:
        """Raise Forbidden unless the token carries one of `accepted`."""
        if not self.scopes.intersection(accepted):
            raise Forbidden(
                f"token lacks the required scope: one of {' '.join(accepted)}",
                code="insufficient_scope",
            )


@dataclass(frozen=True, slots=True)
class _Key:
    key: Any
    algorithms: tuple[str, ...]


class TokenVerifier:
    def __init__(self, keys: dict[str | None, _Key], settings: AuthSettings) -> None:
        if not keys:
            raise ConfigError("Config 'auth.jwks_file' holds no usable signing key.")
        self._keys = keys
        self._settings = settings
        # Keyed by the SHA-256 digest of the token, not the token: a parked poll's token is
        # already held by its request, and tens of thousands of second copies add up.
        # SHA-256 rather than BLAKE2b: OpenSSL's uses the CPU's SHA instructions, and this runs
        # on every request (timeit, 300-900 character tokens: 660-1122 ns against 861-1786).
        self._cache: dict[bytes, Principal] = {}
        # Expired entries (clients gone, tokens rotated) are dropped when the cache has grown
        # to this size, which then doubles from what is left: memory stays within twice the
        # live entries, at amortised O(1) per insert.
        self._purge_at = _PURGE_MIN

    @classmethod
    def from_settings(cls, settings: AuthSettings, data_dir: Path) -> TokenVerifier:
        if settings.jwks_file:
            return cls(_load_jwks(Path(settings.jwks_file)), settings)
        issuer = DevIssuer.load_or_create(data_dir)
        return cls({issuer.kid: _Key(issuer.private_key.public_key(), ("EdDSA",))}, settings)

    def verify(self, token: str) -> Principal:
        """Return the token's principal, or raise AuthError saying what is wrong."""
        now = time.time()
        key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(key)
        if cached is not None and cached.expires_at > now:
            return cached
        principal = self._decode(token)
        cache_until = min(principal.expires_at, now + self._settings.token_cache_s)
        if self._settings.token_cache_s > 0:
            if len(self._cache) >= self._purge_at:
                self._purge(now)
            self._cache[key] = Principal(
                principal.sub, principal.scopes, principal.client_id, cache_until
            )
        return principal

    def clear_cache(self) -> int:
        """Forget every cached principal (tokens are verified again on their next use).

        For after a mass disconnect (gcstats.GcPolicy): the cache was filled while the clients
        connected, one small principal and key at a time between their connections' objects,
        and those survivors pin the C heap's pages once everything around them is freed
        (broker-only benchmark runs on a saturated machine: +75 to +82 MiB of a +137 to +182
        MiB peak kept after 10,000 clients vanished; +20 of +140 MiB with the cache cleared
        first, one run).
        Returns how many entries were dropped.
        """
        dropped = len(self._cache)
        self._cache = {}
        self._purge_at = _PURGE_MIN
        return dropped

    def _purge(self, now: float) -> None:
        """Drop expired entries; clear all if live ones alone reach the hard cap.

        Without it, entries of clients that left or rotated their tokens stayed until the
        cache reached its cap and was cleared whole, and then every live client's token was
        verified again at once.
        """
        cache = self._cache
        for key in [k for k, p in cache.items() if p.expires_at <= now]:
            del cache[key]
        if len(cache) >= _CACHE_MAX:
            cache.clear()  # only when over 100,000 tokens are live: bounded above all
        # A fresh dict: a dict's table never shrinks when entries are deleted.
        self._cache = dict(cache)
        # Never past the cap: the cache stays within _CACHE_MAX between sweeps too.
        self._purge_at = min(max(_PURGE_MIN, 2 * len(self._cache)), _CACHE_MAX)

    def _decode(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("bearer token is not a JWT") from None
        kid = header.get("kid")
        entry = self._keys.get(kid)
        if entry is None and len(self._keys) == 1 and kid is None:
            entry = next(iter(self._keys.values()))
        if entry is None:
            raise AuthError("bearer token is signed by an unknown key")
        if header.get("alg") not in entry.algorithms:
            raise AuthError(f"bearer token algorithm {header.get('alg')!r} is not accepted")
        s = self._settings
        try:
            claims = jwt.decode(
                token,
                entry.key,
                algorithms=list(entry.algorithms),
                audience=s.audience or None,
                issuer=s.issuer or None,
                leeway=s.leeway_s,
                options={"require": ["exp", "sub"], "verify_aud": bool(s.audience)},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("bearer token has expired") from None
        except jwt.InvalidAudienceError:
            raise AuthError("bearer token is not for this audience") from None
        except jwt.InvalidIssuerError:
            raise AuthError("bearer token is from an untrusted issuer") from None
        except jwt.MissingRequiredClaimError as e:
            raise AuthError(f"bearer token lacks the {e.claim!r} claim") from None
        except jwt.PyJWTError:
            raise AuthError("bearer token signature or claims are invalid") from None
        return _principal(claims)


def _principal(claims: dict[str, Any]) -> Principal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise AuthError("bearer token 'sub' must be a non-empty string")
    scope = claims.get("scope")
    scp = claims.get("scp")
    scopes: frozenset[str]
    if isinstance(scope, str):
        scopes = frozenset(scope.split())
    elif isinstance(scp, list) and all(isinstance(x, str) for x in scp):
        scopes = frozenset(scp)
    elif isinstance(scp, str):
        scopes = frozenset(scp.split())
    else:
        scopes = frozenset()
    client_id = claims.get("client_id") or claims.get("azp") or sub
    if not isinstance(client_id, str):
        raise AuthError("bearer token 'client_id' must be a string")
    if client_id == sub:
        client_id = sub  # one string, not two equal ones, in every cached principal
    # Tokens carry a handful of distinct scope sets: share them (a frozenset is 200+ bytes,
    # and a cached principal lives as long as its consumer keeps polling).
    shared = _SCOPE_SETS.get(scopes)
    if shared is not None:
        scopes = shared
    elif len(_SCOPE_SETS) < 1024:  # bounded: scopes come from tokens
        _SCOPE_SETS[scopes] = scopes
    return Principal(sub=sub, scopes=scopes, client_id=client_id, expires_at=float(claims["exp"]))


_SCOPE_SETS: dict[frozenset[str], frozenset[str]] = {}


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise MissingToken("missing bearer token (Authorization: Bearer <token>)")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("Authorization header must be 'Bearer <token>'")
    return token.strip()


def _load_jwks(path: Path) -> dict[str | None, _Key]:
    try:
        doc = json.loads(path.read_text("utf-8"))
        jwks = doc["keys"] if isinstance(doc, dict) and "keys" in doc else [doc]
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError(f"Config 'auth.jwks_file' has value '{path}': not a JWKS ({e}).") from e
    keys: dict[str | None, _Key] = {}
    for jwk in jwks:
        if not isinstance(jwk, dict):
            continue
        kty = jwk.get("kty")
        if kty not in _ALGS_BY_KTY or jwk.get("use", "sig") != "sig":
            continue  # "oct" (HMAC) keys and encryption keys are never trusted for tokens
        algs = _ALGS_BY_KTY[kty]
        if "alg" in jwk:
            if jwk["alg"] not in algs:
                continue
            algs = (jwk["alg"],)
        try:
            key = jwt.PyJWK.from_dict(jwk, algorithm=algs[0]).key
        except jwt.PyJWTError as e:
            raise ConfigError(
                f"Config 'auth.jwks_file' has a bad key {jwk.get('kid')!r}: {e}"
            ) from e
        if _is_private(key):
            key = key.public_key()
        keys[jwk.get("kid")] = _Key(key, algs)
    return keys


def _is_private(key: Any) -> bool:
    return isinstance(
        key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)
    )


class DevIssuer:
    """The development token issuer: an Ed25519 key generated once under the data dir."""

    def __init__(self, private_key: ed25519.Ed25519PrivateKey) -> None:
        self.private_key = private_key
        jwk = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(private_key.public_key()))
        self.kid = (
            "dev-"
            + jwt.utils.base64url_encode(
                _thumbprint({"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]})
            ).decode()[:16]
        )

    @classmethod
    def load_or_create(cls, data_dir: Path) -> DevIssuer:
        path = data_dir / DEV_KEY_NAME
        data = create_once(path, lambda: pem_of(ed25519.Ed25519PrivateKey.generate()))
        key = serialization.load_pem_private_key(data, password=None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"Dev issuer key '{path}' is not an Ed25519 key; delete it.")
        return cls(key)

    def mint(
        self,
        sub: str,
        *,
        scopes: list[str] | None = None,
        client_id: str | None = None,
        ttl_s: int = 3600,
        issuer: str = DEV_ISSUER,
        audience: str = "",
        extra: dict[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer,
            "sub": sub,
            "iat": now,
            "exp": now + ttl_s,
            "jti": str(uuid.uuid4()),
        }
        if scopes:
            claims["scope"] = " ".join(scopes)
        if client_id:
            claims["client_id"] = client_id
        if audience:
            claims["aud"] = audience
        claims.update(extra or {})
        return jwt.encode(claims, self.private_key, algorithm="EdDSA", headers={"kid": self.kid})


def _thumbprint(members: dict[str, str]) -> bytes:
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(canonical).digest()
