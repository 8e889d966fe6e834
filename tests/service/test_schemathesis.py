"""Property-based tests of the HTTP API from its own OpenAPI spec (schemathesis), over real HTTP with a valid API key:
no request may cause a 5xx, and every response must conform to the documented status codes, media types and
schemas. A bounded, derandomized number of examples per operation keeps it fast and repeatable."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis import Case
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pbs2p.core.config import CompressionConfig
from pbs2p.service.api import create_app
from pbs2p.service.jobstore import JobState, JobStore
from pbs2p.service.settings import Settings
from pbs2p.testing.servers import Service, running_service
from pbs2p.workers.storage import LocalStorage

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("roots")
    (root / "calib.txt").write_text("w1 w2 w3\n")
    with running_service(tmp_path_factory.mktemp("data"), root) as svc:
        yield svc


@pytest.fixture(scope="module")
def api_key(service: Service) -> dict[str, str]:
    return service.key("fuzz")


def spec_of_the_app() -> dict[str, Any]:
    """The app's OpenAPI spec, built in-process at import (schemathesis parametrizes tests at collection time, and its
    fixture-based lazy loading does not work with this pytest); the test checks the running app serves the same."""
    with tempfile.TemporaryDirectory() as tmp:
        store = JobStore("sqlite://")
        try:
            return create_app(Settings(data_dir=Path(tmp)), store, LocalStorage(tmp)).openapi()
        finally:
            store.close()


SPEC = spec_of_the_app()
# The event stream of a job that never ends would never end; it is tested in test_api.py.
schema = schemathesis.openapi.from_dict(SPEC).exclude(path_regex=r"/events$")


@schema.parametrize()
@settings(
    max_examples=20,
    derandomize=True,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_conforms_to_its_schema(case: Case, service: Service, api_key: dict[str, str]) -> None:
    case.call_and_validate(base_url=service.url, headers=api_key, checks=CHECKS, timeout=20)


def test_the_running_app_serves_the_tested_spec(service: Service) -> None:
    served = httpx.get(f"{service.url}/openapi.json").json()
    assert served == SPEC
    assert served["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    problem_ref = {"$ref": "#/components/schemas/ProblemDetails"}
    for path, item in served["paths"].items():
        for method, operation in item.items():
            if path.startswith("/v1/"):
                assert operation["security"] == [{"HTTPBearer": []}], (method, path)
                assert {"401", "422"} <= set(operation["responses"]), (method, path)
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")):
                    assert response["content"] == {"application/problem+json": {"schema": problem_ref}}
    submit_codes = set(served["paths"]["/v1/jobs"]["post"]["responses"])
    assert {"200", "201", "400", "401", "409", "413", "422", "429", "500"} == submit_codes


def test_fuzzed_jobs_hold_valid_configs(service: Service) -> None:
    """Whatever the fuzzer got past the edge is a job the dispatcher can run: a known state, a config that the
    core rebuilds as is, and readable through the API."""
    jobs, _ = service.store.list_jobs("fuzz", limit=10_000)
    headers = {"Authorization": "Bearer " + service.store.create_key("fuzz")}
    for job in jobs:
        assert job.state in (JobState.QUEUED, JobState.CANCELLED)
        assert CompressionConfig.from_dict(job.config).to_dict() == job.config
        assert httpx.get(f"{service.url}/v1/jobs/{job.id}", headers=headers).status_code == 200
    assert httpx.get(f"{service.url}/healthz").status_code == 200
