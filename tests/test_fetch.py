"""Image fetching against a real local HTTP server: limits, address rules, typed errors."""

from __future__ import annotations

import base64
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import ServedFiles
from images import jpeg_rotated, png

from varco.tasks.errors import ForbiddenURLError, ImageDecodeError, ImageFetchError, ImageTooLargeError
from varco.tasks.settings import Settings
from varco.workers.fetch import ImageFetcher

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
    with pytest.raises(ImageFetchError, match="HTTP 410") as gone:
        fetcher().fetch(served.base + "/gone")
    assert gone.value.transient is False
    with pytest.raises(ImageFetchError, match="HTTP 503") as busy:
        fetcher().fetch(served.base + "/busy")
    assert busy.value.transient is True
    with pytest.raises(ImageFetchError, match="redirects"):
        fetcher().fetch(served.base + "/loop")


def test_unreachable_host_is_transient() -> None:
    from varco.workers.devtools.local_redis import free_port

    with pytest.raises(ImageFetchError) as info:
        fetcher().fetch(f"http://127.0.0.1:{free_port()}/x.png")
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
    with pytest.raises(ImageFetchError, match="VARCO_FILE_ROOT"):
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
    with pytest.raises(ImageFetchError, match="NUL"):
        fetcher(tmp_path).fetch(tmp_path.as_uri() + "/a%00b.png")
    with pytest.raises(ImageFetchError, match="too long"):
        fetcher(tmp_path).fetch(tmp_path.as_uri() + "/" + "a" * 5000 + ".png")


def test_s3_buckets_must_be_allowed() -> None:
    with pytest.raises(ForbiddenURLError, match="VARCO_S3_BUCKETS"):
        fetcher().fetch("s3://anything/cat.png")
    with pytest.raises(ForbiddenURLError, match="'results' is not in VARCO_S3_BUCKETS"):
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
