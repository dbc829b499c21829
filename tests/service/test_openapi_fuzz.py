"""Schemathesis against the real server: every documented operation, with generated bodies.

Bodies come from the OpenAPI document (multipart files, JSON and .npy tensors, V2 JSON and binary),
so this doubles as a check that the document describes the real inputs: zero server errors, and
every response's status, content type, headers and body must be what the document says.
(Schemathesis' pytest plugin does not load under this pytest, so Hypothesis drives each operation's
strategy directly; the checks are schemathesis' own.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.app import create_app
from service.settings import Settings
from tests.liveserver import LiveServer, live_server
from tests.tinymodel import MODEL_NAME, tiny_settings

EXAMPLES_PER_OPERATION = 30
# The document is the app's own; building the app loads no model, so it can be read at collection.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(providers=["cpu"])).openapi())
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}


@pytest.fixture(scope="module")
def fuzzed_server(model_repository: Path) -> Iterator[LiveServer]:
    settings = tiny_settings(model_repository, max_upload_bytes=256 * 1024)
    with live_server(settings) as live:
        yield live


@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_generated_requests_get_no_server_error_and_documented_responses(
    label: str, fuzzed_server: LiveServer
) -> None:
    session = requests.Session()
    statuses: list[int] = []

    @given(case=OPERATIONS[label].as_strategy(), data=st.data())
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,  # the same examples every run: a failure here is a real, reproducible one
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def exercise(case: schemathesis.Case, data: st.DataObject) -> None:
        # Random model names would all end in 404 before any body is read: aim most examples at the
        # served model so the generated bodies reach the parsers.
        if data.draw(st.booleans(), label="served model"):
            if case.path_parameters and "model_name" in case.path_parameters:
                case.path_parameters = {**case.path_parameters, "model_name": MODEL_NAME}
                if "model_version" in case.path_parameters:
                    case.path_parameters["model_version"] = "1"
            if case.query and "model" in case.query:
                case.query = {**case.query, "model": MODEL_NAME, "version": 1}
        # Schema-valid is not enough to be accepted: random bytes are rarely a decodable image and random
        # arrays rarely have the model's shape, so 4xx for them is right; every other check applies.
        response = case.call_and_validate(
            base_url=fuzzed_server.url,
            session=session,
            excluded_checks=[positive_data_acceptance],
            timeout=30,
        )
        statuses.append(response.status_code)

    exercise()
    assert statuses and all(status < 500 for status in statuses)
