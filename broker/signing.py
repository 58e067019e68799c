"""SET signing: the broker's private key, its `kid`, the JOSE header and the JWKS document.

A SET is signed once, when it is published, and the compact JWS is what the store keeps; a
poll never signs. PS256 (RSASSA-PSS, SHA-256) is the only algorithm: OB message signing
requires it. The key object is parsed once at start: pyjwt re-parses PEM text on every call,
about 100 times slower than signing with a loaded key.

Headers, by `signing.profile`:
- "ob" (default): OB message signing without `typ` (OB: absent or "JOSE"; RFC 8417's
  `secevent+jwt` would break that rule), with the three `http://openbanking.org.uk/*`
  members listed in `crit`.
- "rfc8417": `typ: secevent+jwt`, what OpenID SSF receivers require.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import multiprocessing
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker import jsonutil
from broker.config import SigningSettings
from broker.errors import SigningError
from broker.keyfiles import create_once, pem_of

ALGORITHM = "PS256"
DEV_KEY_NAME = "set-signing.pem"
OB_IAT = "http://openbanking.org.uk/iat"
OB_ISS = "http://openbanking.org.uk/iss"
OB_TAN = "http://openbanking.org.uk/tan"
OB_CRIT = (OB_IAT, OB_ISS, OB_TAN)
SECEVENT_TYP = "secevent+jwt"
# OB and FAPI require RSA keys of at least 2048 bits.
MIN_RSA_BITS = 2048


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A key published in the JWKS: the current one, or a previous one during a rotation."""

    kid: str
    key: rsa.RSAPublicKey


class Signer:
    """Signs SETs with one loaded RSA key and serves the JWKS of the current and previous keys."""

    def __init__(
        self,
        private_key: rsa.RSAPrivateKey,
        *,
        kid: str,
        profile: str = "ob",
        ob_iss: str = "",
        ob_tan: str = "",
        previous: Sequence[PublicKey] = (),
        jwks_max_age_s: int = 300,
    ) -> None:
        if private_key.key_size < MIN_RSA_BITS:
            raise SigningError(
                f"SET signing key is RSA-{private_key.key_size}; at least {MIN_RSA_BITS} bits"
            )
        if profile not in ("ob", "rfc8417"):
            raise SigningError(f"unknown signing profile {profile!r}")
        self.kid = kid
        self.profile = profile
        self.jwks_max_age_s = jwks_max_age_s
        self._key = private_key
        self._ob_iss = ob_iss
        self._ob_tan = ob_tan
        self._jws = jwt.PyJWS()
        keys = [PublicKey(kid, private_key.public_key())]
        keys += [p for p in previous if p.kid != kid]
        self.public_keys: tuple[PublicKey, ...] = tuple(keys)
        # Built once: the document never changes while the process runs.
        self.jwks_body: bytes = jsonutil.dumps({"keys": [_jwk(p) for p in self.public_keys]})

    @classmethod
    def from_settings(cls, settings: SigningSettings, data_dir: Path) -> Signer:
        """The signer of `settings`: `key_file`, or a dev key generated once under data_dir."""
        if settings.key_file:
            key = _load_private(Path(settings.key_file))
        else:
            key = load_or_create_dev_key(data_dir)
        previous = []
        kids = settings.previous_kids
        if kids and len(kids) != len(settings.previous_key_files):
            raise SigningError(
                "signing.previous_kids must name one kid per signing.previous_key_files entry"
            )
        for i, path in enumerate(settings.previous_key_files):
            public = _load_public(Path(path))
            previous.append(PublicKey(kids[i] if kids else thumbprint(public), public))
        return cls(
            key,
            kid=settings.kid or thumbprint(key.public_key()),
            profile=settings.profile,
            ob_iss=settings.ob_iss,
            ob_tan=settings.ob_tan,
            previous=previous,
            jwks_max_age_s=settings.jwks_max_age_s,
        )

    def header(self, now: int | None = None) -> dict[str, Any]:
        """The JOSE header of a SET signed now (pyjwt adds `alg`)."""
        if self.profile == "rfc8417":
            return {"kid": self.kid, "typ": SECEVENT_TYP}
        return {
            "kid": self.kid,
            # typ None: pyjwt would otherwise add "typ": "JWT", which OB forbids.
            "typ": None,
            OB_IAT: int(time.time()) if now is None else now,
            OB_ISS: self._ob_iss,
            OB_TAN: self._ob_tan,
            "crit": list(OB_CRIT),
        }

    def sign_set(self, claims: Mapping[str, Any]) -> str:
        """The compact JWS of a SET whose claims are `claims` (already complete)."""
        try:
            return self._jws.encode(
                jsonutil.dumps(claims),
                self._key,
                algorithm=ALGORITHM,
                headers=self.header(claims.get("iat")),
            )
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise SigningError(f"could not sign SET: {e}") from e


