"""The address guard against real local servers: DNS rebinding, redirects, IPv4 inside IPv6, Host and TLS name.

Loopback is the only network these tests have, so 127.0.0.2 plays a public address: `is_global` is
patched to say so, for the guard under test exactly as for anyone else. Every other loopback address
stays private. A scripted resolver stands in for DNS (names only; address literals resolve as usual).
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import trustme
from helpers import PUBLIC, ScriptedResolver, ServedFiles
from images import png

from varco.tasks.errors import ForbiddenURLError, ImageFetchError
from varco.tasks.settings import Settings
from varco.workers.input.fetch import ImageFetcher
from varco.workers.net.netguard import UnresolvableHostError, embedded_ipv4, is_public_address, resolve_public
from varco.workers.net.pinned_http import pinned_client, total_deadline

IMAGE = png(32, 24)


@pytest.fixture
def loopback() -> Iterator[ServedFiles]:
    """A private server that would hand out the image to anyone who reached it."""
    s = ServedFiles()
    s.add("/cat.png", IMAGE)
    yield s
    s.close()


@pytest.fixture
def public() -> Iterator[ServedFiles]:
    s = ServedFiles(host=PUBLIC)
    s.add("/cat.png", IMAGE)
    yield s
    s.close()


def guarded() -> ImageFetcher:
    return ImageFetcher(Settings(allow_private_urls=False, fetch_timeout_s=5))


def test_rebinding_answer_is_never_connected_to(scripted_dns: ScriptedResolver, loopback: ServedFiles) -> None:
    scripted_dns.answers["rebind.test"] = [PUBLIC, "127.0.0.1"]  # public when checked, loopback after
    with pytest.raises(ImageFetchError):
        guarded().fetch(f"http://rebind.test:{loopback.port}/cat.png")
    assert loopback.routes["/cat.png"].hits == 0
    assert scripted_dns.calls["rebind.test"] == 1  # resolved once, and that answer was used


def test_rebinding_through_a_redirect(
    scripted_dns: ScriptedResolver, loopback: ServedFiles, public: ServedFiles
) -> None:
    public.add("/hop", status=302, headers={"location": f"http://rebind.test:{loopback.port}/cat.png"})
    scripted_dns.answers["start.test"] = [PUBLIC]
    scripted_dns.answers["rebind.test"] = [PUBLIC, "127.0.0.1"]
    with pytest.raises(ImageFetchError):
        guarded().fetch(f"http://start.test:{public.port}/hop")
    assert public.routes["/hop"].hits == 1
    assert loopback.routes["/cat.png"].hits == 0


def test_redirect_to_a_private_name_is_refused(
    scripted_dns: ScriptedResolver, loopback: ServedFiles, public: ServedFiles
) -> None:
    public.add("/hop", status=302, headers={"location": f"http://inside.test:{loopback.port}/cat.png"})
    scripted_dns.answers["start.test"] = [PUBLIC]
    scripted_dns.answers["inside.test"] = ["127.0.0.1"]
    with pytest.raises(ForbiddenURLError, match=r"127\.0\.0\.1"):
        guarded().fetch(f"http://start.test:{public.port}/hop")
    assert loopback.routes["/cat.png"].hits == 0


def test_pinned_fetch_keeps_the_host_header(scripted_dns: ScriptedResolver, public: ServedFiles) -> None:
    scripted_dns.answers["images.test"] = [PUBLIC]
    got = guarded().fetch(f"http://images.test:{public.port}/cat.png")
    assert (got.width, got.height) == (32, 24)
    assert public.host_headers == [f"images.test:{public.port}"]


def test_tls_server_name_and_certificate_are_the_requested_host(scripted_dns: ScriptedResolver) -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("images.test").configure_cert(server_tls)
    names: list[str | None] = []
    server_tls.sni_callback = lambda _sock, name, _ctx: names.append(name)
    server = ServedFiles(host=PUBLIC, tls=server_tls)
    server.add("/cat.png", IMAGE)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    scripted_dns.answers["images.test"] = [PUBLIC]
    scripted_dns.answers["other.test"] = [PUBLIC]
    try:
        with pinned_client(False, httpx.Timeout(5.0), verify=client_tls) as client:
            response = client.get(f"https://images.test:{server.port}/cat.png")
            assert response.status_code == 200 and response.content == IMAGE
            assert names == ["images.test"]
            assert server.host_headers == [f"images.test:{server.port}"]
            # Same address, another name: the certificate is checked against the name asked for.
            with pytest.raises(httpx.ConnectError, match="certificate"):
                client.get(f"https://other.test:{server.port}/cat.png")
    finally:
        server.close()


@pytest.mark.parametrize(
    "host",
    [
        "[::127.0.0.1]",  # IPv4-compatible
        "[::ffff:127.0.0.1]",  # IPv4-mapped
        "[64:ff9b::7f00:1]",  # NAT64 well-known prefix
        "[64:ff9b:1::a00:1]",  # NAT64 local-use prefix, 10.0.0.1
        "[2002:7f00:1::1]",  # 6to4
        "[2002:a9fe:a9fe::1]",  # 6to4 of 169.254.169.254
        "[2001:0:4136:e378:8000:63bf:80ff:fffe]",  # Teredo
        "[::ffff:0:7f00:1]",  # SIIT IPv4-translated
        "[fec0::1]",  # deprecated site-local
    ],
)
def test_ipv4_inside_ipv6_is_checked_as_ipv4(host: str) -> None:
    with pytest.raises(ForbiddenURLError, match="non-public"):
        guarded().fetch(f"http://{host}:8080/cat.png")


@pytest.mark.parametrize("address", ["8.8.8.8", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1"])
def test_public_addresses_stay_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("address", "inner"),
    [
        ("::ffff:10.1.2.3", "10.1.2.3"),  # IPv4-mapped
        ("2002:a01:203::1", "10.1.2.3"),  # 6to4
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "127.0.0.1"),  # Teredo: the client, not the server
        ("64:ff9b::a01:203", "10.1.2.3"),  # NAT64 well-known prefix
        ("64:ff9b:1::a01:203", "10.1.2.3"),  # NAT64 local-use prefix
        ("::ffff:0:a01:203", "10.1.2.3"),  # SIIT IPv4-translated
        ("::10.1.2.3", "10.1.2.3"),  # IPv4-compatible
        ("::2", "0.0.0.2"),  # IPv4-compatible too: only :: and ::1 are not
        ("::1", None),  # loopback is IPv6's own, no IPv4 address in disguise
        ("::", None),
        ("2606:4700::1111", None),
    ],
)
def test_embedded_ipv4_finds_the_address_an_ipv6_one_stands_for(address: str, inner: str | None) -> None:
    """Teredo's own prefix is not global, so is_public_address refuses it before looking inside; the
    client address is still the one it carries, should that prefix ever count as global."""
    found = embedded_ipv4(ipaddress.IPv6Address(address))
    assert (str(found) if found else None) == inner


@pytest.mark.parametrize("address", ["::2", "::a00:1", "::1", "::"])
def test_ipv4_compatible_forms_of_private_addresses_are_not_public(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


def test_resolve_public_returns_what_to_connect_to() -> None:
    """Address literals resolve to themselves (an IPv6 one as written in a URL, in brackets), one TCP
    target per address, with the port to connect to."""
    assert resolve_public("127.0.0.1", 8080, True) == [(socket.AF_INET, ("127.0.0.1", 8080))]
    assert resolve_public("[::1]", 8080, True) == [(socket.AF_INET6, ("::1", 8080, 0, 0))]


def test_resolve_public_resolves_the_name_as_given(scripted_dns: ScriptedResolver) -> None:
    scripted_dns.answers["X1.example"] = [PUBLIC]
    assert resolve_public("X1.example", 443, False) == [(socket.AF_INET, (PUBLIC, 443))]
    assert scripted_dns.calls["X1.example"] == 1


def test_a_private_answer_is_refused_with_the_way_to_allow_it(scripted_dns: ScriptedResolver) -> None:
    """The message reaches the job's error: it names the host, the address and the setting."""
    scripted_dns.answers["inside.example"] = [PUBLIC, "10.0.0.7"]
    assert resolve_public("inside.example", 80, False) == [(socket.AF_INET, (PUBLIC, 80))]
    with pytest.raises(ForbiddenURLError) as refused:
        resolve_public("inside.example", 80, False)
    assert str(refused.value) == (
        "inside.example resolves to the non-public address 10.0.0.7; "
        "set VARCO_ALLOW_PRIVATE_URLS=true to allow private URLs"
    )
    assert resolve_public("inside.example", 80, True) == [(socket.AF_INET, ("10.0.0.7", 80))]


def test_no_dns_answer_is_transient_and_names_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_name(host: str, *args: object, **kwargs: object) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    with pytest.raises(UnresolvableHostError, match=r"cannot resolve host 'gone\.example': .*not known") as failed:
        resolve_public("gone.example", 80, False)
    assert failed.value.transient
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: [])
    with pytest.raises(UnresolvableHostError, match=r"cannot resolve host 'empty\.example': no addresses"):
        resolve_public("empty.example", 80, False)


def test_total_deadline_cuts_a_trickling_server() -> None:
    """A server that sends one byte every 0.2 s (about 12 s in all) never trips a per-read timeout; the
    total deadline cuts it."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\ncontent-length: 20\r\n\r\n" + b"x" * 20:
                if stop.is_set():
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)

    threading.Thread(target=trickle, daemon=True).start()
    try:
        with pinned_client(True, httpx.Timeout(10.0)) as client:
            started = time.monotonic()
            with pytest.raises(httpx.TimeoutException), total_deadline(1.0):
                client.get(f"http://127.0.0.1:{listener.getsockname()[1]}/")
            assert time.monotonic() - started < 3.0
    finally:
        stop.set()
        listener.close()
