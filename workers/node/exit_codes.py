"""Exit codes a worker child uses to tell the supervisor why it stopped (the BSD sysexits values)."""

from __future__ import annotations

# It can never start as configured (the worker extra is missing, a setting is invalid): do not retry.
CANNOT_START = 78  # EX_CONFIG
# Loading the model failed; it may work next time (a hub or disk hiccup), so a few tries are made.
LOAD_FAILED = 75  # EX_TEMPFAIL
# Tries at loading the model before the supervisor gives up.
MAX_LOAD_FAILURES = 3
