"""Schemathesis against the live gateway's own /openapi.json: no 5xx, every response as documented."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import GATEWAY_KEYS, running_gateway

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.parameters import ParameterLocation  # noqa: E402
from schemathesis.generation.modes import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    allow_header_conformance,
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES = 25  # per operation and mode: about a minute in all here
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    missing_required_header,
    allow_header_conformance,
]
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema_gateway(gateway_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # Redis database 1: the generated jobs are enqueued for real, and no worker ever runs them.
    broker = gateway_env["VARCO_BROKER_URL"].rsplit("/", 1)[0] + "/1"
    env = {**gateway_env, "VARCO_BROKER_URL": broker}
    with running_gateway(env, tmp_path_factory.mktemp("logs") / "gateway-schema.log") as base:
        yield base


@pytest.fixture(scope="module")
def live_schema(schema_gateway: str):
    return schemathesis.openapi.from_url(schema_gateway + "/openapi.json")


# schemathesis' pytest plugin (from_fixture) does not run under pytest 9, so each operation's strategy is
# driven by hypothesis here: positive (schema-conforming) and negative (schema-violating) requests alike.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_matches_the_openapi_document(live_schema, mode: GenerationMode) -> None:
    headers = {"Authorization": f"Bearer {GATEWAY_KEYS[0]}"}
    operations = [result.ok() for result in live_schema.get_all_operations()]
    assert len(operations) >= 11

    for operation in operations:
        inputs = [operation.path_parameters, operation.query, operation.headers, operation.body]
        if mode is GenerationMode.NEGATIVE and not any(len(part) for part in inputs):
            continue  # nothing to get wrong (/livez, /metrics…)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
            derandomize=True,
        )  # the same examples on every CI run; `make fuzz` explores
        def check(case) -> None:
            case.call_and_validate(headers=credentials_for(case, headers), checks=CHECKS, timeout=30)

        check()


def credentials_for(case, valid: dict[str, str]) -> dict[str, str] | None:
    """The valid key, unless this case's negation is in its headers (the credentials themselves). Sending the
    key there would undo the case's only fault, and an extra query parameter beside it would then be reported
    as schema-violating data accepted (which schemathesis otherwise excuses)."""
    header = case.meta.components.get(ParameterLocation.HEADER) if case.meta else None
    return None if header is not None and header.mode is GenerationMode.NEGATIVE else valid


def test_the_schemathesis_cli_with_every_check_passes(schema_gateway: str) -> None:
    """`st run --checks all` as a user would run it (its phases: coverage, fuzzing, stateful), with the
    repository's schemathesis.toml."""
    auth = f"Authorization: Bearer {GATEWAY_KEYS[0]}"
    command = [sys.executable, "-m", "schemathesis.cli", "run", schema_gateway + "/openapi.json", "--checks", "all",
               "--max-examples", "10", "--seed", "1", "--no-color", "-H", auth]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
