"""Fetch and decode a job's image from http(s), s3, file or data URIs, within limits.

Every failure is a typed JobError on the job (never a dead worker): permanent ones (404, not an
image, forbidden address) fail the job at once, transient ones (timeouts, 5xx, S3 unreachable)
are marked `transient` so the task retries them with backoff.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import httpx
from PIL import Image, UnidentifiedImageError

from varco.tasks.errors import ImageDecodeError, ImageFetchError, ImageTooLargeError
from varco.tasks.requests import IMAGE_FORMATS
from varco.tasks.settings import Settings
from varco.workers.input.decode import DecodedImage, PixelBudget, decode_bounded, worker_max_side
from varco.workers.input.file_source import read_regular_file
from varco.workers.input.s3_buckets import check_s3_bucket
from varco.workers.net.pinned_http import pinned_client, total_deadline
from varco.workers.net.retry import is_retryable_status, retry_within

MAX_REDIRECTS = 5


def is_transient(exc: BaseException) -> bool:
    """Whether a fetch failure may pass if tried again (a timeout, a 5xx, S3 unreachable)."""
    return isinstance(exc, ImageFetchError) and exc.transient


@dataclass(frozen=True)
class FetchedImage:
    image: Image.Image  # RGB, EXIF orientation applied, shrunk to the processor's largest size (decode.py)
    sha256: str  # of the bytes as fetched
    size_bytes: int
    data: bytes = field(default=b"", repr=False)  # the bytes as fetched: kept for overlays (VARCO_KEEP_IMAGES)
    # The original's size (EXIF orientation applied): pixel boxes are in it. None: the image's own.
    original_size: tuple[int, int] | None = None

    @property
    def width(self) -> int:
        return self.original_size[0] if self.original_size else self.image.width

    @property
    def height(self) -> int:
        return self.original_size[1] if self.original_size else self.image.height


def _refuse_unfollowable_redirect(response: httpx.Response) -> None:
    """A response hook: a redirect to file:, ftp:, a URL without a host, or a Location that does not parse
    can never succeed, so it fails the job at once (httpx would raise a transport error, retried)."""
    if not response.has_redirect_location:
        return
    location, source = response.headers["location"], response.request.url
    try:
        target = source.join(location)
    except httpx.InvalidURL as exc:
        raise ImageFetchError(f"redirect from {source} to a malformed Location {location[:200]!r}: {exc}") from None
    if target.scheme not in ("http", "https") or not target.host:
        raise ImageFetchError(
            f"redirect from {source} to {location[:200]!r}: only http(s) URLs with a host are followed"
        )


class ImageFetcher:
    def __init__(self, settings: Settings, max_side: int | None = None) -> None:
        self.settings = settings
        # Images are shrunk to fit max_side x max_side: what the model's processor uses (decode.py).
        self.max_side = max_side or worker_max_side(settings.model)
        self.budget = PixelBudget(settings.decode_budget_pixels)
        timeout = httpx.Timeout(settings.fetch_timeout_s, connect=min(5.0, settings.fetch_timeout_s))
        # Connections go only to the address that was checked (DNS rebinding); redirects are followed by
        # hand so every hop is checked too.
        self.http = pinned_client(
            settings.allow_private_urls, timeout, headers={"user-agent": "varco-queue"},
            event_hooks={"response": [_refuse_unfollowable_redirect]},
        )  # fmt: skip
        self._s3 = None

    def close(self) -> None:
        self.http.close()

    # --- entry point ----------------------------------------------------------------------
    def fetch(self, uri: str) -> FetchedImage:
        data = self.fetch_bytes(uri)
        decoded = self.decode_bounded(data)
        size = (decoded.width, decoded.height)
        return FetchedImage(decoded.image, hashlib.sha256(data).hexdigest(), len(data), data, size)

    def fetch_bytes(self, uri: str) -> bytes:
        scheme = urlsplit(uri).scheme.lower()
        if scheme in ("http", "https"):
            return self._http(uri)
        if scheme == "s3":
            check_s3_bucket(uri, self.settings.s3_buckets)
            return self._s3_get(uri)
        if scheme == "file":
            return self._file(uri)
        if scheme == "data":
            return self._data(uri)
        raise ImageFetchError(f"unsupported URI scheme {scheme!r}")

    def decode(self, data: bytes) -> Image.Image:
        """The image, RGB, shrunk to the processor's size (see `decode_bounded` for its original size)."""
        return self.decode_bounded(data).image

    def decode_bounded(self, data: bytes) -> DecodedImage:
        limit = self.settings.max_image_pixels
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as opened:
                width, height = opened.size  # read from the header, before any pixel is decoded
                if width * height > limit:
                    raise ImageTooLargeError(
                        f"image is {width}x{height} = {width * height} pixels; the limit is {limit}"
                    )
                return decode_bounded(opened, max_side=self.max_side, budget=self.budget)
        except ImageTooLargeError:
            raise
        except Image.DecompressionBombError as exc:
            raise ImageTooLargeError(f"image rejected as a decompression bomb: {exc}") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
            raise ImageDecodeError(f"not a decodable image ({len(data)} bytes): {exc}") from None

    # --- sources --------------------------------------------------------------------------
    def _http(self, url: str) -> bytes:
        limit = self.settings.max_image_bytes
        for _ in range(MAX_REDIRECTS + 1):
            try:  # the fetch timeout bounds a hop as a whole, so a server trickling bytes cannot hold a thread
                with total_deadline(self.settings.fetch_timeout_s), self.http.stream("GET", url) as response:
                    # httpx's is_redirect is any 3xx: one without a Location (300, 304) is an answer, not a hop.
                    if response.has_redirect_location:
                        url = str(response.next_request.url)  # httpx's reading of the Location (checked)
                        continue
                    self._raise_for_status(url, response.status_code)
                    declared = int(response.headers.get("content-length") or 0)
                    if declared > limit:
                        raise ImageTooLargeError(f"image is {declared} bytes; the limit is {limit}")
                    chunks, total = [], 0
                    for chunk in response.iter_bytes():
                        total += len(chunk)
                        if total > limit:
                            raise ImageTooLargeError(f"image is over the {limit}-byte limit")
                        chunks.append(chunk)
                    return b"".join(chunks)
            except httpx.TimeoutException as exc:
                raise ImageFetchError(f"timed out fetching {url}: {exc!r}", transient=True) from None
            except httpx.HTTPError as exc:
                raise ImageFetchError(f"cannot fetch {url}: {exc!r}", transient=True) from None
        raise ImageFetchError(f"more than {MAX_REDIRECTS} redirects fetching {url}")

    @staticmethod
    def _raise_for_status(url: str, status: int) -> None:
        if status < 300:
            return
        raise ImageFetchError(f"HTTP {status} fetching {url}", transient=is_retryable_status(status))

    def _s3_get(self, uri: str) -> bytes:
        """An s3:// read, retried in place through transient errors for VARCO_S3_READ_RETRY_S: a short S3
        outage costs this job a wait, not a failed attempt. Permanent errors (NoSuchKey, 403) end it at once."""
        retrying = retry_within(self.settings.s3_read_retry_s, jitter_s=0.5, retry_if=is_transient)
        return retrying(self._s3_get_once, uri)

    def _s3_get_once(self, uri: str) -> bytes:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError, ClientError

        if self._s3 is None:
            self._s3 = boto3.client(
                "s3",
                endpoint_url=self.settings.s3_endpoint_url,
                config=Config(
                    retries={"max_attempts": 2, "mode": "standard"},
                    connect_timeout=min(5.0, self.settings.fetch_timeout_s),
                    read_timeout=self.settings.fetch_timeout_s,
                ),
            )
        parts = urlsplit(uri)
        bucket, key = parts.netloc, unquote(parts.path.lstrip("/"))
        limit = self.settings.max_image_bytes
        try:
            obj = self._s3.get_object(Bucket=bucket, Key=key)
            if obj.get("ContentLength", 0) > limit:
                raise ImageTooLargeError(f"image is {obj['ContentLength']} bytes; the limit is {limit}")
            data = obj["Body"].read(limit + 1)  # never more than the limit, whatever the header said
            if len(data) > limit:
                raise ImageTooLargeError(f"image is over the {limit}-byte limit")
            return data
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            transient = status >= 500 or code in ("SlowDown", "RequestTimeout", "InternalError")
            raise ImageFetchError(f"cannot read {uri}: {code or status}", transient=transient) from None
        except BotoCoreError as exc:
            raise ImageFetchError(f"cannot reach S3 for {uri}: {exc}", transient=True) from None

    def _file(self, uri: str) -> bytes:
        return read_regular_file(self.settings.file_root, uri, self.settings.max_image_bytes)

    def _data(self, uri: str) -> bytes:
        header, sep, payload = uri.partition(",")
        if not sep:
            raise ImageDecodeError("broken data URI: no ',' before the payload")
        try:
            if header.lower().endswith(";base64"):
                data = base64.b64decode(payload, validate=True)
            else:
                data = unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise ImageDecodeError(f"broken data URI: {exc}") from None
        if len(data) > self.settings.max_image_bytes:
            raise ImageTooLargeError(f"image is {len(data)} bytes; the limit is {self.settings.max_image_bytes}")
        return data
