"""Image fetching against a real local HTTP server: limits, address rules, typed errors."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import random
import re
import socket
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote_from_bytes

import pytest
import tenacity
from helpers import ServedFiles
from images import jpeg_rotated, png
from PIL import Image, PngImagePlugin

from varco.tasks.errors import ForbiddenURLError, ImageDecodeError, ImageFetchError, ImageTooLargeError
from varco.tasks.settings import Settings
from varco.workers.input.fetch import ImageFetcher
from varco.workers.input.file_source import read_regular_file
from varco.workers.input.s3_buckets import check_s3_bucket

IMAGE = png(64, 48)


@pytest.fixture(scope="module")
def served() -> Iterator[ServedFiles]:
    s = ServedFiles()
    s.add("/ok.png", IMAGE)
    s.add("/text", b"plain text")
    s.add("/big.png", png(400, 400))
    s.add("/rotated.jpg", jpeg_rotated(30, 20))
    s.add("/gone", status=410)
    s.add("/busy", status=503)
    s.add("/loop", status=302, headers={"location": "/loop"})
    yield s
    s.close()


def fetcher(tmp_path: Path | None = None, **overrides: object) -> ImageFetcher:
    return ImageFetcher(Settings(allow_private_urls=True, file_root=tmp_path, **overrides))


def test_http_image(served: ServedFiles) -> None:
    got = fetcher().fetch(served.base + "/ok.png")
    assert (got.width, got.height, got.image.mode) == (64, 48, "RGB")
    assert got.size_bytes == len(IMAGE)
    # The hash keys the result cache and the bytes are kept for overlays: both are of the bytes as fetched.
    assert got.sha256 == hashlib.sha256(IMAGE).hexdigest() and got.data == IMAGE
    # Image hosts see who asks (some refuse the default client name).
    assert served.user_agents[-1] == "varco-queue"


def test_loopback_is_refused_unless_private_urls_are_allowed(served: ServedFiles) -> None:
    with pytest.raises(ForbiddenURLError, match=r"non-public address 127\.0\.0\.1"):
        ImageFetcher(Settings(allow_private_urls=False)).fetch(served.base + "/ok.png")
    with pytest.raises(ForbiddenURLError):
        ImageFetcher(Settings(allow_private_urls=False)).fetch(
            served.base.replace("127.0.0.1", "localhost") + "/ok.png"
        )


@pytest.mark.parametrize("address", ["10.1.2.3", "192.168.0.7", "169.254.169.254", "172.16.5.5", "::1", "fe80::1"])
def test_private_and_link_local_after_dns_resolution(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [(family, socket.SOCK_STREAM, 6, "", (address, 0))])
    with pytest.raises(ForbiddenURLError, match=re.escape(address)):
        ImageFetcher(Settings(allow_private_urls=False)).fetch("http://images.example.com/cat.png")


def test_permanent_and_transient_http_errors(served: ServedFiles) -> None:
    with pytest.raises(ImageFetchError, match=f"HTTP 410 fetching {served.base}/gone") as gone:
        fetcher().fetch(served.base + "/gone")
    assert gone.value.transient is False
    with pytest.raises(ImageFetchError, match="HTTP 503") as busy:
        fetcher().fetch(served.base + "/busy")
    assert busy.value.transient is True
    with pytest.raises(ImageFetchError, match="redirects"):
        fetcher().fetch(served.base + "/loop")


def test_a_connect_that_hangs_gives_up_after_five_seconds() -> None:
    # A listener whose accept queue is full: the kernel drops further SYNs, so connecting hangs. The
    # connect timeout (5 s) ends it long before the hop's deadline (VARCO_FETCH_TIMEOUT_S, 120 s here).
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full, socket.create_connection(full.getsockname()):
        url = f"http://127.0.0.1:{full.getsockname()[1]}/x.png"
        error = _fetch_in_thread(fetcher(fetch_timeout_s=120).fetch, url, seconds=60)
    assert isinstance(error, ImageFetchError) and error.transient is True
    assert str(error).startswith(f"timed out fetching {url}: ConnectTimeout")


def test_unreachable_host_is_transient() -> None:
    from varco.workers.devtools.local_redis import free_port

    url = f"http://127.0.0.1:{free_port()}/x.png"
    with pytest.raises(ImageFetchError, match=f"^cannot fetch {re.escape(url)}") as info:
        fetcher().fetch(url)
    assert info.value.transient is True


def test_not_an_image(served: ServedFiles) -> None:
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        fetcher().fetch(served.base + "/text")


def test_byte_and_pixel_limits(served: ServedFiles) -> None:
    with pytest.raises(ImageTooLargeError, match="bytes"):
        fetcher(max_image_bytes=100).fetch(served.base + "/big.png")
    with pytest.raises(ImageTooLargeError, match="pixels"):
        fetcher(max_image_pixels=10_000).fetch(served.base + "/big.png")


def test_exif_orientation(served: ServedFiles) -> None:
    got = fetcher().fetch(served.base + "/rotated.jpg")
    assert (got.width, got.height) == (20, 30)


def test_file_uris_only_under_the_root(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(IMAGE)
    assert fetcher(tmp_path).fetch((tmp_path / "a.png").as_uri()).width == 64
    with pytest.raises(ForbiddenURLError, match="outside VARCO_FILE_ROOT"):
        fetcher(tmp_path).fetch((tmp_path / ".." / "x.png").as_uri())
    with pytest.raises(ImageFetchError, match="no such file"):
        fetcher(tmp_path).fetch((tmp_path / "nope.png").as_uri())
    with pytest.raises(ForbiddenURLError, match=r"^file:// URIs are disabled: set VARCO_FILE_ROOT"):
        fetcher(None).fetch((tmp_path / "a.png").as_uri())


def test_symlink_escaping_the_root_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.png"
    outside.write_bytes(IMAGE)
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.png").symlink_to(outside)
    with pytest.raises(ForbiddenURLError):
        fetcher(root).fetch((root / "link.png").as_uri())


def test_data_uris() -> None:
    got = fetcher().fetch("data:image/png;base64," + base64.b64encode(IMAGE).decode())
    assert (got.width, got.height) == (64, 48)
    with pytest.raises(ImageDecodeError, match="broken data URI"):
        fetcher().fetch("data:image/png;base64,@@@")
    with pytest.raises(ImageDecodeError, match="not a decodable image"):
        fetcher().fetch("data:image/png;base64," + base64.b64encode(b"not a png").decode())


def _fetch_in_thread(fetch, uri: str, seconds: float = 10.0) -> BaseException | None:
    """The error fetch(uri) raised, failing the test if it is still blocked after `seconds`."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            fetch(uri)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"fetching {uri} was still blocked after {seconds}s"
    return outcome[0]


