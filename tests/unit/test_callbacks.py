"""The callback address guard (broker/callbacks.py): which addresses a push may reach."""

from __future__ import annotations

import socket

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from broker import callbacks


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("93.184.215.14", False),
        ("2606:2800:21f:cb07:6820:80da:af6b:8b2c", False),
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),  # cloud metadata
        ("100.64.0.1", True),  # carrier-grade NAT
        ("0.0.0.0", True),
        ("224.0.0.251", True),  # multicast
        ("255.255.255.255", True),
        ("::1", True),
        ("::", True),
        ("fe80::1%eth0", True),  # link-local, with a zone id
        ("fd00::1", True),  # unique local
        ("::ffff:127.0.0.1", True),  # IPv4-mapped loopback
        ("::ffff:93.184.215.14", False),  # judged by the IPv4 address it leads to
        ("2002:7f00:1::", True),  # 6to4 wrapping 127.0.0.1
        ("2002:5db8:d70e::", False),  # 6to4 wrapping 93.184.215.14
        ("64:ff9b::a00:5", True),  # NAT64 (DNS64's answer for 10.0.0.5)
        ("64:ff9b::a9fe:a9fe", True),  # NAT64 to the metadata service
        ("64:ff9b::5db8:d70e", False),  # NAT64 to a public address
        ("64:ff9b:1::5db8:d70e", True),  # the local-use NAT64 prefix
        ("::7f00:1", True),  # IPv4-compatible (deprecated)
        ("fec0::1", True),  # site-local (deprecated)
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", True),  # Teredo to 127.0.0.1
    ],
)
def test_forbidden(host: str, refused: bool) -> None:
    ip = callbacks.literal(host)
    assert ip is not None
    assert callbacks.forbidden(ip) is refused


@pytest.mark.parametrize("host", ["tpp.example", "localhost", "", "127.1", "0x7f000001"])
def test_names_and_legacy_forms_are_not_literals(host: str) -> None:
    assert callbacks.literal(host) is None


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("https://tpp.example/v3.1/event-notifications", None),  # a name: judged when resolved
        ("https://93.184.215.14/v3.1/event-notifications", None),
        ("https://127.0.0.1/v3.1/event-notifications", "127.0.0.1 is not a public address"),
        # Spellings yarl (and so aiohttp) maps onto 127.0.0.1 and 169.254.169.254, which
        # urllib leaves as they are: full-width digits, ideographic full stops.
        ("https://\uff11\uff12\uff17.\uff10.\uff10.\uff11/x", "127.0.0.1 is not a public"),
        ("https://127\u30020\u30020\u30021/x", "127.0.0.1 is not a public"),
        (
            "https://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14/x",
            "169.254.169.254 is not a public",
        ),
        ("https://[::ffff:7f00:1]/x", "::ffff:7f00:1 is not a public address"),
        # Legacy numeric forms the C library reads as 127.0.0.1
        ("https://127.1/x", "not an IP address in canonical form"),
        ("https://2130706433/x", "not an IP address in canonical form"),
        ("https://0x7f.1/x", "not an IP address in canonical form"),
        ("https://8.8.8.8./x", "not an IP address in canonical form"),
        ("https://[2606:2800:21f:cb07:6820:80da:af6b:8b2c%25eth0]/x", "names a network interface"),
        ("https://x[1]@/v3.1/event-notifications", "no host aiohttp can read"),
    ],
)
def test_a_callback_is_judged_on_the_host_aiohttp_connects_to(url: str, refused: str | None):
    reason = callbacks.refusal(url)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


class _Fixed(AbstractResolver):
    def __init__(self, *hosts: str) -> None:
        self.hosts = hosts
        self.closed = False

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=h, port=port, family=family, proto=0, flags=0)
            for h in self.hosts
        ]

    async def close(self) -> None:
        self.closed = True


async def test_the_resolver_keeps_only_public_addresses() -> None:
    inner = _Fixed("10.0.0.5", "93.184.215.14", "::1")
    found = await callbacks.PublicOnlyResolver(inner).resolve("tpp.example", 443)
    assert [r["host"] for r in found] == ["93.184.215.14"]


async def test_the_resolver_refuses_a_name_with_only_private_addresses() -> None:
    resolver = callbacks.PublicOnlyResolver(_Fixed("169.254.169.254", "fd00::1"))
    with pytest.raises(callbacks.ForbiddenAddress, match=r"169\.254\.169\.254"):
        await resolver.resolve("metadata.example", 80)


async def test_the_resolver_closes_the_one_it_wraps() -> None:
    inner = _Fixed("93.184.215.14")
    await callbacks.PublicOnlyResolver(inner).close()
    assert inner.closed
