"""A loopback TCP forwarder that tests (and chaos benches) can cut and restore: a network outage on demand.

    with TcpProxy("127.0.0.1", s3_port) as proxy:   # clients connect to proxy.port instead
        proxy.cut()        # open connections are reset; new ones are reset at once ("refuse")
        proxy.cut("drop")  # or: new connections are accepted and then hang, unanswered (a black hole)
        proxy.restore()    # forwarding again

One thread accepts; each forwarded connection has two pump threads. Nothing here is used in production.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import threading
from typing import Literal

log = logging.getLogger(__name__)

CutMode = Literal["refuse", "drop"]


def _reset(sock: socket.socket) -> None:
    """End a connection now: shut it down (which also wakes a pump thread blocked reading it), then close it
    with zero linger, so what the peer has not read yet is answered with an RST, as when a server vanishes."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        sock.close()


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1", listen_port: int = 0):
        self.target = (target_host, target_port)
        self._listener = socket.create_server((listen_host, listen_port), reuse_port=False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()  # every socket of a live forwarded or held connection
        self._cut: CutMode | None = None
        self._closed = False
        self.accepted = 0  # connections accepted in all (a test can tell its clients did connect)
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """`http://host:port`, for HTTP services such as an S3 server."""
        return f"http://{self.address}"

    def start(self) -> TcpProxy:
        self._thread.start()
        return self

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    @property
    def is_cut(self) -> bool:
        return self._cut is not None

    def cut(self, mode: CutMode = "refuse") -> None:
        """Start an outage: every open connection is reset; new ones are reset ("refuse") or left hanging
        ("drop") until `restore()`."""
        with self._lock:
            self._cut = mode
            doomed = list(self._open)
            self._open.clear()
        for sock in doomed:
            _reset(sock)

    def restore(self) -> None:
        """End the outage: connections held by a "drop" cut are reset, new ones are forwarded again."""
        with self._lock:
            self._cut = None
            held = list(self._open)
            self._open.clear()
        for sock in held:
            _reset(sock)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()
        self.cut()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            self.accepted += 1
            with self._lock:
                mode = self._cut
                if mode == "drop":
                    self._open.add(client)  # accepted, never answered
                    continue
            if mode == "refuse":
                _reset(client)
                continue
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            _reset(client)
            return
        with self._lock:
            if self._cut is not None:  # cut while connecting
                _reset(client)
                _reset(upstream)
                return
            self._open.update((client, upstream))
        pumps_left = [2]
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst, client, upstream, pumps_left), daemon=True).start()

    def _pump(
        self, src: socket.socket, dst: socket.socket, client: socket.socket, upstream: socket.socket, left: list[int]
    ) -> None:
        try:
            while chunk := src.recv(65536):
                dst.sendall(chunk)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        except OSError:  # reset by a cut or by either end: end the other direction too
            _reset(client)
            _reset(upstream)
        with self._lock:
            left[0] -= 1
            finished = left[0] == 0
            if finished:
                self._open.discard(client)
                self._open.discard(upstream)
        if finished:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()