def test_a_fifo_under_the_root_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.png")
    error = _fetch_in_thread(fetcher(tmp_path).fetch, (tmp_path / "pipe.png").as_uri())
    assert isinstance(error, ImageFetchError) and "FIFO" in str(error)


def test_only_regular_files_are_read(tmp_path: Path) -> None:
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(ImageFetchError, match="directory"):
        fetcher(tmp_path).fetch((tmp_path / "dir.png").as_uri())


def test_nul_bytes_and_overlong_names_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageFetchError, match=r"^file path contains a NUL byte"):
        fetcher(tmp_path).fetch(tmp_path.as_uri() + "/a%00b.png")
    # The error gives the name's length, not the 5000-character name (it ends up in the job's status).
    with pytest.raises(ImageFetchError, match=r"^file name too long \(5\d{3} characters\)$"):
        fetcher(tmp_path).fetch(tmp_path.as_uri() + "/" + "a" * 5000 + ".png")


def test_s3_buckets_must_be_allowed() -> None:
    with pytest.raises(ForbiddenURLError, match=r"^s3:// image URIs are disabled: set VARCO_S3_BUCKETS"):
        fetcher().fetch("s3://anything/cat.png")
    with pytest.raises(ForbiddenURLError, match=r"'results' is not in VARCO_S3_BUCKETS \(images, thumbs\)"):
        fetcher(s3_buckets="images,thumbs").fetch("s3://results/jobs/x.json")
    assert Settings(s3_buckets="images, thumbs").s3_buckets == ["images", "thumbs"]


