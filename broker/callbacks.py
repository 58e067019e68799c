"""Where a push may go: the address policy for callback URLs (a guard against SSRF).

A CallbackUrl is chosen by a TPP, and the broker POSTs to it from inside the bank's network.
Unguarded, a TPP could aim the pushes at a cloud metadata service (169.254.169.254), the
broker's own Redis, or an admin port on the LAN, and learn from the retries which answered.
So by default a callback may reach only global (public) unicast addresses:
- an IP literal is refused when the subscription is written (a clear 400), and again before
  each push (it may have been written while the guard was off);
- a host name is checked each time the push session resolves it, by the resolver that session
  connects with, so the address checked is the address connected to: no window between the
  check and the connection for a DNS answer to change in (DNS rebinding).
`push.allow_private_addresses` lifts the guard, for tests and for TPPs on a private network.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


class ForbiddenAddress(OSError):
    """A callback host that resolves only to addresses the guard refuses."""


def literal(host: str) -> _IP | None:
    """The address a host names if it is an IP literal ("::1", "10.0.0.1"), else None."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])  # an IPv6 zone id aside
    except ValueError:
        return None


def forbidden(address: _IP) -> bool:
    """True for any address that is not a global unicast one."""
    if isinstance(address, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1 reaches 127.0.0.1, and 6to4 / Teredo tunnel to an IPv4 address:
        # judge the address they lead to (Python versions disagree on the wrappers' own
        # is_global).
        inner = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if inner is not None:
            return forbidden(inner)
    return not address.is_global or address.is_multicast


class PublicOnlyResolver(AbstractResolver):
    """Resolves as the default resolver does, keeping only the addresses the guard allows."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner if inner is not None else DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        allowed = [r for r in found if (ip := literal(r["host"])) is not None and not forbidden(ip)]
        if not allowed:
            raise ForbiddenAddress(
                errno.EACCES,
                f"{host} resolves only to non-public addresses"
                f" ({', '.join(sorted({r['host'] for r in found}))});"
                " callbacks may reach public addresses only (push.allow_private_addresses)",
            )
        return allowed

    async def close(self) -> None:
        await self._inner.close()
