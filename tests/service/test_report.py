"""GET /v1/jobs/{id}/report over real HTTP (the comparison view's data), and the progress stages the schema names.

The finished jobs are real: compressed and evaluated with `run_job` on a tiny model (about a second each), stored
SUCCEEDED with their summaries (pbs2p_testing/finished.py); the service runs without a dispatcher."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pbs2p.service.api.schemas import Progress
from pbs2p.service.client import ApiError, Client
from pbs2p.service.jobrecords import JobState
from pbs2p.testing.finished import Finished, add_finished_job
from pbs2p.testing.servers import Service, running_service
from pbs2p.testing.tiny import make_model, save_tokenizer, write_text

ROOT = Path(__file__).resolve().parents[2]
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("report_models")
    make_model(root / "tiny", layers=2)
    save_tokenizer(root / "tiny")
    write_text(root / "calib.txt", docs=8)
    with running_service(tmp_path_factory.mktemp("report_data"), root) as service:
        yield service


@pytest.fixture(scope="module")
def done(svc: Service, tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """A job of tenant `owner` that SUCCEEDED (CFS allocation, with the one-shot error before SPBO)."""
    out = tmp_path_factory.mktemp("report_out") / "artifact"
    return add_finished_job(
        svc.store, "owner", "cfs-5of8", svc.root / "tiny", svc.root / "calib.txt", out,
        pattern="5:8", allocation="cfs", spbo_report=True,
    )  # fmt: skip


def problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body: dict[str, Any] = resp.json()
    assert body["status"] == status and body["detail"] and body["request_id"]
    return body


def test_the_report_of_a_finished_job(svc: Service, done: Finished) -> None:
    resp = httpx.get(f"{svc.url}/v1/jobs/{done.id}/report", headers=svc.key("owner"))
    assert resp.status_code == 200, resp.text
    report = resp.json()
    want = done.summary
    assert (report["job"], report["name"], report["method"], report["pattern"], report["allocation"]) == (
        done.id, "cfs-5of8", "pbs2p", "5:8", "cfs",
    )  # fmt: skip
    assert report["metrics"] == want["metrics"]  # perplexity before/after, bits, the mean layer error, eval facts
    assert report["metrics"]["ppl_after"] > 0 and report["metrics"]["true_bits"] > 0
    assert report["timings"] == want["timings"]
    assert [b["n_keep"] for b in report["blocks"]] == [b["n_keep"] for b in want["blocks"]]
    assert sum(b["n_keep"] for b in report["blocks"]) == 5 * len(report["blocks"])  # CFS keeps the average
    for got, b in zip(report["blocks"], want["blocks"], strict=True):
        assert got["cosine"] == b["cosine"] and got["cosine"] is not None
        assert [(lr["name"], lr["rel_error"], lr["rel_error_oneshot"]) for lr in got["linears"]] == [
            (lr["name"], lr["rel_error"], lr["rel_error_oneshot"]) for lr in b["linears"]
        ]
        assert all(lr["rel_error_oneshot"] is not None and lr["bits"]["true_bits"] > 0 for lr in got["linears"])
    client = Client(svc.url, svc.store.create_key("owner"))
    try:
        assert client.report(done.id) == report  # the Python client's
    finally:
        client.close()
    job = httpx.get(f"{svc.url}/v1/jobs/{done.id}", headers=svc.key("owner")).json()
    assert report["blocks"] == job["report"]["blocks"] and report["metrics"] == job["metrics"]

    # retention removes the artifact, not the report
    assert svc.store.mark_artifact_expired(done.id)
    problem(httpx.get(f"{svc.url}/v1/jobs/{done.id}/artifact", headers=svc.key("owner")), 410)
    again = httpx.get(f"{svc.url}/v1/jobs/{done.id}/report", headers=svc.key("owner"))
    assert again.status_code == 200 and again.json() == report


def test_another_tenants_job_and_a_missing_one_are_404(svc: Service, done: Finished) -> None:
    other = problem(httpx.get(f"{svc.url}/v1/jobs/{done.id}/report", headers=svc.key("intruder")), 404)
    missing = problem(httpx.get(f"{svc.url}/v1/jobs/job_nope/report", headers=svc.key("owner")), 404)
    assert other["title"] == missing["title"]  # another tenant's job is indistinguishable from no job
    assert other["detail"] == f"no job {done.id}" and "cfs-5of8" not in str(other)
    problem(httpx.get(f"{svc.url}/v1/jobs/{done.id}/report"), 401)
    problem(httpx.get(f"{svc.url}/v1/jobs/bad%20id/report", headers=svc.key("owner")), 422)


def test_a_job_without_a_report_is_409(svc: Service) -> None:
    auth = svc.key("waiting")
    model = str(svc.root / "tiny")
    ids = {}
    for state in (JobState.QUEUED, JobState.RUNNING, JobState.FAILED, JobState.CANCELLED):
        job, _ = svc.store.create_job("waiting", model, {}, None, state.value.lower(), None)
        if state != JobState.QUEUED:
            extra = {"error": "RuntimeError: boom"} if state == JobState.FAILED else {}
            assert svc.store.transition(job.id, [JobState.QUEUED], state, **extra)
        ids[state] = job.id
    for state, job_id in ids.items():
        body = problem(httpx.get(f"{svc.url}/v1/jobs/{job_id}/report", headers=auth), 409)
        assert state.value in body["detail"] and "SUCCEEDED" in body["detail"]
    client = Client(svc.url, svc.store.create_key("waiting"))
    try:
        with pytest.raises(ApiError) as err:
            client.report(ids[JobState.QUEUED])
    finally:
        client.close()
    assert err.value.status == 409 and "QUEUED" in str(err.value)


def test_the_report_route_is_typed_in_openapi(svc: Service) -> None:
    spec = httpx.get(f"{svc.url}/openapi.json").json()
    op = spec["paths"]["/v1/jobs/{job_id}/report"]["get"]
    assert op["operationId"] == "get_job_report"
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/JobReport"}
    assert {"401", "404", "409", "422"} <= set(op["responses"])
    schemas = spec["components"]["schemas"]
    assert {"blocks", "metrics", "pattern", "method"} <= set(schemas["JobReport"]["properties"])
    assert {"n_keep", "linears", "cosine"} <= set(schemas["BlockResult"]["properties"])
    assert {"rel_error", "rel_error_oneshot", "bits"} <= set(schemas["LinearResult"]["properties"])


def written_stages() -> set[str]:
    """Every stage a job's progress can hold, from the code that writes it: `progress("stage", ...)` calls in
    workers/ and service/, and `{"stage": "..."}` dicts (the dispatcher's done and retrying, the store's requeued)."""
    found: set[str] = set()
    for path in [*(ROOT / "workers").rglob("*.py"), *(ROOT / "service").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name == "progress" and isinstance(node.args[0].value, str):
                    found.add(node.args[0].value)
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "stage" and isinstance(v, ast.Constant):
                        found.add(str(v.value))
    return found


def test_the_schema_names_every_progress_stage() -> None:
    stages = written_stages()
    assert {"prepare", "downloading", "compress", "evaluate", "upload", "done", "retrying", "requeued"} <= stages
    description = Progress.model_fields["stage"].description or ""
    named = set(re.findall(r"[a-z]+", description))
    assert stages <= named, f"stages the schema's Progress.stage does not name: {sorted(stages - named)}"
