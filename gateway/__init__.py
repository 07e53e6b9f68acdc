"""The HTTP gateway: FastAPI over `varco.producer.Client`, so any backend can use the queue over HTTP.

`create_app(settings, keys)` builds the ASGI app; `varco gateway` serves it with uvicorn (server.py).
Never imports torch or `varco.workers`.
"""

from varco.gateway.app import create_app

__all__ = ["create_app"]
