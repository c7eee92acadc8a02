"""Schemathesis against the OpenAPI document the API serves: generated requests to every operation get no
5xx, every answer matches its declared status and schema, and a request without the token is refused."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.specs.openapi.checks import (ignored_auth, response_schema_conformance,
                                               status_code_conformance)
from schemathesis.checks import not_a_server_error

from heygem_daemon.state import Store
from heygem_daemon.web.tokens import SCOPES, create_token
from web_rig import WebServer, console_config

CHECKS = [not_a_server_error, status_code_conformance, response_schema_conformance, ignored_auth]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    base = tmp_path_factory.mktemp("api-schema")
    server = WebServer(console_config(base, max_upload_mb=1, api_multipart_mb=1,
                                      api_requests_per_minute=100_000)).start()
    store = Store(server.cfg.folder("state") / "heygem.db")
    store.jobs.create("known job", {})  # one job the generated refs may hit
    server.token = create_token(store, "fuzz", "carol", SCOPES)
    yield server
    server.stop()


def test_every_operation_answers_as_its_schema_says_and_requires_the_token(served):
    schema = schemathesis.openapi.from_url(served.url + "/api/v1/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck), database=None)
        def conforms(case: schemathesis.Case) -> None:
            case.call_and_validate(headers={"Authorization": f"Bearer {served.token}"}, checks=CHECKS)
        conforms()
