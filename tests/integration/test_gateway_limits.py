"""The gateway's limits, in force in a real `varco gateway` process (uvicorn, whatever parser is installed):
the request-head cap, one deadline for a body, the rate limit on the job page and on failed logins.

Raw sockets where httpx would not send what an attacker sends. No worker: nothing here runs a job.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import GATEWAY_KEYS, gateway_process

from varco.workers.devtools.local_redis import LocalRedis

ALICE = GATEWAY_KEYS[0]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def limits_env(redis_server: LocalRedis, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {
        "VARCO_BROKER_URL": redis_server.url,
        "VARCO_RESULT_STORE": tmp_path_factory.mktemp("results").as_uri() + "/",
        "VARCO_API_KEYS": ",".join(GATEWAY_KEYS),
        "VARCO_GATEWAY_BODY_TIMEOUT_S": "1",
    }


@pytest.fixture(scope="module")
def gateway(limits_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """The base URL and the process id of a gateway with a 1 s body deadline."""
    log = tmp_path_factory.mktemp("logs") / "gateway.log"
    with gateway_process(limits_env, log) as (base, process):
        yield base, process.pid


def peak_rss_bytes(pid: int) -> int:
    """The process's resident memory at its highest so far (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def answer_while_sending(sock: socket.socket, pieces: Iterator[bytes], wait_s: float = 0.0) -> tuple[bytes, bool]:
    """Send `pieces` one by one, polling `wait_s` after each, until the server answers; then read its answer.
    Also says whether every piece was sent first. A server that hangs up mid-send may reset the
    connection: what it answered before that is still read."""
    sent_all = True
    for piece in pieces:
        try:
            sock.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            sent_all = False
            break
        if select.select([sock], [], [], wait_s)[0]:
            sent_all = False
            break
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks), sent_all


def head_pieces(headers: int, size: int) -> Iterator[bytes]:
    yield b"GET /livez HTTP/1.1\r\nHost: gateway\r\n"
    for n in range(headers):
        yield f"X-Filler-{n}: ".encode()
        for _ in range(size // 65536):
            yield b"a" * 65536
        yield b"\r\n"
    yield b"\r\n"


def test_one_header_of_a_megabyte_is_refused_with_a_431(gateway: tuple[str, int]) -> None:
    base, _ = gateway
    with connect(base) as sock:
        answer, _ = answer_while_sending(sock, head_pieces(1, MB))
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert httpx.get(base + "/livez").status_code == 200


def test_many_large_headers_do_not_grow_the_gateway(gateway: tuple[str, int]) -> None:
    # 64 headers of 1 MB on one connection: a gateway on httptools held them all (its peak memory grew by
    # 64 MB and more). Capped, a connection holds at most the 16 KiB head and one read.
    base, pid = gateway
    assert httpx.get(base + "/livez").status_code == 200
    before = peak_rss_bytes(pid)
    with connect(base) as sock:
        answer, _ = answer_while_sending(sock, head_pieces(64, MB))
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert peak_rss_bytes(pid) - before < 16 * MB


def test_a_body_trickled_within_the_timeout_per_chunk_gets_a_408_at_the_deadline(gateway: tuple[str, int]) -> None:
    # One byte each 0.5 s, each well within the 1 s timeout, 20 of the 100 declared: 10 s of trickle.
    base, _ = gateway

    def pieces() -> Iterator[bytes]:
        yield (f"POST /v1/jobs HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer {ALICE}\r\n"
               "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n").encode()  # fmt: skip
        yield from (b" " for _ in range(20))

    with connect(base) as sock:
        answer, sent_all = answer_while_sending(sock, pieces(), wait_s=0.5)
    assert answer.startswith(b"HTTP/1.1 408 ") and not sent_all, answer[:200]
    assert b"VARCO_GATEWAY_BODY_TIMEOUT_S" in answer


def test_the_job_page_and_failed_logins_are_rate_limited(limits_env: dict[str, str], tmp_path: Path) -> None:
    env = {**limits_env, "VARCO_RATE_LIMIT": "0.001"}  # a bucket of one, refilled once in 1000 s
    with gateway_process(env, tmp_path / "gateway.log") as (base, _), httpx.Client(base_url=base) as http:
        job = f"/ui/jobs/{'0' * 32}"
        assert http.get(job, params={"key": ALICE}).status_code == 404  # no such job: the one token is spent
        statuses = [http.get(job, params={"key": ALICE}).status_code for _ in range(3)]
        statuses += [http.get(job, headers={"Authorization": f"Bearer {ALICE}"}).status_code for _ in range(3)]
        assert statuses == [429] * 6
        assert http.get(job, params={"key": "wrong"}).status_code == 401  # this address's one failure
        failures = [http.get(job, params={"key": "wrong"}).status_code for _ in range(3)]
        failures += [http.get("/v1/jobs/" + "0" * 32, headers={"Authorization": "Bearer wrong"}).status_code]
        assert failures == [429] * 4
        assert http.get(job, params={"key": GATEWAY_KEYS[1]}).status_code == 404  # Bob's bucket is his own