def test_the_byte_limit_counts_a_stream_without_content_length(served: ServedFiles) -> None:
    # No Content-Length: the shortcut on the header cannot fire, so only the counter on the stream stops it.
    url = served.add("/unsized.png", png(400, 400), send_length=False)
    size = len(png(400, 400))
    assert fetcher(max_image_bytes=size).fetch(url).width == 400  # exactly at the limit: fine
    with pytest.raises(ImageTooLargeError, match=f"over the {size - 1}-byte limit"):
        fetcher(max_image_bytes=size - 1).fetch(url)


def test_s3_byte_limit_by_header_and_by_counting(served: ServedFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    # The local HTTP server answers S3's path-style GET /bucket/key; one object declares its length, one does not.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    big = png(400, 400)
    served.add("/bucket/sized.png", big)
    served.add("/bucket/unsized.png", big, send_length=False)
    s3 = fetcher(max_image_bytes=len(big) - 1, s3_endpoint_url=served.base, s3_buckets="bucket")
    with pytest.raises(ImageTooLargeError, match=f"image is {len(big)} bytes"):
        s3.fetch("s3://bucket/sized.png")
    with pytest.raises(ImageTooLargeError, match="over the"):
        s3.fetch("s3://bucket/unsized.png")
    fits = fetcher(max_image_bytes=len(big), s3_endpoint_url=served.base, s3_buckets="bucket")
    assert fits.fetch("s3://bucket/unsized.png").width == fits.fetch("s3://bucket/sized.png").width == 400


def test_file_and_data_byte_limits(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(IMAGE)
    with pytest.raises(ImageTooLargeError, match=f"image is {len(IMAGE)} bytes"):
        fetcher(tmp_path, max_image_bytes=len(IMAGE) - 1).fetch((tmp_path / "a.png").as_uri())
    assert fetcher(tmp_path, max_image_bytes=len(IMAGE)).fetch((tmp_path / "a.png").as_uri()).width == 64
    data = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    with pytest.raises(ImageTooLargeError, match=f"image is {len(IMAGE)} bytes"):
        fetcher(max_image_bytes=len(IMAGE) - 1).fetch(data)
    assert fetcher(max_image_bytes=len(IMAGE)).fetch(data).width == 64


def test_a_server_that_never_answers_times_out_as_transient() -> None:
    # Accepts the connection (the kernel's backlog) and never sends a byte: the read timeout fires.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        port = silent.getsockname()[1]
        with pytest.raises(ImageFetchError, match=r"^timed out fetching") as info:
            fetcher(fetch_timeout_s=0.5).fetch(f"http://127.0.0.1:{port}/x.png")
    assert info.value.transient is True


# --- decoding ---------------------------------------------------------------------------------------


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_the_pixel_limit_is_inclusive_and_the_error_gives_the_size() -> None:
    assert fetcher(max_image_pixels=64 * 48).fetch(_data_uri(IMAGE)).width == 64
    with pytest.raises(ImageTooLargeError, match=r"^image is 64x48 = 3072 pixels; the limit is 3071$"):
        fetcher(max_image_pixels=64 * 48 - 1).fetch(_data_uri(IMAGE))


def test_images_with_alpha_or_a_palette_come_out_rgb() -> None:
    for mode in ("RGBA", "P", "L"):
        buffer = io.BytesIO()
        Image.new(mode, (8, 6)).save(buffer, format="PNG")
        assert fetcher().fetch(_data_uri(buffer.getvalue())).image.mode == "RGB"


def _png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height with next to no pixel data: enough for Pillow to open it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_a_decompression_bomb_is_too_large_whatever_the_pixel_limit() -> None:
    # Pillow refuses images over twice its own pixel cap when it opens them, before our limit is compared.
    with pytest.raises(ImageTooLargeError, match=r"^image rejected as a decompression bomb"):
        fetcher(max_image_pixels=10**10).fetch(_data_uri(_png_header(30_000, 30_000)))


# --- sources and schemes ----------------------------------------------------------------------------


def test_unsupported_schemes_are_named() -> None:
    with pytest.raises(ImageFetchError, match=r"^unsupported URI scheme 'ftp'$") as info:
        fetcher().fetch("ftp://example.com/cat.png")
    assert info.value.transient is False


def test_https_goes_to_the_http_client(served: ServedFiles) -> None:
    # The server speaks plain HTTP: the TLS handshake fails, a connection error (not an unknown scheme).
    url = served.base.replace("http://", "https://") + "/ok.png"
    with pytest.raises(ImageFetchError, match=f"^cannot fetch {re.escape(url)}") as info:
        fetcher().fetch(url)
    assert info.value.transient is True


def test_data_uri_without_a_comma() -> None:
    with pytest.raises(ImageDecodeError, match=r"^broken data URI: no ',' before the payload$"):
        fetcher().fetch("data:image/png;base64")


def test_percent_encoded_data_uri_keeps_commas_in_the_payload() -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "red, 64x48, for a test")  # the PNG's bytes then hold commas
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG", pnginfo=info)
    image = buffer.getvalue()
    assert b"," in image
    got = fetcher().fetch("data:image/png," + quote_from_bytes(image, safe=","))
    assert got.data == image and got.width == 64


# --- HTTP -------------------------------------------------------------------------------------------


def test_redirects_are_followed_up_to_five(served: ServedFiles) -> None:
    # /r/0 -> /r/1 -> ... -> /r/6, an image; each Location relative to the hop that sent it.
    for hop in range(6):
        served.add(f"/r/{hop}", status=302, headers={"location": str(hop + 1)})
    served.add("/r/6", IMAGE)
    assert fetcher().fetch(served.base + "/r/1").data == IMAGE  # five redirects
    with pytest.raises(ImageFetchError, match=r"^more than 5 redirects") as info:
        fetcher().fetch(served.base + "/r/0")  # six
    assert info.value.transient is False


@pytest.mark.parametrize(
    ("status", "transient"),
    [(300, False), (404, False), (410, False), (418, False), (422, False),
     (408, True), (425, True), (429, True), (500, True), (502, True), (503, True)],
)  # fmt: skip
def test_which_http_errors_are_worth_a_retry(served: ServedFiles, status: int, transient: bool) -> None:
    # Timeouts, "too early", rate limits and server errors are retried; other 4xx (and a 3xx that is
    # not a redirect to follow) fail the job at once.
    url = served.add(f"/status/{status}", IMAGE, status=status)
    with pytest.raises(ImageFetchError, match=f"^HTTP {status} fetching ") as info:
        fetcher().fetch(url)
    assert info.value.transient is transient


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("file:///etc/passwd", r"to 'file:///etc/passwd': only http\(s\) URLs with a host are followed"),
        ("ftp://files.example/cat.png", r"to 'ftp://files\.example/cat\.png': only http\(s\)"),
        ("https:cat.png", r"to 'https:cat\.png': only http\(s\) URLs with a host"),
        ("http://[::1/cat.png", r"to a malformed Location 'http://\[::1/cat\.png': Invalid port"),
        ("http://images.example:port/cat.png", r"to a malformed Location .*: Invalid port"),
        # A long Location is quoted up to its first 200 characters.
        ("ftp://files.example/" + "a" * 300, "to " + re.escape(repr("ftp://files.example/" + "a" * 180)) + ": only"),
        ("http://[::1/" + "a" * 300, "to a malformed Location " + re.escape(repr("http://[::1/" + "a" * 188)) + ": "),
    ],
)  # fmt: skip
def test_a_redirect_that_can_never_be_followed_fails_at_once(served: ServedFiles, location: str, message: str) -> None:
    # Retrying cannot change where the redirect leads: the job fails now instead of at its attempt cap.
    url = served.add(f"/to/{len(served.routes)}", status=302, headers={"location": location})
    with pytest.raises(ImageFetchError, match=f"^redirect from {re.escape(url)} {message}") as info:
        fetcher().fetch(url)
    assert info.value.transient is False and type(info.value) is ImageFetchError


