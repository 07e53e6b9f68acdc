"""An httpx client that connects only to the address it checked, within a total deadline.

httpx resolves a host itself when it connects, so a check made before the request can be undone by a
DNS answer that changes in between (rebinding). Here the connection pool's network backend resolves
once (net/netguard.py), refuses non-public answers, and connects to the checked address itself.
The request's URL is unchanged, so the Host header and the TLS server name (SNI and the certificate
check) stay the requested host's.

httpx's timeouts apply to each read or write, so a peer that trickles a byte at a time never times
out; `total_deadline` bounds everything a request does on the network (connect, TLS, headers, body).
"""

from __future__ import annotations

import contextlib
import ssl
import time
import typing
from collections.abc import Iterator
from contextvars import ContextVar

import httpcore
import httpx

from varco.workers.net.netguard import resolve_public

_deadline: ContextVar[float | None] = ContextVar("varco_http_deadline", default=None)


@contextlib.contextmanager
def total_deadline(seconds: float) -> Iterator[None]:
    """Every network operation of this thread's requests inside the block ends `seconds` from now."""
    token = _deadline.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def _bounded(timeout: float | None, error: type[Exception]) -> float | None:
    """`timeout` shortened to what is left of the deadline; raises `error` once it has passed."""
    deadline = _deadline.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise error("total deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket stream whose every operation also respects the caller's total deadline."""

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        tls = self._inner.start_tls(ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout))
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> typing.Any:
        return self._inner.get_extra_info(info)


class PinnedBackend(httpcore.NetworkBackend):
    """Resolves once, checks every answer, connects to a checked address (never resolving again)."""

    def __init__(self, allow_private: bool) -> None:
        self.allow_private = allow_private
        self._tcp = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        targets = resolve_public(host, port, self.allow_private)  # ForbiddenURLError passes through untouched
        last: Exception | None = None
        for _, sockaddr in targets:
            try:
                # An address literal: connecting to it resolves nothing again.
                stream = self._tcp.connect_tcp(
                    sockaddr[0], port, _bounded(timeout, httpcore.ConnectTimeout), local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
                continue
            return _DeadlineStream(stream)
        assert last is not None  # resolve_public returns at least one address
        raise last

    def connect_unix_socket(self, *args: typing.Any, **kwargs: typing.Any) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not used by this client")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class PinnedTransport(httpx.HTTPTransport):
    """httpx's transport with the pinned backend under its connection pool (no proxies: they would
    resolve the name themselves)."""

    def __init__(self, allow_private: bool, verify: ssl.SSLContext | bool = True) -> None:
        super().__init__(verify=verify, trust_env=False)
        # httpx.HTTPTransport takes no network backend, so its pool is replaced by one with ours (same
        # TLS settings and httpx's default limits); the rest of the transport is httpx's own.
        self._pool.close()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(verify=verify, trust_env=False),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=PinnedBackend(allow_private),
        )


def pinned_client(
    allow_private: bool, timeout: httpx.Timeout, *, verify: ssl.SSLContext | bool = True, **kwargs: typing.Any
) -> httpx.Client:
    """An httpx.Client whose connections go only to checked addresses (redirects not followed)."""
    return httpx.Client(
        transport=PinnedTransport(allow_private, verify=verify), timeout=timeout, follow_redirects=False,
        trust_env=False, **kwargs,
    )  # fmt: skip
