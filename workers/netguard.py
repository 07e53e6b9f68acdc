"""Refuse URLs that resolve to loopback, private, link-local or other non-public addresses."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from varco.tasks.errors import ForbiddenURLError, ImageFetchError


def check_public_url(url: str, allow_private: bool) -> None:
    """Raise ForbiddenURLError unless every address the host resolves to is public (or private is allowed).

    Checked on every redirect hop. The address is resolved again when connecting, so a DNS answer
    that changes in between (rebinding) is not covered; run workers behind an egress policy too.
    """
    if allow_private:
        return
    host = urlsplit(url).hostname or ""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise ImageFetchError(f"cannot resolve host {host!r}: {exc}", transient=True) from None
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if not address.is_global or address.is_multicast:
            raise ForbiddenURLError(
                f"{host} resolves to the non-public address {address}; "
                "set VARCO_ALLOW_PRIVATE_URLS=true to allow private URLs"
            )
