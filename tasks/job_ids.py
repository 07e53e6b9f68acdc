"""The one pattern a job id must match wherever it becomes a Redis key, a store path or a task id.

Ids the Client makes are uuid4 hex (32 characters); the pattern also admits dashed uuids and other
short opaque ids, and nothing that can climb out of a directory or a key prefix (no `.`, `/`, `:`).
"""

from __future__ import annotations

import re

JOB_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
_JOB_ID = re.compile(JOB_ID_PATTERN)


class InvalidJobId(ValueError):
    """A job id that does not match JOB_ID_PATTERN; no job can have it."""


def is_valid_job_id(value: object) -> bool:
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


def check_job_id(value: object) -> str:
    """`value` if it is a valid job id; InvalidJobId otherwise."""
    if not is_valid_job_id(value):
        raise InvalidJobId(f"not a valid job id (1-64 of A-Z a-z 0-9 _ -, not starting with _ or -): {value!r:.80}")
    return value  # type: ignore[return-value]
