"""SET signing: the broker's private key, its `kid`, the JOSE header and the JWKS document.

A SET is signed once, when it is published, and the compact JWS is what the store keeps; a
poll never signs. PS256 (RSASSA-PSS, SHA-256) is the only algorithm: OB message signing
requires it. The JWS is put together here (RFC 7515 compact form) around one call to
`cryptography` with a key object parsed once at start; the signature itself can be made in
another process (signproc.py), which only needs the signing input, or on the event loop one
signature per loop turn (LoopSigning).

Headers, by `signing.profile`:
- "ob" (default): OB message signing without `typ` (OB: absent or "JOSE"; RFC 8417's
  `secevent+jwt` would break that rule), with the three `http://openbanking.org.uk/*`
  members listed in `crit`.
- "rfc8417": `typ: secevent+jwt`, what OpenID SSF receivers require.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

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
        keys = [PublicKey(kid, private_key.public_key())]
        keys += [p for p in previous if p.kid != kid]
        self.public_keys: tuple[PublicKey, ...] = tuple(keys)
        # Built once: the document never changes while the process runs.
        self.jwks_body: bytes = jsonutil.dumps({"keys": [_jwk(p) for p in self.public_keys]})

    @classmethod
    def from_settings(cls, settings: SigningSettings, data_dir: Path) -> Signer:
        """The signer of `settings`: `key_file`, or a dev key generated once under data_dir."""
        if settings.key_file:
            key = _load_private(key_path(settings, data_dir))
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
        """The JOSE header of a SET signed now."""
        if self.profile == "rfc8417":
            return {"alg": ALGORITHM, "kid": self.kid, "typ": SECEVENT_TYP}
        # No typ: OB allows it absent or "JOSE", and RFC 8417's "secevent+jwt" would break that.
        return {
            "alg": ALGORITHM,
            "kid": self.kid,
            OB_IAT: int(time.time()) if now is None else now,
            OB_ISS: self._ob_iss,
            OB_TAN: self._ob_tan,
            "crit": list(OB_CRIT),
        }

    def signing_input(self, claims: Mapping[str, Any]) -> bytes:
        """BASE64URL(header) "." BASE64URL(claims): what the signature covers (RFC 7515 §5.1)."""
        try:
            payload = jsonutil.dumps(claims)
        except TypeError as e:
            raise SigningError(f"could not sign SET: {e}") from e
        return _b64b(jsonutil.dumps(self.header(claims.get("iat")))) + b"." + _b64b(payload)

    def sign_set(self, claims: Mapping[str, Any]) -> str:
        """The compact JWS of a SET whose claims are `claims` (already complete)."""
        data = self.signing_input(claims)
        return compact_jws(data, self.signature(data))

    def signature(self, signing_input: bytes) -> bytes:
        """The PS256 signature of a JWS signing input."""
        return sign_ps256(self._key, signing_input)


class LoopSigning:
    """PS256 signatures made on the event loop, one per loop turn, in the order asked.

    Why not all at once: a signature holds the loop ~0.25-0.35 ms (more on a slow machine),
    so a publish of 100 SETs, or a burst of single-SET publishes ready in one turn, held
    every parked poll's wake-up behind 10-30 ms of RSA work (py-spy: runs of 10 ms in
    OpenSSL in the first second of the benchmark's publishing). One signature per turn lets
    the loop read its sockets and run the wake-ups between two signatures; the signing
    itself costs the same. The same interface as signproc.SigningProcesses, which takes
    the work off the loop altogether when there are cores to spare.
    The price: SETs are signed no faster than the loop turns, so a producer sharing a busy
    loop gets fewer SETs/s. Slices of 1 ms per turn instead of one signature gave it 15%
    more (2,176-2,197 SETs/s against 1,823-1,909 beside 200 woken polls) but doubled the
    wake-ups' p50 beside its batches (11.3 ms against 5.1-5.4): a wake-up crosses several
    loop turns, and each carried up to 1 ms of signing (two paired quick runs, not saved).
    """

    def __init__(self, signer: Signer) -> None:
        self._signer = signer
        # One entry per publish waiting for signatures: its inputs and their futures; the
        # head entry is signed from position _next on.
        self._queue: collections.deque[tuple[list[bytes], list[asyncio.Future[bytes]]]] = (
            collections.deque()
        )
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scheduled = False

    async def sign(self, inputs: list[bytes]) -> list[bytes]:
        """The PS256 signatures of `inputs` (JWS signing inputs), in order."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # A new loop (the app started again): what an old one queued can never be
            # answered, and a turn it had scheduled will never run.
            self._loop, self._queue, self._next = loop, collections.deque(), 0
            self._scheduled = False
        futures = [loop.create_future() for _ in inputs]
        self._queue.append((inputs, futures))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._turn)
        if len(futures) == 1:  # most publishes: no gathering future
            return [await futures[0]]
        return list(await asyncio.gather(*futures))

    def _turn(self) -> None:
        queue, loop = self._queue, self._loop
        try:
            while queue:
                inputs, futures = queue[0]
                i = self._next
                if i >= len(inputs):
                    queue.popleft()
                    self._next = 0
                    continue
                self._next = i + 1
                if futures[i].done():  # its publish was cancelled (the producer left)
                    continue
                try:
                    signature = self._signer.signature(inputs[i])
                except Exception as e:
                    # That publish fails whole: the rest of its batch is not signed.
                    futures[i].set_exception(e)
                    for future in futures[i + 1 :]:
                        future.cancel()
                else:
                    futures[i].set_result(signature)
                break
        finally:  # whatever happened, the next turn is scheduled or the flag is cleared
            if queue is self._queue:
                if queue and loop is not None:
                    loop.call_soon(self._turn)
                else:
                    self._scheduled = False


# RSASSA-PSS with SHA-256, MGF1 with SHA-256 and a salt as long as the hash (RFC 7518 §3.5).
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def sign_ps256(key: rsa.RSAPrivateKey, data: bytes) -> bytes:
    return key.sign(data, _PSS, hashes.SHA256())


def compact_jws(signing_input: bytes, signature: bytes) -> str:
    """The JWS compact serialization: signing input "." BASE64URL(signature)."""
    return (signing_input + b"." + _b64b(signature)).decode("ascii")


def _b64b(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def key_path(settings: SigningSettings, data_dir: Path) -> Path:
    """Where the signing key is: `signing.key_file`, or the dev key under data_dir."""
    return Path(settings.key_file) if settings.key_file else data_dir / DEV_KEY_NAME


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
