"""The producer's own checks, which run before it talks to Redis: they need neither a broker nor torch.

The client points at a broker that does not exist; a request that reached Redis would fail with a
connection error instead of the `InvalidRequest` asserted here.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest

from varco.producer import Client, InvalidRequest
from varco.tasks.settings import Settings

URL = "https://cdn.example.com/cat.jpg"


@pytest.fixture
def client() -> Iterator[Client]:
    c = Client(Settings(broker_url="redis://127.0.0.1:9/0", max_data_uri_bytes=1000, _env_file=None))
    yield c
    c.close()


def test_a_bad_request_is_refused_before_any_connection(client: Client) -> None:
    with pytest.raises(InvalidRequest, match="needs a prompt"):
        client.submit(URL, "vqa")
    with pytest.raises(InvalidRequest, match="unsupported URI scheme 'gopher'"):
        client.submit("gopher://x/y", "caption")


def test_submit_many_names_the_bad_request_and_enqueues_none(client: Client) -> None:
    with pytest.raises(InvalidRequest, match=r"^request #2: ") as info:
        client.submit_many([{"image_uri": URL, "task": "caption"}, {"image_uri": URL, "task": "ocr"},
                            {"image_uri": URL, "task": "referring"}])  # fmt: skip
    assert info.value.index == 2 and "needs a region" in info.value.reason


def test_inline_images_over_the_data_uri_limit_are_refused(client: Client) -> None:
    small = "data:image/png;base64," + base64.b64encode(b"x" * 1000).decode()  # exactly the limit: fits
    large = "data:image/png;base64," + base64.b64encode(b"x" * 1001).decode()
    assert client.validate(small, "caption").image_uri == small
    with pytest.raises(InvalidRequest, match="holds 1001 bytes; the limit is 1000"):
        client.submit(large, "caption")
