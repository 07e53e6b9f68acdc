"""API keys: loading, constant-time matching, the key id recorded on jobs, and signed page tokens.

A job records the id of the key that submitted it (a short hash, never the key). The job page cannot
send an Authorization header from an <img> or an EventSource, so its sub-requests carry a token
signed with the key itself: scoped to one job, expiring after PAGE_TOKEN_TTL_S. Any gateway replica
holding the same keys can verify it, and a leaked token exposes one job's page for minutes, not the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Iterable
from pathlib import Path

from varco.tasks.settings import Settings
from varco.tasks.tenants import TENANT_PATTERN

PAGE_TOKEN_TTL_S = 15 * 60
# `{key id}.{expiry}.{signature}` exactly as page_token writes it: ASCII hex, digits without a leading zero,
# unpadded base64url. One spelling per token, so no other form of a signed expiry is accepted.
_PAGE_TOKEN = re.compile(r"([0-9a-f]{16})\.([1-9][0-9]{0,11})\.([A-Za-z0-9_-]{43})", re.ASCII)


def key_id(key: str) -> str:
    """The id recorded on jobs: 16 hex digits of a domain-separated SHA-256 of the key."""
    return hashlib.sha256(b"varco-api-key:" + key.encode()).hexdigest()[:16]


def load_keys(settings: Settings) -> list[str]:
    """VARCO_API_KEYS (comma-separated) plus VARCO_API_KEYS_FILE (one per line, # comments)."""
    keys = [k.get_secret_value().strip() for k in settings.api_keys]
    if settings.api_keys_file is not None:
        for line in Path(settings.api_keys_file).read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append(line)
    return [k for k in keys if k]


def split_named_key(entry: str) -> tuple[str | None, str]:
    """`name:key` -> (name, key): the name is the key's tenant. An entry whose part before the first ':' is no
    tenant name (tasks/tenants.py) is a key without a name: (None, entry)."""
    name, sep, key = entry.partition(":")
    if sep and key and re.fullmatch(TENANT_PATTERN, name):
        return name, key
    return None, entry


class KeyRing:
    def __init__(self, keys: Iterable[str]) -> None:
        """`keys`: VARCO_API_KEYS entries, each a key or `name:key`."""
        named = [split_named_key(entry) for entry in keys]
        # A named key's tenant is its name; a nameless key is a tenant of its own, named by its key id.
        self._tenants = {key_id(k): name or key_id(k) for name, k in named}
        # Digests have one length, so comparing them leaks nothing about a key's length either.
        self._by_id = {key_id(k): k for _, k in named}
        self._digests = [(kid, hashlib.sha256(k.encode()).digest()) for kid, k in self._by_id.items()]

    def __len__(self) -> int:
        return len(self._by_id)

    def tenant(self, kid: str) -> str:
        """The tenant of the key with id `kid` (docs/tenants.md)."""
        return self._tenants[kid]

    def match(self, presented: str) -> str | None:
        """The key id of `presented`, or None. Every key is compared, in constant time."""
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for kid, known in self._digests:
            if hmac.compare_digest(digest, known):
                found = kid
        return found

    def page_token(self, kid: str, job_id: str, now: float | None = None) -> str:
        expires = int((now or time.time()) + PAGE_TOKEN_TTL_S)
        return f"{kid}.{expires}.{self._sign(kid, job_id, expires)}"

    def verify_page_token(self, token: str, job_id: str, now: float | None = None) -> str | None:
        """The key id a valid, unexpired token for `job_id` was signed with, else None."""
        if (parts := _PAGE_TOKEN.fullmatch(token)) is None:
            return None
        kid, expires_text, signature = parts.groups()
        if kid not in self._by_id:
            return None
        expires = int(expires_text)
        if expires < (now or time.time()):
            return None
        return kid if hmac.compare_digest(signature, self._sign(kid, job_id, expires)) else None

    def _sign(self, kid: str, job_id: str, expires: int) -> str:
        mac = hmac.new(self._by_id[kid].encode(), f"page:{job_id}:{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")
