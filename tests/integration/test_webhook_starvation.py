"""A receiver that trickles its answer cannot starve the others: a real worker's callback process,
a trickling receiver and a healthy one, both on loopback."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from helpers import WebhookReceiver

from varco.producer import Client
from varco.workers.output.webhooks import send_event

TIMEOUT_S = 3.0  # VARCO_CALLBACK_TIMEOUT_S in worker_env
HOST_CAP = 2  # VARCO_CALLBACK_HOST_CONCURRENCY's default


class TricklingReceiver:
    """Reads a request, then answers one header byte every 0.5 s for as long as the client stays:
    each read gets a byte well within any per-read timeout, so only a total deadline ends it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.lock = threading.Lock()
        self.active = 0
        self.most_active = 0
        self.held_s: list[float] = []  # how long each connection was held, accept to client close
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/slow"

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        started = time.monotonic()
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        try:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\n" + b"x-wait: " + b"z" * 100_000:
                if self.stopped.is_set():
                    return
                conn.sendall(bytes([byte]))
                time.sleep(0.5)
        except OSError:  # the client gave up: that is what we measure
            pass
        finally:
            conn.close()
            with self.lock:
                self.active -= 1
                self.held_s.append(time.monotonic() - started)

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


@pytest.fixture
def trickling() -> Iterator[TricklingReceiver]:
    receiver = TricklingReceiver()
    yield receiver
    receiver.close()


def event(job_id: str) -> dict:
    return {"type": "job.succeeded", "job_id": job_id, "state": "succeeded"}


def test_a_trickling_receiver_delays_only_its_own_webhooks(
    client: Client, receiver: WebhookReceiver, trickling: TricklingReceiver
) -> None:
    for _ in range(12):  # more than the callback process has threads
        send_event(client.app, trickling.url, event(uuid.uuid4().hex))
    path = f"/healthy-{uuid.uuid4().hex}"
    healthy = {uuid.uuid4().hex for _ in range(6)}
    for job_id in healthy:
        send_event(client.app, receiver.url(path), event(job_id))

    got = receiver.wait_for(lambda rs: len([r for r in rs if r.path == path]) >= len(healthy), timeout=20)
    assert {r.headers["webhook-id"].split(".")[0] for r in got if r.path == path} == healthy
    assert trickling.active > 0  # the slow receiver is still being served meanwhile, not given up on
    assert trickling.most_active <= HOST_CAP

    deadline = time.monotonic() + 30
    while len(trickling.held_s) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(trickling.held_s) >= 2, "no slow attempt was ever cut"
    # Each attempt was cut at the total deadline (with room for a loaded machine), not at a per-read timeout.
    assert all(TIMEOUT_S - 0.5 <= held <= TIMEOUT_S + 3 for held in trickling.held_s), trickling.held_s
