"""`varco gateway`: serve the app with uvicorn, limits set so slow or numerous clients cannot hold it."""

from __future__ import annotations

import logging
import socket
import sys

import uvicorn

from varco.gateway.app import create_app
from varco.gateway.auth import load_keys
from varco.gateway.http_protocol import MAX_REQUEST_HEAD_BYTES, CappedH11Protocol
from varco.gateway.open_streams import OpenStreams
from varco.tasks.redaction import redact_text
from varco.tasks.settings import Settings, get_settings


class RedactSecrets(logging.Filter):
    """Access-log lines never carry a page's `?key=` or `?token=` value."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_text(a) if isinstance(a, str) else a for a in record.args)
        return True


class GatewayServer(uvicorn.Server):
    """uvicorn's server, whose shutdown (SIGTERM, SIGINT) first ends the open event streams, each with
    `event: interrupted` and a proper end of its chunked body: they would otherwise hold the graceful
    shutdown for its whole timeout and then be cut off mid-transfer."""

    def __init__(self, config: uvicorn.Config, streams: OpenStreams) -> None:
        super().__init__(config)
        self.streams = streams

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.streams.close_all()  # before uvicorn waits for the connections to finish their responses
        await super().shutdown(sockets)


def uvicorn_config(app: object, settings: Settings, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        timeout_keep_alive=settings.gateway_keep_alive_s,  # idle keep-alive connections closed after it
        limit_concurrency=settings.gateway_max_connections,  # beyond: 503 at once, instead of piling up
        http=CappedH11Protocol,  # h11 even where httptools is installed: only h11 caps the request head
        h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,  # request line + headers; over it: 431
        timeout_graceful_shutdown=10,  # for requests in progress; open event streams end at once (GatewayServer)
        server_header=False,
    )


def serve(host: str, port: int | None, *, no_auth: bool = False) -> int:
    settings = get_settings()
    keys = load_keys(settings)
    if not keys and not no_auth:
        print(
            "varco gateway: no API keys: set VARCO_API_KEYS or VARCO_API_KEYS_FILE, or pass --no-auth "
            "to serve every caller without authentication",
            file=sys.stderr,
        )
        return 2
    app = create_app(settings, None if no_auth else keys)
    config = uvicorn_config(app, settings, host, port or settings.gateway_port)
    logging.getLogger("uvicorn.access").addFilter(RedactSecrets())
    GatewayServer(config, app.state.streams).run()
    return 0
