"""Which addresses a worker may connect to: only globally routable ones, unless private URLs are allowed.

`resolve_public` resolves a host once and returns the addresses that passed the check; the pinned HTTP
transport (net/pinned_http.py) connects to exactly those, so a DNS answer that changes between the
check and the connect (rebinding) cannot reach a private address.
"""

from __future__ import annotations

import ipaddress
import socket

from varco.tasks.errors import ForbiddenURLError, ImageFetchError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 prefixes that carry an IPv4 address in their last 32 bits: NAT64 (RFC 6052 well-known, RFC 8215
# local-use) and SIIT's IPv4-translated addresses (RFC 2765).
_NAT64 = (
    ipaddress.ip_network("64:ff9b::/96"),
    ipaddress.ip_network("64:ff9b:1::/48"),
    ipaddress.ip_network("::ffff:0:0:0/96"),
)
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d form


class UnresolvableHostError(ImageFetchError):
    """DNS gave no answer for the host; transient (a resolver blip must not fail a job or drop a webhook)."""

    transient = True


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for, if it is one of the forms that carry one."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address
    if any(address in net for net in _NAT64) or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public_address(address: IPAddress) -> bool:
    """Globally routable and unicast; an IPv6 address carrying an IPv4 one must carry a public one."""
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:  # deprecated fec0::/10
        return False
    if isinstance(address, ipaddress.IPv6Address) and (inner := embedded_ipv4(address)) is not None:
        return is_public_address(inner)
    return True


def resolve_public(host: str, port: int, allow_private: bool) -> list[tuple[socket.AddressFamily, tuple]]:
    """Resolve `host` once: (family, sockaddr) pairs to connect to, every one of them checked.

    Raises ForbiddenURLError when any answer is not public (one private answer is enough to refuse: a
    name that mixes them is not trusted), UnresolvableHostError when DNS gives nothing.
    """
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableHostError(f"cannot resolve host {host!r}: {exc}") from None
    if not infos:
        raise UnresolvableHostError(f"cannot resolve host {host!r}: no addresses")
    targets = []
    for family, _, _, _, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0])  # no "%scope" since Python 3.7: that is in sockaddr[3]
        if not allow_private and not is_public_address(address):
            raise ForbiddenURLError(
                f"{host} resolves to the non-public address {address}; "
                "set VARCO_ALLOW_PRIVATE_URLS=true to allow private URLs"
            )
        targets.append((family, sockaddr))
    return targets
