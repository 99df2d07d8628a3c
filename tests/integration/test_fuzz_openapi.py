"""Schemathesis against the live server's own OpenAPI schema: every operation, generated
requests (schema-valid and schema-violating), every response checked.

Checks (schemathesis' defaults): no 5xx; the status code, content type, headers and body of
every response are the ones the schema declares (SSE events included: each `data:` must hold
the declared event or error JSON); schema-violating requests are rejected with a 4xx; an
undeclared method is a 405. Left out: `positive_data_acceptance` (a schema-valid request
must succeed), since what JSON Schema cannot express (prompt length against the model, the
cross-field rules of generate) is a documented 422; and `unsupported_method` on `/`, where
GET is the playground's redirect, outside the API schema.

The fuzz server shares the session server's model and engine but allows only
FUZZ_TOTAL_TOKENS positions, so every generated request is quick. The default run skips
schemathesis' coverage phase (about a thousand boundary cases per operation); the slow test
runs it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance, unsupported_method
from schemathesis.config import (
    CoveragePhaseConfig,
    OutputConfig,
    PhasesConfig,
    ProjectConfig,
    ProjectsConfig,
    SanitizationConfig,
    SchemathesisConfig,
)

from tests.integration.conftest import LiveServer, start_server, stop_server

FUZZ_TOTAL_TOKENS = 24  # prompt + output: each generated request costs a few forward passes
MAX_EXAMPLES = 25  # per operation


@pytest.fixture(scope="module")
def fuzz_server(live_server: LiveServer) -> Iterator[LiveServer]:
    base = live_server.state
    limits = {"max_total_tokens": FUZZ_TOTAL_TOKENS, "max_input_tokens": FUZZ_TOTAL_TOKENS - 4}
    fuzz_settings = base.settings.model_copy(update=limits)
    live = start_server(fuzz_settings, dataclasses.replace(base, settings=fuzz_settings, **limits))
    try:
        yield live
    finally:
        stop_server(live)


def load_schema(server: LiveServer, *, coverage: bool) -> schemathesis.BaseSchema:
    phases = PhasesConfig(coverage=CoveragePhaseConfig(enabled=coverage))
    config = SchemathesisConfig(
        # Reports show the real request (the default masks fields named like `*token*`).
        output=OutputConfig(sanitization=SanitizationConfig(enabled=False)),
        projects=ProjectsConfig(default=ProjectConfig(phases=phases)),
    )
    return schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", config=config)


@pytest.fixture(scope="module")
def api_schema(fuzz_server: LiveServer) -> schemathesis.BaseSchema:
    return load_schema(fuzz_server, coverage=False)


@pytest.fixture(scope="module")
def api_schema_coverage(fuzz_server: LiveServer) -> schemathesis.BaseSchema:
    return load_schema(fuzz_server, coverage=True)


def call_and_check(case: schemathesis.Case) -> None:
    excluded = [positive_data_acceptance]
    if case.path == "/":
        excluded.append(unsupported_method)
    case.call_and_validate(excluded_checks=excluded)


FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck)
)
schema = schemathesis.pytest.from_fixture("api_schema")
schema_coverage = schemathesis.pytest.from_fixture("api_schema_coverage")


@schema.parametrize()
@FUZZ_SETTINGS
def test_every_operation_conforms(case: schemathesis.Case) -> None:
    call_and_check(case)


@pytest.mark.slow
@schema_coverage.parametrize()
@FUZZ_SETTINGS
def test_every_operation_conforms_with_boundary_cases(case: schemathesis.Case) -> None:
    call_and_check(case)
