"""Where a push may go: the address policy for callback URLs (a guard against SSRF).

A CallbackUrl is chosen by a TPP, and the broker POSTs to it from inside the bank's network.
Unguarded, a TPP could aim the pushes at a cloud metadata service (169.254.169.254), the
broker's own Redis, or an admin port on the LAN, and learn from the retries which answered.
So by default a callback may reach only global (public) unicast addresses:
- the host is judged as aiohttp will connect to it: yarl's form of it, which maps Unicode
  and IDNA spellings (127.0.0.1 in full-width digits, or with ideographic full stops) onto
  ASCII. urllib's own parse keeps them as they are, and would take such a loopback literal
  for a host name;
- an IP literal is refused when the subscription is written (a clear 400), and again before
  each push (it may have been written while the guard was off); so is a legacy numeric form
  ("127.1", "2130706433", "0x7f.1", "8.8.8.8."), which aiohttp refuses or resolves, an
  address with a zone id, and a host yarl cannot read;
- a host name is checked each time the push session resolves it, by the resolver that session
  connects with, so the address checked is the address connected to: no window between the
  check and the connection for a DNS answer to change in (DNS rebinding).
`push.allow_private_addresses` lifts the guard, for tests and for TPPs on a private network.
"""

from __future__ import annotations

import errno
import ipaddress
import socket

import yarl
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


# IPv6 ranges refused whatever Python's is_global says of them (its answer for some ranges
# changed between patch releases): IPv4-compatible (deprecated, leads to an IPv4 address),
# site-local (deprecated, private), and the NAT64 prefix for local use.
_V6_REFUSED = tuple(ipaddress.IPv6Network(n) for n in ("::/96", "fec0::/10", "64:ff9b:1::/48"))
# The well-known NAT64 prefix: the address it leads to is its last 32 bits. In an IPv6-only
# network with DNS64, a name whose A record is 10.0.0.5 resolves to 64:ff9b::a00:5.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def forbidden(address: _IP) -> bool:
    """True for any address that is not a global unicast one."""
    if isinstance(address, ipaddress.IPv6Address):
        # ::ffff:127.0.0.1 reaches 127.0.0.1; 6to4, Teredo and NAT64 lead to an IPv4 address:
        # judge the address they lead to (Python versions disagree on the wrappers' own
        # is_global).
        if address in _NAT64:
            return forbidden(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        inner = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if inner is not None:
            return forbidden(inner)
        if any(address in n for n in _V6_REFUSED) or address.is_site_local:
            return True
    return (
        not address.is_global
        or address.is_multicast
        or address.is_private
        or address.is_loopback
        or address.is_link_local
        or address.is_reserved
        or address.is_unspecified
    )


def connect_host(url: str) -> str:
    """The host aiohttp connects to for this URL (yarl's ASCII form of it), "" if none."""
    try:
        return yarl.URL(url).raw_host or ""
    except Exception:  # yarl raises more than ValueError on some malformed authorities
        return ""


def refusal(url: str) -> str | None:
    """Why no push may go to this URL, judged on its host alone; None for a public literal or
    a host name (a name is judged on what it resolves to, by PublicOnlyResolver)."""
    host = connect_host(url)
    if not host:
        return "no host aiohttp can read in it"
    ip = literal(host)
    if ip is not None:
        if "%" in host:  # a zone id: only link-local addresses take one
            return f"{host!r} names a network interface"
        return f"{ip} is not a public address" if forbidden(ip) else None
    if _legacy_ipv4(host) or _legacy_ipv4(host.rstrip(".")):
        return f"{host!r} is not an IP address in canonical form"
    return None


def _legacy_ipv4(host: str) -> bool:
    """A numeric form the C library reads as an IPv4 address ("127.1", "0x7f.1", "2130706433")."""
    try:
        socket.inet_aton(host)
    except (OSError, ValueError):
        return False
    return True


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
