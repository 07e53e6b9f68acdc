"""FastAPI dependencies: who is calling (Bearer key or a page token), their rate limit, and job ownership.

Another key's job answers 404 exactly like an unknown one, so job ids cannot be probed across keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from varco.gateway.problems import Problem
from varco.gateway.ratelimit import retry_after
from varco.gateway.state import GatewayState, gateway
from varco.tasks.job_ids import JOB_ID_PATTERN
from varco.tasks.schemas import JobStatus
from varco.tasks.tenants import DEFAULT_TENANT

ANONYMOUS = "anonymous"  # the caller under --no-auth (one rate-limit bucket)
JobId = Annotated[str, Path(pattern=f"^{JOB_ID_PATTERN}$", description="the job id `POST /v1/jobs` returned")]
_bearer = HTTPBearer(auto_error=False, description="an API key from VARCO_API_KEYS / VARCO_API_KEYS_FILE")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def _unauthorized(detail: str) -> Problem:
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="varco"'})


def rate_limit(state: GatewayState, caller: str, whose: str = "this key") -> None:
    if state.limiter is not None and (wait_s := state.limiter.acquire(caller)) > 0:
        raise Problem(
            429, "rate-limited", f"over VARCO_RATE_LIMIT ({state.limiter.rate:g} requests/s) for {whose}",
            headers={"Retry-After": retry_after(wait_s)},
        )  # fmt: skip


@contextmanager
def failures_limited(request: Request) -> Iterator[None]:
    """Failed authentications inside the block are rate limited per client address (no key to charge):
    past VARCO_RATE_LIMIT a wrong key, token or missing header gets 429 instead of 401, so keys cannot
    be guessed at full speed. Behind a proxy the address is the one uvicorn trusts (X-Forwarded-For)."""
    try:
        yield
    except Problem as exc:
        if exc.status == 401:
            address = request.client.host if request.client else "unknown"
            rate_limit(gateway(request), f"address:{address}", "this client address")
        raise


def key_from_bearer(state: GatewayState, credentials: HTTPAuthorizationCredentials | None) -> str:
    """The caller's key id; raises 401. Under --no-auth everyone is ANONYMOUS."""
    if state.keys is None:
        return ANONYMOUS
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    caller = state.keys.match(credentials.credentials)
    if caller is None:
        raise _unauthorized("unknown API key")
    return caller


async def caller(request: Request, credentials: Bearer) -> str:
    """The key id of an API call (rate limited)."""
    state = gateway(request)
    with failures_limited(request):
        who = key_from_bearer(state, credentials)
    rate_limit(state, who)
    return who


async def job_caller(
    request: Request,
    job_id: JobId,
    credentials: Bearer,
    token: Annotated[str | None, Query(max_length=200, description="a job page's token (GET only)")] = None,
) -> str:
    """Like `caller`, but a job page's signed token for this very job also authenticates (GET only)."""
    state = gateway(request)
    with failures_limited(request):
        if credentials is None and token is not None and state.keys is not None and request.method == "GET":
            who = state.keys.verify_page_token(token, job_id)
            if who is None:
                raise _unauthorized("page token is invalid or expired: reload the page with the API key")
        else:
            who = key_from_bearer(state, credentials)
    rate_limit(state, who)
    return who


def tenant_of(state: GatewayState, who: str) -> str:
    """The tenant a caller's jobs belong to: its key's name, or its key id (`default` under --no-auth)."""
    return state.keys.tenant(who) if state.keys is not None else DEFAULT_TENANT


def not_found(job_id: str) -> Problem:
    return Problem(404, "job-not-found", f"no such job: {job_id}")


async def owned_status(state: GatewayState, job_id: str, who: str) -> JobStatus:
    """The job's status when `who` may see it; 404 for an unknown job and for another key's job alike."""
    status = await state.statuses.get_owned(job_id, who if state.keys is not None else None)
    if status is None:
        raise not_found(job_id)
    return status
