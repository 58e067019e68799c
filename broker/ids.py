"""Random identifiers on hot paths (SET jtis, FAPI interaction ids, publish records)."""

from __future__ import annotations

import os

_VARIANT = "89ab"
# Random bytes fetched per system call: 256 identifiers' worth. os.urandom is one getrandom
# call each time, and an OB poll without an x-fapi-interaction-id makes an id on every answer.
_CHUNK = 4096
_pool: list[bytes] = []


def _random16() -> bytes:
    """16 bytes from the OS's CSPRNG, fetched in chunks; each handed out once.

    list.pop and list.extend are atomic under the GIL, so threads never share a piece; two
    that refill at once each add fresh bytes of their own.
    """
    try:
        return _pool.pop()
    except IndexError:
        data = os.urandom(_CHUNK)
        fresh = [data[i : i + 16] for i in range(0, _CHUNK, 16)]
        mine = fresh.pop()
        _pool.extend(fresh)
        return mine


# A forked child must not hand out the ids its parent still holds.
os.register_at_fork(after_in_child=_pool.clear)


def clear_pool() -> int:
    """Drop the unused pieces (the next id fetches a fresh chunk); returns how many.

    For after a mass disconnect (broker/heapcare.py): a refill made while the heap was full
    put its 255 small pieces in whatever holes the heap had, and each one left pins a page.
    """
    dropped = len(_pool)
    _pool.clear()
    return dropped


def token_hex() -> str:
    """128 random bits as 32 hex digits, from the same pool (no system call per id).

    For the record of every publish without an Idempotency-Key: secrets.token_hex made one
    getrandom call per Oxlin publish.
    """
    return _random16().hex()


def uuid4() -> str:
    """A random (version 4) UUID as text: what str(uuid.uuid4()) gives, in half the time.

    It is made on every OB poll without an x-fapi-interaction-id and for every SET, and the
    uuid module builds an int and a UUID object first.
    """
    h = _random16().hex()
    # Version nibble 4; variant bits 10xx (RFC 9562 §4.1, §5.4).
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[int(h[16], 16) & 3]}{h[17:20]}-{h[20:]}"