@pytest.mark.parametrize("scheme", ["https", "HTTPS", "http"])
def test_a_redirect_to_http_or_https_is_followed(served: ServedFiles, scheme: str) -> None:
    # Followed, so the next hop's own outcome decides: here a port nobody listens on, a transient error.
    url = served.add(f"/to-{scheme}", status=302, headers={"location": f"{scheme}://127.0.0.1:1/cat.png"})
    with pytest.raises(ImageFetchError, match=f"^cannot fetch {scheme.lower()}://127.0.0.1:1/cat.png: ") as info:
        fetcher().fetch(url)
    assert info.value.transient is True


def _encoded(image: Image.Image, format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.mark.parametrize("format", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_the_served_image_formats_decode(format: str) -> None:
    data = _encoded(Image.new("RGB", (20, 10), (10, 200, 30)), format)
    assert fetcher().decode(data).size == (20, 10)


@pytest.mark.parametrize("format", ["PPM", "ICO", "PCX", "TGA", "SGI", "EPS"])
def test_other_formats_pillow_knows_are_not_opened(format: str) -> None:
    # Each format is one more decoder an untrusted image could reach (EPS runs Ghostscript where installed).
    image = Image.new("RGB", (16, 16), (10, 200, 30))
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n" if format == "EPS" else _encoded(image, format)
    with pytest.raises(ImageDecodeError, match=r"^not a decodable image"):
        fetcher().decode(data)


def test_a_3xx_without_a_location_is_an_error_not_a_redirect_loop(served: ServedFiles) -> None:
    url = served.add("/nowhere", status=302)
    with pytest.raises(ImageFetchError, match=f"^HTTP 302 fetching {re.escape(url)}$") as info:
        fetcher().fetch(url)
    assert info.value.transient is False and served.routes["/nowhere"].hits == 1


def test_the_declared_length_may_equal_the_limit(served: ServedFiles) -> None:
    assert fetcher(max_image_bytes=len(IMAGE)).fetch(served.base + "/ok.png").data == IMAGE


def _noise_png(side: int) -> bytes:
    """A PNG of random pixels: it does not compress, so its bytes come in many reads."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(side).randbytes(side * side * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_body_of_many_chunks_arrives_whole(served: ServedFiles) -> None:
    body = _noise_png(300)  # about 270 kB
    for send_length in (True, False):
        url = served.add(f"/noise-{send_length}.png", body, send_length=send_length)
        got = fetcher().fetch(url)
        assert got.data == body and got.sha256 == hashlib.sha256(body).hexdigest()


class EndlessBody:
    """An HTTP server whose answer has no Content-Length and no end: it streams zeros until the client
    hangs up or stops reading, or until `cap` bytes (then a client that reads everything ends too)."""

    def __init__(self, cap: int = 128 << 20) -> None:
        self.cap = cap
        self.sent = 0  # bytes of body written so far, over all connections
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.connections.append(connection)
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            request = b""
            while b"\r\n\r\n" not in request:
                if not (chunk := connection.recv(65536)):
                    return
                request += chunk
            block = bytes(65536)
            try:
                connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\nconnection: close\r\n\r\n")
                while self.sent < self.cap:
                    connection.sendall(block)
                    self.sent += len(block)
            except OSError:  # the client hung up
                pass

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def endless() -> Iterator[EndlessBody]:
    server = EndlessBody()
    yield server
    server.close()


def test_an_endless_http_body_is_cut_at_the_limit(endless: EndlessBody) -> None:
    with pytest.raises(ImageTooLargeError, match=r"^image is over the 100000-byte limit$"):
        fetcher(max_image_bytes=100_000).fetch(endless.base + "/forever.png")
    # The reader stopped near the limit: what the server got out is at most what the socket buffers hold.
    assert endless.sent < endless.cap


# --- S3 ---------------------------------------------------------------------------------------------


@pytest.fixture
def s3_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def s3_fetcher(endpoint: str, **overrides: object) -> ImageFetcher:
    return fetcher(s3_endpoint_url=endpoint, s3_buckets="bucket", **overrides)


def s3_error(code: str) -> bytes:
    return f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>m</Message></Error>".encode()


@pytest.mark.usefixtures("s3_credentials")
def test_s3_keys_are_read_verbatim(served: ServedFiles) -> None:
    # Percent-escapes in the URI are decoded once; the key keeps its case and its first character.
    served.add("/bucket/Xrays/scan%201.png", IMAGE)
    assert s3_fetcher(served.base).fetch("s3://bucket/Xrays/scan%201.png").data == IMAGE


@pytest.mark.usefixtures("s3_credentials")
@pytest.mark.parametrize(
    ("status", "code", "transient", "shown"),
    [
        (404, "NoSuchKey", False, "NoSuchKey"),
        (403, "AccessDenied", False, "AccessDenied"),
        (500, None, True, "500"),  # a server error with no error document: the status decides
        (400, "RequestTimeout", True, "RequestTimeout"),  # S3 sends it as a 400: the code decides
        # S3 sends these as 503 and 500; S3-compatible stores and proxies may not: the code decides too.
        (429, "SlowDown", True, "SlowDown"),
        (400, "InternalError", True, "InternalError"),
    ],
)
def test_s3_errors_are_typed_by_code_and_status(
    served: ServedFiles, status: int, code: str | None, transient: bool, shown: str
) -> None:
    path = f"/bucket/{status}-{code}.png"
    served.add(path, status=status, error_body=s3_error(code) if code else b"")
    uri = "s3:/" + path
    with pytest.raises(ImageFetchError, match=f"^cannot read {uri}: {shown}$") as info:
        s3_fetcher(served.base, s3_read_retry_s=0).fetch(uri)
    assert info.value.transient is transient


@pytest.mark.usefixtures("s3_credentials")
def test_s3_without_in_place_retries_makes_one_read_of_three_requests(
    served: ServedFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    # VARCO_S3_READ_RETRY_S=0: one read, with boto's two quick retries inside it, whatever the host's
    # AWS configuration says (it could stretch every attempt during an outage); the error is the read's own.
    monkeypatch.setenv("AWS_RETRY_MODE", "legacy")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "6")
    served.add("/bucket/down.png", status=503)
    uri = "s3://bucket/down.png"
    with pytest.raises(ImageFetchError, match=f"^cannot read {uri}: ") as info:
        s3_fetcher(served.base, s3_read_retry_s=0).fetch(uri)
    assert info.value.transient is True
    assert served.routes["/bucket/down.png"].hits == 3


@pytest.mark.usefixtures("s3_credentials")
def test_s3_reads_are_retried_in_place_after_a_pause(served: ServedFiles) -> None:
    route = "/bucket/blip.png"
    served.add(route, IMAGE, failures=[503] * 3)  # boto's three requests of the first read fail
    assert s3_fetcher(served.base, s3_read_retry_s=30).fetch("s3:/" + route).data == IMAGE
    times = served.routes[route].hit_times
    assert len(times) == 4
    # The backoff starts at 0.2 s: an outage is not hammered (a lower bound, so no timing race).
    assert times[3] - times[2] >= 0.2


def test_s3_read_pauses_double_from_a_fifth_of_a_second_with_half_a_second_of_jitter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pauses: list[float] = []
    monkeypatch.setattr(tenacity.nap.time, "sleep", pauses.append)  # recorded, not taken
    monkeypatch.setattr(random, "uniform", lambda low, high: high)  # the most jitter
    answers: list[bytes | ImageFetchError] = [ImageFetchError("S3 down", transient=True)] * 7 + [IMAGE]
    s3 = s3_fetcher("http://127.0.0.1:9", s3_read_retry_s=30)
    monkeypatch.setattr(s3, "_s3_get_once", lambda uri: _raise_or_return(answers.pop(0)))
    assert s3.fetch_bytes("s3://bucket/blip.png") == IMAGE
    assert pauses == pytest.approx([0.7, 0.9, 1.3, 2.1, 3.7, 5.0, 5.0])  # never more than 5 s apart


def _raise_or_return(answer: bytes | ImageFetchError) -> bytes:
    if isinstance(answer, ImageFetchError):
        raise answer
    return answer


@pytest.mark.usefixtures("s3_credentials")
def test_s3_reads_stop_for_good_on_a_permanent_error(served: ServedFiles) -> None:
    served.add("/bucket/missing.png", status=404, error_body=s3_error("NoSuchKey"))
    with pytest.raises(ImageFetchError, match="NoSuchKey"):
        s3_fetcher(served.base, s3_read_retry_s=30).fetch("s3://bucket/missing.png")
    assert served.routes["/bucket/missing.png"].hits == 1


@pytest.mark.usefixtures("s3_credentials")
def test_an_s3_store_that_never_answers_times_out_as_transient() -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        fetch = s3_fetcher(endpoint, fetch_timeout_s=0.5, s3_read_retry_s=0).fetch
        error = _fetch_in_thread(fetch, "s3://bucket/x.png")
    assert isinstance(error, ImageFetchError) and error.transient is True
    assert str(error).startswith("cannot reach S3 for s3://bucket/x.png: Read timeout")


@pytest.mark.usefixtures("s3_credentials")
def test_an_endless_s3_body_is_cut_at_the_limit(endless: EndlessBody) -> None:
    with pytest.raises(ImageTooLargeError, match=r"^image is over the 100000-byte limit$"):
        s3_fetcher(endless.base, max_image_bytes=100_000).fetch("s3://bucket/forever.png")
    assert endless.sent < endless.cap


def test_the_s3_wildcard_allows_every_bucket() -> None:
    check_s3_bucket("s3://any-bucket/cat.png", ["*"])
    check_s3_bucket("s3://thumbs/cat.png", ["images", "thumbs"])
    with pytest.raises(ForbiddenURLError):
        check_s3_bucket("s3://images-private/cat.png", ["images"])


# --- file:// ----------------------------------------------------------------------------------------


def test_a_file_at_the_limit_or_of_many_reads_is_read_whole(tmp_path: Path) -> None:
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(IMAGE)
    big.write_bytes(random.Random(3).randbytes(3 << 20))  # read 1 MiB at a time
    assert read_regular_file(tmp_path, small.as_uri(), len(IMAGE)) == IMAGE
    assert read_regular_file(tmp_path, big.as_uri(), 3 << 20) == big.read_bytes()


def test_a_file_larger_than_fstat_says_is_cut_at_the_limit() -> None:
    # procfs reports size 0 and hands its text out in page-sized reads: only counting them stops it
    # (as for a file that grows after the check).
    maps = Path("/proc/self/maps")
    assert os.stat(maps).st_size == 0 and len(maps.read_bytes()) > 20_000
    with pytest.raises(ImageTooLargeError, match=r"^image is over the 10000-byte limit$"):
        read_regular_file(Path("/proc/self"), maps.as_uri(), 10_000)


def test_unreadable_paths_are_typed_errors_that_say_why(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(IMAGE)
    not_a_dir = tmp_path / "a.png" / "b.png"
    with pytest.raises(ImageFetchError, match=f"^cannot read {re.escape(str(not_a_dir))}: Not a directory$"):
        read_regular_file(tmp_path, not_a_dir.as_uri(), 1000)
    # A read that fails (a failing disk; procfs' mem file at address 0 answers EIO).
    with pytest.raises(ImageFetchError, match=r"^cannot read /proc/\d+/mem: Input/output error$"):
        read_regular_file(Path("/proc/self"), "file:///proc/self/mem", 1000)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    with pytest.raises(ImageFetchError, match=r"^cannot (resolve|read) .*(loop|symbolic links)"):
        read_regular_file(tmp_path, (tmp_path / "loop").as_uri(), 1000)


def test_a_file_of_an_unknown_kind_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Linux has no other kinds of file, but other systems do (Solaris doors, BSD whiteouts): such a file
    # is refused too. fstat reports one here for the file under test only.
    (tmp_path / "door.png").write_bytes(IMAGE)
    real_fstat = os.fstat

    def fstat(fd: int) -> os.stat_result:
        info = real_fstat(fd)
        if info.st_ino != (tmp_path / "door.png").stat().st_ino:
            return info
        return os.stat_result((0o150644, *tuple(info)[1:]))  # S_IFDOOR

    monkeypatch.setattr(os, "fstat", fstat)
    with pytest.raises(ImageFetchError, match=r"door.png is not a regular file; only regular files are read$"):
        read_regular_file(tmp_path, (tmp_path / "door.png").as_uri(), 1000)
