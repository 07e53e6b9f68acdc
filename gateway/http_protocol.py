"""The HTTP/1.1 protocol `varco gateway` serves: uvicorn's h11 protocol, with the request head capped.

uvicorn's `http="auto"` picks httptools whenever it is installed, and httptools has no limit on a
request line or on headers (one connection of 150 headers of 1 MB each grew a gateway by 150 MB);
`h11_max_incomplete_event_size` binds only the h11 protocol. So the gateway always runs h11, whatever
else is installed, and a head over the cap is answered 431 (uvicorn answers every h11 error 400).
"""

from __future__ import annotations

from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

MAX_REQUEST_HEAD_BYTES = 16 * 1024  # the request line and headers together


class _Connection(h11.Connection):
    """h11's connection, remembering the status h11 suggests for the last protocol error it raised."""

    error_status = 400

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.error_status = exc.error_status_hint  # 431 for a head over max_incomplete_event_size
            raise


class CappedH11Protocol(H11Protocol):
    """Pass as uvicorn's `http=`; give the config `h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_cap = self.config.h11_max_incomplete_event_size or MAX_REQUEST_HEAD_BYTES
        self.conn = _Connection(h11.SERVER, self.head_cap)

    def send_400_response(self, msg: str) -> None:
        status = self.conn.error_status if isinstance(self.conn, _Connection) else 400
        if status != 431:
            super().send_400_response(msg)
            return
        body = f"request line and headers are over {self.head_cap} bytes".encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        for event in (h11.Response(status_code=431, headers=headers, reason=b"Request Header Fields Too Large"),
                      h11.Data(data=body), h11.EndOfMessage()):  # fmt: skip
            self.transport.write(self.conn.send(event))
        self.transport.close()