def thumbprint(key: rsa.RSAPublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of an RSA public key."""
    jwk = _rsa_members(key)
    canonical = jsonutil.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]})
    return _b64(hashlib.sha256(canonical).digest())


def load_or_create_dev_key(data_dir: Path) -> rsa.RSAPrivateKey:
    """The development signing key: RSA-2048, generated once under data_dir (mode 0600)."""
    path = data_dir / DEV_KEY_NAME
    create_once(
        path, lambda: pem_of(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    )
    return _load_private(path)


def _load_private(path: Path) -> rsa.RSAPrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SigningError(f"signing key '{path}' cannot be loaded: {e}") from e
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SigningError(f"signing key '{path}' is not an RSA key (PS256 needs RSA)")
    return key


def _load_public(path: Path) -> rsa.RSAPublicKey:
    """A previous key's public part, from a public or a private PEM file."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SigningError(f"previous signing key '{path}' cannot be read: {e}") from e
    if b"PRIVATE KEY" in data:
        return _load_private(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SigningError(f"previous signing key '{path}' cannot be loaded: {e}") from e
    if not isinstance(key, rsa.RSAPublicKey):
        raise SigningError(f"previous signing key '{path}' is not an RSA key")
    return key


def _rsa_members(key: rsa.RSAPublicKey) -> dict[str, str]:
    numbers = key.public_numbers()
    return {"n": _b64(_int_bytes(numbers.n)), "e": _b64(_int_bytes(numbers.e))}


def _jwk(p: PublicKey) -> dict[str, str]:
    # Public members only, by construction: the private numbers are never read here.
    return {"kty": "RSA", "kid": p.kid, "use": "sig", "alg": ALGORITHM, **_rsa_members(p.key)}


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8 or 1, "big")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class SigningPool:
    """Signs SETs in worker processes, off the event loop.

    Inline signing blocks the loop ~250-350 µs per PS256 SET; at 500 SETs/s that is a
    quarter of its busy time, paid by every parked poll's wake-up. Threads do not help
    although `cryptography` releases the GIL while it signs (two threads sign 1.85x as fast
    as one): the signing thread needs the GIL back for every SET while the loop is busy,
    and on a 2-core machine shared with Redis and the load a thread made wake-ups several
    times slower (p50 2.1 -> 9.7 ms; 3.7 ms with a 0.3 ms switch interval) at higher CPU.
    Worker processes were slower than inline there too (p50 1.7 -> 4.2 ms: pickling, and the
    worker competing for the cores), hence opt-in, for hosts with cores to spare. Each worker
    loads the same key (the parent created it first, so the dev key is shared).
    """

    def __init__(self, settings: SigningSettings, data_dir: Path, processes: int) -> None:
        self._pool = ProcessPoolExecutor(
            max_workers=processes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(settings, str(data_dir)),
        )

    async def sign(self, claims: Sequence[Mapping[str, Any]]) -> list[str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _sign_in_worker, list(claims))

    def warm_up(self) -> None:
        """Start the workers now (imports take ~1 s), not on the first publish."""
        self._pool.submit(_sign_in_worker, []).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


_worker_signer: Signer | None = None


def _init_worker(settings: SigningSettings, data_dir: str) -> None:
    global _worker_signer
    _worker_signer = Signer.from_settings(settings, Path(data_dir))


def _sign_in_worker(claims: list[Mapping[str, Any]]) -> list[str]:
    assert _worker_signer is not None, "worker initializer did not run"
    return [_worker_signer.sign_set(c) for c in claims]
