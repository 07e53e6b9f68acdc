"""The HTTP gateway over `Client` (FastAPI), overlays and the job page; installed as `varco.gateway`.

Needs the `gateway` extra; never imports torch or `varco.workers`.
"""
