"""Tenants: who a job belongs to, and the weights that share the GPU slots among them.

A tenant is a name (`teamA`; through the gateway, an API key's name, or the key's id for a nameless key).
Names are one namespace for every side, so `tenant="teamA"` in Python and the gateway key `teamA:…` share
one share and one limit. `VARCO_TENANT_WEIGHTS=teamA=3,teamB=1` weighs them; unlisted tenants weigh 1.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

DEFAULT_TENANT = "default"
DEFAULT_WEIGHT = 1.0
# Tenant names become part of Redis keys and metric labels: short, and never a ':' or a '/'.
TENANT_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
_TENANT = re.compile(TENANT_PATTERN)


class InvalidTenant(ValueError):
    """A tenant name that does not match TENANT_PATTERN."""


def check_tenant(value: object) -> str:
    """`value` if it is a valid tenant name; InvalidTenant otherwise."""
    if not isinstance(value, str) or _TENANT.fullmatch(value) is None:
        raise InvalidTenant(f"tenant must be 1-64 of A-Z a-z 0-9 _ . - (not starting with _ . -), got {value!r:.80}")
    return value


def parse_weights(text: str) -> dict[str, float]:
    """`teamA=3,teamB=1` -> {"teamA": 3.0, "teamB": 1.0}; ValueError saying which entry is wrong."""
    weights: dict[str, float] = {}
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not weight > 0 or weight == float("inf"):
            raise ValueError(f"tenant weight {entry!r} must read name=number with a number above 0")
        weights[check_tenant(name.strip())] = weight
    return weights


def weight_of(weights: Mapping[str, float], tenant: str) -> float:
    return weights.get(tenant, DEFAULT_WEIGHT)


OTHER_TENANTS = "other"
MAX_LABELLED_TENANTS = 20


def metric_label(tenant: str, weights: Mapping[str, float]) -> str:
    """A bounded metric label: `default` and the first MAX_LABELLED_TENANTS weighted tenants by name keep their
    name, every other tenant is `other` (a label per API key would grow without bound)."""
    if tenant == DEFAULT_TENANT or tenant in sorted(weights)[:MAX_LABELLED_TENANTS]:
        return tenant
    return OTHER_TENANTS
