"""The HTTP API (service/app.py) over real HTTP: uvicorn on 127.0.0.1 in a background thread, httpx as the client,
a SQLite store and local artifact storage, a Hugging Face-compatible hub on loopback (pbs2p_testing/hub.py); no
dispatcher (jobs are moved through their states with the store)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from pbs2p.core.config import CompressionConfig
from pbs2p.service import lifecycle
from pbs2p.service.api.deps import KEY_CACHE_S
from pbs2p.service.api.schemas import JobPublic, JobSummary
from pbs2p.service.cli import main as cli_main
from pbs2p.service.client import ApiError, Client
from pbs2p.service.jobrecords import JobRow, JobState, encode_cursor
from pbs2p.testing.hub import LocalHub, model_files, serve_hub
from pbs2p.testing.servers import Service, running_service
from pbs2p.testing.tiny import make_model, save_tokenizer

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(allowed model root, a directory outside it), with a tiny model, text files and traps."""
    base = tmp_path_factory.mktemp("api")
    root, outside = base / "root", base / "outside"
    make_model(root / "model", layers=2)
    save_tokenizer(root / "model")
    (root / "calib.txt").write_text("w1 w2 w3\n\nw4 w5 w6\n")
    (root / "eval.jsonl").write_text(json.dumps({"text": "w1 w2"}) + "\n")
    (root / "pickled").mkdir()
    (root / "pickled" / "config.json").write_text("{}")
    (root / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    shutil.copytree(root / "model", outside / "model")
    (outside / "calib.txt").write_text("w1 w2\n")
    (root / "escape").symlink_to(outside / "model", target_is_directory=True)
    return root, outside


HUB_MODEL = "example-org/tiny"


@pytest.fixture(scope="module")
def hub(dirs: tuple[Path, Path]) -> Iterator[LocalHub]:
    """The service's hub: `example-org/tiny` (the tiny model at main and tag v1) and a pickle-only repo."""
    with serve_hub() as h:
        h.add_commit(HUB_MODEL, model_files(dirs[0] / "model"), refs=("main", "v1"))
        config = json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}).encode()
        h.add_commit("example-org/pickled", {"config.json": config, "pytorch_model.bin": b"not a pickle"})
        yield h


@pytest.fixture(scope="module")
def svc(dirs: tuple[Path, Path], hub: LocalHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    data = tmp_path_factory.mktemp("data")
    with running_service(data, dirs[0], hf_endpoint=hub.url, cache_dir=data / "cache") as service:
        yield service


@pytest.fixture
def client(svc: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=svc.url, timeout=20) as c:
        yield c


_tenants = iter(range(10**6))


@pytest.fixture
def auth(svc: Service) -> dict[str, str]:
    """Headers of a fresh tenant (tests share one server; a new tenant sees only its own jobs)."""
    return svc.key(f"tenant-{next(_tenants)}")


def problem(resp: httpx.Response, status: int) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert body["status"] == status and body["title"] and body["detail"]
    return body


def model_path(svc: Service) -> str:
    return str(svc.root / "model")


def submit(client: httpx.Client, auth: dict[str, str], svc: Service, **body: Any) -> dict[str, Any]:
    resp = client.post("/v1/jobs", json={"model": model_path(svc), **body}, headers=auth)
    assert resp.status_code == 201, resp.text
    return resp.json()


# -- auth and tenants -----------------------------------------------------------------------------------------
def test_unauthenticated_requests_get_401_problems(svc: Service, client: httpx.Client) -> None:
    revoked = svc.store.create_key("gone")
    assert svc.store.revoke_key(revoked[:12]) == 1
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer pbs2p_not-a-real-key"},
        {"Authorization": f"Bearer {revoked}"},
    ):
        for method, path in (("GET", "/v1/jobs"), ("GET", "/v1/jobs/job_x"), ("POST", "/v1/jobs/job_x/cancel")):
            resp = client.request(method, path, headers=headers)
            body = problem(resp, 401)
            assert resp.headers["www-authenticate"] == "Bearer"
            assert "Bearer" in body["detail"] or "not valid" in body["detail"]
        resp = client.post("/v1/jobs", json={"model": model_path(svc)}, headers=headers)
        problem(resp, 401)
    assert svc.store.list_jobs("gone") == ([], None)


def test_a_revoked_key_is_refused_within_the_key_cache_time(svc: Service, client: httpx.Client) -> None:
    """A key the API has seen (and remembers) stops working at most KEY_CACHE_S after `pbs2p keys revoke`."""
    key = svc.store.create_key("revokes")
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/jobs", headers=headers).status_code == 200  # now remembered
    assert svc.store.revoke_key(key[:12]) == 1
    revoked = time.monotonic()
    while (resp := client.get("/v1/jobs", headers=headers)).status_code == 200:
        assert time.monotonic() - revoked < KEY_CACHE_S + 1.0, "the revoked key still works"
        time.sleep(0.1)
    assert "not valid" in problem(resp, 401)["detail"]
    assert problem(client.get("/v1/jobs", headers=headers), 401)  # and stays refused (forgotten, read again)


def test_another_tenants_job_looks_missing(svc: Service, client: httpx.Client, auth: dict[str, str]) -> None:
    job = submit(client, auth, svc)
    other = svc.key("someone-else")
    missing = "job_" + "0" * 24
    for suffix, method in (("", "GET"), ("/cancel", "POST"), ("/artifact", "GET"), ("/events", "GET")):
        theirs = problem(client.request(method, f"/v1/jobs/{job['id']}{suffix}", headers=other), 404)
        nothing = problem(client.request(method, f"/v1/jobs/{missing}{suffix}", headers=other), 404)
        theirs["request_id"] = nothing["request_id"] = "RID"  # each request's own
        assert json.dumps(theirs).replace(job["id"], "ID") == json.dumps(nothing).replace(missing, "ID")
    assert client.get("/v1/jobs", headers=other).json()["jobs"] == []
    assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["state"] == "QUEUED"  # untouched


# -- body size ------------------------------------------------------------------------------------------------
def test_oversized_bodies_get_413(svc: Service, client: httpx.Client, auth: dict[str, str]) -> None:
    limit = svc.settings.max_body_bytes
    big = json.dumps({"model": model_path(svc), "name": "x" * (limit + 10)}).encode()
    problem(client.post("/v1/jobs", content=big, headers={**auth, "Content-Type": "application/json"}), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent with Transfer-Encoding: chunked
        for i in range(0, len(big), 4096):
            yield big[i : i + 4096]

    resp = client.post("/v1/jobs", content=chunks(), headers={**auth, "Content-Type": "application/json"})
    assert resp.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in resp.request.headers
    body = problem(resp, 413)
    assert str(limit) in body["detail"] and "PBS2P_MAX_BODY_BYTES" in body["detail"]
    assert client.get("/v1/jobs", headers=auth).json()["jobs"] == []  # nothing was created
    # a body just under the limit is read normally (and refused for its content, not its size)
    small = json.dumps({"model": model_path(svc), "name": "x" * 150}).encode()
    assert client.post("/v1/jobs", content=small, headers={**auth, "Content-Type": "application/json"}).status_code in (
        201,
        422,
    )


# -- validation -----------------------------------------------------------------------------------------------
Case = Callable[[Path, Path], dict[str, Any]]
M = "ROOT/model"  # replaced by the real path
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    # (case id, body (ROOT / OUTSIDE replaced), field named, words of the message that say what to do)
    ("unknown-config-field", {"model": M, "config": {"colour": "red"}}, "config.colour", "remove it"),
    ("pattern-9:8", {"model": M, "config": {"pattern": "9:8"}}, "config.pattern", "use N < M"),
    ("pattern-abc", {"model": M, "config": {"pattern": "abc"}}, "config.pattern", "pattern"),
    ("pattern-1:17", {"model": M, "config": {"pattern": "1:17"}}, "config.pattern", "between 2 and 16"),
    ("spbo-steps-too-large", {"model": M, "config": {"spbo_steps": 99}}, "config.spbo_steps", "less than or equal"),
    ("spbo-steps-above-m-n", {"model": M, "config": {"spbo_steps": 5}}, "config.spbo_steps", "between 1 and M - N"),
    ("block-size", {"model": M, "config": {"block_size": 100}}, "config.block_size", "multiple of M=8"),
    ("method", {"model": M, "config": {"method": "awq"}}, "config.method", "'pbs2p'"),
    ("gptq-bits", {"model": M, "config": {"method": "gptq", "gptq_bits": 5}}, "config.gptq_bits", "less than or equal"),
    ("model-outside-roots", {"model": "OUTSIDE/model"}, "model", "not under an allowed root"),
    ("model-dotdot", {"model": "ROOT/../outside/model"}, "model", "give a plain path under an allowed root"),
    ("model-symlink-escape", {"model": "ROOT/escape"}, "model", "not under an allowed root"),
    ("model-missing", {"model": "ROOT/nothing-here"}, "model", "does not exist"),
    ("model-pickle-only", {"model": "ROOT/pickled"}, "model", "convert to safetensors"),
    ("model-unknown", {"model": "not a model!"}, "model", "use an alias"),
    ("model-hf-unknown", {"model": "example-org/no-such-model"}, "model", "was not found on http://127.0.0.1"),
    ("model-hf-bad-revision", {"model": HUB_MODEL, "revision": "v9"}, "model", "revision 'v9' of Hugging Face"),
    ("model-hf-pickle-only", {"model": "example-org/pickled"}, "model", "only pickle weights"),
    ("revision-twice", {"model": HUB_MODEL + "@v1", "revision": "main"}, "revision", "give one"),
    ("revision-not-hub", {"model": "smollm2-135m", "revision": "v1"}, "revision", "Hugging Face ids"),
    ("revision-spelling", {"model": HUB_MODEL, "revision": "a b"}, "revision", "not a branch, tag or commit"),
    ("model-relative", {"model": "./model"}, "model", "use an alias"),
    ("model-s3-no-prefix", {"model": "s3://bucket"}, "model", "s3://BUCKET/PREFIX"),
    ("model-empty", {"model": ""}, "model", "at least 1 character"),
    ("model-absent", {}, "model", "Field required"),
    ("calib-outside-roots", {"model": M, "config": {"calib": "OUTSIDE/calib.txt"}}, "config.calib", "allowed root"),
    ("calib-not-text", {"model": M, "config": {"calib": "ROOT/model/config.json"}}, "config.calib", ".txt"),
    ("calib-relative", {"model": M, "config": {"calib": "calib.txt"}}, "config.calib", "must be absolute"),
    ("evaluate-data-outside", {"model": M, "evaluate": {"data": "OUTSIDE/calib.txt"}}, "evaluate.data", "allowed"),
    ("evaluate-data-missing", {"model": M, "evaluate": {"data": "ROOT/none.txt"}}, "evaluate.data", "does not exist"),
    ("evaluate-seqlen", {"model": M, "evaluate": {"seqlen": 1}}, "evaluate.seqlen", "greater than or equal to 8"),
    ("evaluate-extra", {"model": M, "evaluate": {"windowz": 3}}, "evaluate.windowz", "remove it"),
    (
        "evaluate-task-unknown",
        {"model": M, "evaluate": {"tasks": ["no_such_task"]}},
        "evaluate.tasks",
        "unknown task(s) no_such_task",
    ),
    ("evaluate-task-spelling", {"model": M, "evaluate": {"tasks": ["arc easy"]}}, "evaluate.tasks.0", "pattern"),
    ("evaluate-task-twice", {"model": M, "evaluate": {"tasks": ["piqa", "piqa"]}}, "evaluate.tasks", "each task once"),
    ("evaluate-tasks-limit", {"model": M, "evaluate": {"tasks_limit": 0}}, "evaluate.tasks_limit", "greater than"),
    ("extra-top-level", {"model": M, "colour": "red"}, "colour", "remove it"),
    ("config-not-object", {"model": M, "config": "6:8"}, "config", "valid dictionary"),
]


def _fill(value: Any, root: Path, outside: Path) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, root, outside) for k, v in value.items()}
    if isinstance(value, str):
        return value.replace("ROOT", str(root)).replace("OUTSIDE", str(outside))
    return value


@pytest.mark.parametrize(("body", "field", "hint"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_invalid_submissions_get_422_naming_the_field_and_the_fix(
    svc: Service,
    dirs: tuple[Path, Path],
    client: httpx.Client,
    auth: dict[str, str],
    body: dict[str, Any],
    field: str,
    hint: str,
) -> None:
    resp = client.post("/v1/jobs", json=_fill(body, svc.root, dirs[1].resolve()), headers=auth)
    got = problem(resp, 422)
    assert field in [e["field"] for e in got["errors"]], got
    assert hint in got["detail"], got
    assert got["detail"].startswith(field) or f"; {field}:" in got["detail"], got
    assert client.get("/v1/jobs", headers=auth).json()["jobs"] == []


def test_malformed_json_gets_422(client: httpx.Client, auth: dict[str, str]) -> None:
    resp = client.post("/v1/jobs", content=b'{"model": ', headers={**auth, "Content-Type": "application/json"})
    problem(resp, 422)
    problem(client.post("/v1/jobs", json=["a list"], headers=auth), 422)


# -- submit ---------------------------------------------------------------------------------------------------
def test_hub_model_checked_at_submit_from_metadata_only(
    svc: Service, hub: LocalHub, client: httpx.Client, auth: dict[str, str]
) -> None:
    resp = client.post("/v1/jobs", json={"model": HUB_MODEL, "revision": "v1"}, headers=auth)
    assert resp.status_code == 201, resp.text
    assert resp.json()["model"] == f"{HUB_MODEL}@v1"  # the revision travels with the id to the job
    assert hub.got("GET", f"/api/models/{HUB_MODEL}/revision/v1")  # asked the hub
    assert not hub.got("GET", "/model.safetensors")  # and downloaded no weights: the job does that


def test_offline_service_refuses_hub_models_it_has_not_cached(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    with (
        running_service(tmp_path, dirs[0], hf_offline=True, cache_dir=tmp_path / "cache") as offline,
        httpx.Client(base_url=offline.url, timeout=20) as c,
    ):
        got = problem(c.post("/v1/jobs", json={"model": HUB_MODEL}, headers=offline.key("t")), 422)
    assert "offline mode is on" in got["detail"] and "hf download example-org/tiny" in got["detail"], got


def test_tasks_of_the_services_tasks_dir_are_accepted(
    dirs: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """evaluate.tasks is checked against what the service has (PBS2P_TASKS_DIR): a task there is queued with
    the job; the same name is refused by a service without it."""
    pytest.importorskip("lm_eval", reason="the tasks extra (pip install 'pbs2p[tasks]')")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(
        f"task: mine\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'mine.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\ndoc_to_text: q\ndoc_to_target: 0\ndoc_to_choice: [a, b]\n"
    )
    body = {"model": str(dirs[0].resolve() / "model"), "evaluate": {"tasks": ["mine"], "tasks_limit": 5}}
    with running_service(tmp_path / "with", dirs[0], tasks_dir=tasks) as svc, httpx.Client(base_url=svc.url) as c:
        resp = c.post("/v1/jobs", json=body, headers=svc.key("t"))
        assert resp.status_code == 201, resp.text
        assert resp.json()["evaluate"]["tasks"] == ["mine"] and resp.json()["evaluate"]["tasks_limit"] == 5
        key = svc.key("t")["Authorization"].removeprefix("Bearer ")
        argv = [
            "jobs",
            "--url",
            svc.url,
            "--key",
            key,
            "submit",
            body["model"],
            "--tasks",
            "mine",
            "--tasks-limit",
            "3",
        ]
        assert cli_main(argv) == 0  # --tasks implies --evaluate
        job = svc.store.get(capsys.readouterr().out.strip())
        assert job is not None and job.evaluate is not None
        assert job.evaluate["tasks"] == ["mine"] and job.evaluate["tasks_limit"] == 3 and job.evaluate["data"] == "wiki"
    with running_service(tmp_path / "without", dirs[0]) as svc, httpx.Client(base_url=svc.url) as c:
        got = problem(c.post("/v1/jobs", json=body, headers=svc.key("t")), 422)
        assert got["errors"][0]["field"] == "evaluate.tasks" and "unknown task(s) mine" in got["detail"], got


def test_submit_returns_201_with_location_and_the_resolved_config(
    svc: Service, client: httpx.Client, auth: dict[str, str]
) -> None:
    config = {
        "pattern": "5:8",
        "calib": str(svc.root / "calib.txt"),
        "seqlen": 64,
        "ablations": {"salient_search": [0, 4]},
    }
    evaluate = {"data": str(svc.root / "eval.jsonl"), "seqlen": 32, "windows": 2}
    body = {"model": model_path(svc), "config": config, "evaluate": evaluate, "name": "first job"}
    resp = client.post("/v1/jobs", json=body, headers=auth)
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert resp.headers["location"] == f"/v1/jobs/{job['id']}" == job["links"]["self"]
    assert job["state"] == "QUEUED" and job["name"] == "first job" and job["model"] == model_path(svc)
    full = CompressionConfig.from_dict(config).to_dict()
    assert job["config"] == full and job["config"]["allocation"] == "uniform"  # every field, defaults resolved
    assert set(job["config"]) == set(CompressionConfig.model_fields) and job["config"]["version"] == 2
    assert job["config"]["ablations"]["salient_allocation"] == "block"
    assert job["evaluate"] == evaluate
    assert job["attempts"] == 0 and job["started_at"] is None and job["error"] is None
    got = client.get(resp.headers["location"], headers=auth)
    assert got.status_code == 200 and got.json() == job
    stored = svc.store.get(job["id"])
    assert stored is not None and stored.config == full


@pytest.mark.parametrize("model", ["smollm2-135m", "s3://bucket/models/x/"])
def test_other_model_references_are_accepted_without_fetching(
    client: httpx.Client, auth: dict[str, str], model: str
) -> None:
    resp = client.post("/v1/jobs", json={"model": model, "config": {"method": "arb"}}, headers=auth)
    assert resp.status_code == 201, resp.text
    assert resp.json()["model"] == model.rstrip("/")
    assert resp.json()["config"]["allocation"] == "uniform"


def test_idempotency_key(svc: Service, client: httpx.Client, auth: dict[str, str]) -> None:
    body = {"model": model_path(svc), "config": {"pattern": "4:8"}}
    headers = {**auth, "Idempotency-Key": "order-1"}
    first = client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    again = client.post("/v1/jobs", json=body, headers=headers)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    conflict = problem(client.post("/v1/jobs", json={**body, "name": "other"}, headers=headers), 409)
    assert "order-1" in conflict["detail"] and "new key" in conflict["detail"]
    assert len(client.get("/v1/jobs", headers=auth).json()["jobs"]) == 1
    problem(client.post("/v1/jobs", json=body, headers={**auth, "Idempotency-Key": "k" * 201}), 422)


# -- listing --------------------------------------------------------------------------------------------------
def test_list_newest_first_with_cursor_and_state_filter(
    svc: Service, client: httpx.Client, auth: dict[str, str]
) -> None:
    ids = [submit(client, auth, svc, name=f"j{i}")["id"] for i in range(5)]
    submit(client, svc.key("noise"), svc)
    assert client.post(f"/v1/jobs/{ids[1]}/cancel", headers=auth).json()["state"] == "CANCELLED"

    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        resp = client.get("/v1/jobs", params=params, headers=auth)
        assert resp.status_code == 200, resp.text
        page = resp.json()
        seen += [j["id"] for j in page["jobs"]]
        cursor, pages = page["next_cursor"], pages + 1
        if cursor is None:
            break
    assert seen == ids[::-1] and pages == 3

    def listed(**params: Any) -> list[str]:
        resp = client.get("/v1/jobs", params=params, headers=auth)
        assert resp.status_code == 200, resp.text
        return [j["id"] for j in resp.json()["jobs"]]

    assert listed(state="CANCELLED") == [ids[1]]
    assert listed(state="QUEUED") == [i for i in ids[::-1] if i != ids[1]]
    assert listed(state=["CANCELLED", "QUEUED"]) == ids[::-1]
    assert listed(state="SUCCEEDED") == []

    for params, field in (
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": encode_cursor(10**40)}, "cursor"),  # decodes, but no row id is that large
        ({"state": "BOGUS"}, "query.state.0"),
        ({"limit": 0}, "query.limit"),
        ({"limit": 201}, "query.limit"),
    ):
        body = problem(client.get("/v1/jobs", params=params, headers=auth), 422)
        assert field in [e["field"] for e in body["errors"]], body


# -- cancel ---------------------------------------------------------------------------------------------------
def test_cancel(svc: Service, client: httpx.Client, auth: dict[str, str]) -> None:
    queued, running, done = (submit(client, auth, svc)["id"] for _ in range(3))
    first = client.post(f"/v1/jobs/{queued}/cancel", headers=auth)
    assert first.status_code == 200 and first.json()["state"] == "CANCELLED"
    assert first.json()["finished_at"] is not None
    again = client.post(f"/v1/jobs/{queued}/cancel", headers=auth)
    assert again.status_code == 200 and again.json()["state"] == "CANCELLED"

    assert svc.store.transition(running, [JobState.QUEUED], JobState.RUNNING)
    resp = client.post(f"/v1/jobs/{running}/cancel", headers=auth)
    assert resp.status_code == 200 and resp.json()["state"] == "CANCELLING"  # the runner stops at its next block
    assert client.post(f"/v1/jobs/{running}/cancel", headers=auth).json()["state"] == "CANCELLING"

    assert svc.store.transition(done, [JobState.QUEUED], JobState.SUCCEEDED)
    body = problem(client.post(f"/v1/jobs/{done}/cancel", headers=auth), 409)
    assert "SUCCEEDED" in body["detail"]
    assert client.get(f"/v1/jobs/{done}", headers=auth).json()["state"] == "SUCCEEDED"


# -- artifacts ------------------------------------------------------------------------------------------------
def fake_artifact(svc: Service, tenant_headers: dict[str, str], client: httpx.Client, tmp: Path) -> tuple[str, dict]:
    """A SUCCEEDED job whose artifact (a few files and a manifest) is in the service's storage."""
    job = submit(client, tenant_headers, svc)
    stored = svc.store.get(job["id"])
    assert stored is not None
    files = {
        "config.json": b'{"model_type": "llama"}',
        "pbs2p.safetensors": os.urandom(5000),
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
    }
    art = tmp / "artifact"
    for name, data in files.items():
        (art / name).parent.mkdir(parents=True, exist_ok=True)
        (art / name).write_bytes(data)
    table = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    (art / "manifest.json").write_text(json.dumps({"format_version": 1, "files": table}))
    prefix = f"{stored.tenant}/{stored.id}"
    svc.storage.upload_dir(art, prefix)
    assert svc.store.transition(stored.id, [JobState.QUEUED], JobState.SUCCEEDED, artifact=prefix)
    return stored.id, files


def test_artifact_listing_and_download(
    svc: Service, client: httpx.Client, auth: dict[str, str], tmp_path: Path
) -> None:
    pending = submit(client, auth, svc)["id"]
    body = problem(client.get(f"/v1/jobs/{pending}/artifact", headers=auth), 409)
    assert "QUEUED" in body["detail"]
    problem(client.get(f"/v1/jobs/{pending}/artifact/config.json", headers=auth), 409)

    job_id, files = fake_artifact(svc, auth, client, tmp_path)
    resp = client.get(f"/v1/jobs/{job_id}/artifact", headers=auth)
    assert resp.status_code == 200, resp.text
    listing = resp.json()
    assert listing["job"] == job_id and listing["format_version"] == 1
    assert listing["manifest_url"] == f"/v1/jobs/{job_id}/artifact/manifest.json"
    assert [f["name"] for f in listing["files"]] == sorted(files)
    for entry in listing["files"]:
        data = files[entry["name"]]
        assert entry["size"] == len(data) and entry["url"] == f"/v1/jobs/{job_id}/artifact/{entry['name']}"
        got = client.get(entry["url"], headers=auth)
        assert got.status_code == 200 and got.headers["content-type"] == "application/octet-stream"
        assert hashlib.sha256(got.content).hexdigest() == entry["sha256"] == hashlib.sha256(data).hexdigest()
    manifest = client.get(listing["manifest_url"], headers=auth)
    assert manifest.status_code == 200 and json.loads(manifest.content)["format_version"] == 1

    # names outside the manifest, and anything that tries to leave the artifact, are not found
    secret = svc.settings.data_dir / "jobs.db"
    assert secret.exists()
    for name in (
        "missing.bin",
        "..%2F..%2Fjobs.db",
        "%2E%2E/%2E%2E/jobs.db",
        "tokenizer/..%2Fconfig.json",
        "%2Fetc%2Fpasswd",
    ):
        resp = client.get(f"/v1/jobs/{job_id}/artifact/{name}", headers=auth)
        assert resp.status_code in (404, 422), (name, resp.status_code)
        assert resp.headers["content-type"].startswith(PROBLEM)
        assert b"SQLite" not in resp.content
    problem(client.get(f"/v1/jobs/{job_id}/artifact", headers=svc.key("stranger")), 404)
    problem(client.get(f"/v1/jobs/{job_id}/artifact/config.json", headers=svc.key("stranger")), 404)


# -- events ---------------------------------------------------------------------------------------------------
def read_events(resp: httpx.Response, out: list[tuple[str, dict[str, Any]]], got_one: threading.Event) -> None:
    event, data = "", ""
    for line in resp.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and event:
            out.append((event, json.loads(data)))
            got_one.set()
            event, data = "", ""


def test_events_stream_until_the_job_ends(svc: Service, client: httpx.Client, auth: dict[str, str]) -> None:
    job_id = submit(client, auth, svc)["id"]
    events: list[tuple[str, dict[str, Any]]] = []
    got_one = threading.Event()
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth, timeout=20) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        reader = threading.Thread(target=read_events, args=(resp, events, got_one), daemon=True)
        reader.start()
        assert got_one.wait(10)
        assert events[0][0] == "job" and events[0][1]["id"] == job_id and events[0][1]["state"] == "QUEUED"
        progress = {"stage": "block", "block": 1, "blocks": 2}
        assert svc.store.transition(job_id, [JobState.QUEUED], JobState.RUNNING, progress=progress)
        deadline = time.monotonic() + 10
        while not any(e[1].get("state") == "RUNNING" for e in events) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert svc.store.transition(job_id, [JobState.RUNNING], JobState.SUCCEEDED, artifact="x/y")
        reader.join(10)
        assert not reader.is_alive(), "the stream did not close after the job ended"
    kinds = [e[0] for e in events]
    assert kinds[-1] == "end" and events[-1][1] == {"state": "SUCCEEDED"}
    assert set(kinds[:-1]) == {"job"}
    states = [e[1]["state"] for e in events[:-1]]
    assert states == ["QUEUED", "RUNNING", "SUCCEEDED"]
    running = next(e[1] for e in events if e[1].get("state") == "RUNNING")
    assert running["progress"]["block"] == 1 and running["progress"]["blocks"] == 2


def test_events_of_a_finished_job_end_at_once(svc: Service, client: httpx.Client, auth: dict[str, str]) -> None:
    job_id = submit(client, auth, svc)["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
    resp = client.get(f"/v1/jobs/{job_id}/events", headers=auth, timeout=10)
    assert resp.status_code == 200
    assert "event: job" in resp.text and resp.text.rstrip().endswith('event: end\ndata: {"state": "CANCELLED"}')


# -- operations -----------------------------------------------------------------------------------------------
def test_healthz_metrics_and_docs(svc: Service, client: httpx.Client, auth: dict[str, str]) -> None:
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "dispatcher": False}
    submit(client, auth, svc)
    client.get("/v1/jobs", headers=auth)
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    queued = svc.store.counts()["QUEUED"]
    assert f'pbs2p_jobs{{state="QUEUED"}} {float(queued)}' in text
    assert 'pbs2p_jobs{state="SUCCEEDED"}' in text
    assert 'pbs2p_http_requests_total{method="GET",route="/v1/jobs",status="200"}' in text
    assert 'pbs2p_http_requests_total{method="POST",route="/v1/jobs",status="201"}' in text
    assert "pbs2p_http_request_seconds_bucket" in text

    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    spec = client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/jobs/{job_id}/events"} <= set(paths)
    problem(client.get("/no/such/route"), 404)


# -- operability: request ids, problems for every error, the access log, job metrics, OpenAPI ----------------
def test_an_unhandled_exception_is_a_500_problem_with_the_request_id(
    svc: Service, client: httpx.Client, auth: dict[str, str], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    def broken(*_args: Any, **_kw: Any) -> Any:
        raise RuntimeError("the database fell over")

    monkeypatch.setattr(svc.store, "list_rows", broken)
    with caplog.at_level("INFO"):
        resp = client.get("/v1/jobs", headers=auth)
    body = problem(resp, 500)
    rid = resp.headers["x-request-id"]
    assert body["request_id"] == rid and len(rid) == 16
    assert rid in body["detail"] and "RuntimeError" in body["detail"]
    assert "the database fell over" not in body["detail"]  # the client sees no internals; the log has them
    logged = [r for r in caplog.records if r.name == "pbs2p.service.api.middleware" and rid in r.getMessage()]
    assert logged and logged[0].exc_info is not None and "fell over" in str(logged[0].exc_info[1])
    access = [json.loads(r.getMessage()) for r in caplog.records if r.name == "pbs2p.access"]
    assert [a["status"] for a in access if a["request_id"] == rid] == [500]


def test_every_response_carries_a_request_id_and_problems_repeat_it(
    svc: Service, client: httpx.Client, auth: dict[str, str]
) -> None:
    ok = client.get("/v1/jobs", headers=auth)
    assert ok.status_code == 200 and len(ok.headers["x-request-id"]) == 16
    assert client.get("/v1/jobs", headers=auth).headers["x-request-id"] != ok.headers["x-request-id"]
    mine = client.get("/v1/jobs", headers={**auth, "X-Request-ID": "trace-42.a:b"})
    assert mine.headers["x-request-id"] == "trace-42.a:b"  # the client's own id is kept ...
    odd = client.get("/v1/jobs", headers={**auth, "X-Request-ID": "no spaces/allowed"})
    assert odd.headers["x-request-id"] != "no spaces/allowed"  # ... unless it is not a plausible one
    for resp, status in (
        (client.get("/v1/jobs/job_x", headers=auth), 404),
        (client.get("/v1/jobs"), 401),
        (client.get("/v1/jobs?limit=0", headers=auth), 422),
        (client.get("/no/such/route"), 404),
        (client.delete("/v1/jobs", headers=auth), 405),
        (client.post("/v1/jobs", content=b"x" * (svc.settings.max_body_bytes + 1), headers=auth), 413),
    ):
        body = problem(resp, status)
        assert body["request_id"] == resp.headers["x-request-id"] and body["request_id"]
    assert client.delete("/v1/jobs", headers=auth).headers["allow"]  # the 405 keeps its Allow header


def test_the_access_log_is_one_json_line_per_request(
    svc: Service, client: httpx.Client, caplog: pytest.LogCaptureFixture
) -> None:
    auth = svc.key("logged-tenant")
    with caplog.at_level("INFO", logger="pbs2p.access"):
        job = submit(client, auth, svc)
        client.get(f"/v1/jobs/{job['id']}", headers=auth, params={"secret": "not logged"})
        client.get("/v1/jobs/job_none", headers=auth)
        client.get("/healthz")
        deadline = time.monotonic() + 10  # the server thread logs just after the response is sent
        while not any('"/healthz"' in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [r.getMessage() for r in caplog.records if r.name == "pbs2p.access"]
    entries = [json.loads(line) for line in lines]
    assert all("\n" not in line for line in lines)
    assert [(e["method"], e["route"], e["status"], e["tenant"]) for e in entries[-4:]] == [
        ("POST", "/v1/jobs", 201, "logged-tenant"),
        ("GET", "/v1/jobs/{job_id}", 200, "logged-tenant"),
        ("GET", "/v1/jobs/{job_id}", 404, "logged-tenant"),
        ("GET", "/healthz", 200, None),
    ]
    for e in entries:
        assert set(e) == {"time", "request_id", "tenant", "method", "route", "status", "latency_ms"}
        assert e["time"].endswith("+00:00") and e["latency_ms"] >= 0
    assert "not logged" not in "".join(lines) and job["id"] not in "".join(lines)  # templates, not paths


def test_metrics_report_queue_depth_per_tenant(svc: Service, client: httpx.Client) -> None:
    a, b = svc.key("depth-a"), svc.key("depth-b")
    for _ in range(3):
        submit(client, a, svc)
    running = submit(client, b, svc)
    assert svc.store.transition(running["id"], [JobState.QUEUED], JobState.RUNNING)  # b's job runs
    text = client.get("/metrics").text
    assert 'pbs2p_tenant_jobs{state="QUEUED",tenant="depth-a"} 3.0' in text
    assert 'pbs2p_tenant_jobs{state="RUNNING",tenant="depth-b"} 1.0' in text
    assert 'tenant="depth-b",state="QUEUED"' not in text


def test_openapi_names_every_operation_and_types_every_answer(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    ops = {(method, path): op for path, item in spec["paths"].items() for method, op in item.items()}
    ids = {k: op["operationId"] for k, op in ops.items()}
    assert ids[("post", "/v1/jobs")] == "submit_job" and ids[("get", "/v1/jobs")] == "list_jobs"
    assert ids[("get", "/v1/jobs/{job_id}")] == "get_job" and ids[("post", "/v1/jobs/{job_id}/cancel")] == "cancel_job"
    assert ids[("get", "/healthz")] == "healthz" and ids[("delete", "/v1/jobs/{job_id}")] == "delete_job"
    assert len(set(ids.values())) == len(ids) and all(i.isidentifier() for i in ids.values())
    for (method, path), op in ops.items():
        for code, resp in op["responses"].items():
            bodiless = code[0] == "3" or code in ("202", "204")  # redirects, a DELETE's answers
            assert bodiless or resp.get("content"), f"{method} {path} {code} has no typed content"
            if code[0] in "45":
                assert resp["content"] == {PROBLEM: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}}
        assert "500" in op["responses"], f"{method} {path}"
    assert "request_id" in spec["components"]["schemas"]["ProblemDetails"]["properties"]
    assert ops[("post", "/v1/jobs")]["responses"]["429"]["headers"]["Retry-After"]["schema"] == {"type": "integer"}


# -- fairness and quotas --------------------------------------------------------------------------------------
def test_a_submit_over_the_queue_limit_gets_429_with_retry_after(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    with (
        running_service(tmp_path / "data", dirs[0], tenant_max_queued_jobs=2) as svc,
        httpx.Client(base_url=svc.url, timeout=20) as client,
    ):
        auth, other = svc.key("busy"), svc.key("calm")
        first = submit(client, auth, svc, priority=7)
        assert first["priority"] == 7
        submit(client, auth, svc)
        resp = client.post("/v1/jobs", json={"model": model_path(svc)}, headers=auth)
        body = problem(resp, 429)
        assert resp.headers["retry-after"] == "30" and "PBS2P_TENANT_MAX_QUEUED_JOBS" in body["detail"]
        assert submit(client, other, svc)["state"] == "QUEUED"  # each tenant's queue is its own
        replay = client.post("/v1/jobs", json={"model": model_path(svc)}, headers={**auth, "Idempotency-Key": "k"})
        assert replay.status_code == 429
        assert client.post(f"/v1/jobs/{first['id']}/cancel", headers=auth).status_code == 200
        assert submit(client, auth, svc)["priority"] == 0  # room again
        problem(client.post("/v1/jobs", json={"model": model_path(svc), "priority": 101}, headers=auth), 422)


# -- lifecycle: delete, retention -----------------------------------------------------------------------------
def checkpoint_of(svc: Service, job_id: str) -> Path:
    """A checkpoint file of the job, where the dispatcher keeps them (PBS2P_CHECKPOINT_URL/<job id>/)."""
    path = Path(svc.settings.checkpoints_url) / job_id / "block_0000" / "state.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"checkpoint")
    return path


def test_delete_removes_the_job_its_artifact_and_checkpoints(
    svc: Service, client: httpx.Client, auth: dict[str, str], tmp_path: Path
) -> None:
    queued = submit(client, auth, svc)["id"]
    ckpt = checkpoint_of(svc, queued)
    resp = client.delete(f"/v1/jobs/{queued}", headers=auth)
    assert resp.status_code == 204 and resp.content == b""
    problem(client.get(f"/v1/jobs/{queued}", headers=auth), 404)
    problem(client.delete(f"/v1/jobs/{queued}", headers=auth), 404)
    assert svc.store.get(queued) is None and not ckpt.parent.parent.exists()

    done, files = fake_artifact(svc, auth, client, tmp_path)
    where = svc.storage.locate(f"{svc.store.get(done).tenant}/{done}")  # type: ignore[union-attr]
    assert Path(where, "pbs2p.safetensors").exists()
    problem(client.delete(f"/v1/jobs/{done}", headers=svc.key("stranger")), 404)  # not another tenant's
    assert client.delete(f"/v1/jobs/{done}", headers=auth).status_code == 204
    assert not Path(where).exists() and svc.store.get(done) is None
    problem(client.get(f"/v1/jobs/{done}/artifact", headers=auth), 404)
    assert done not in [j["id"] for j in client.get("/v1/jobs", headers=auth).json()["jobs"]]


def test_delete_of_a_running_job_cancels_it_then_removes_it(
    svc: Service, client: httpx.Client, auth: dict[str, str]
) -> None:
    job_id = submit(client, auth, svc)["id"]
    assert svc.store.transition(job_id, [JobState.QUEUED], JobState.RUNNING, owner=None)
    ckpt = checkpoint_of(svc, job_id)
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth).status_code == 202
    problem(client.get(f"/v1/jobs/{job_id}", headers=auth), 404)  # gone for the tenant at once
    assert job_id not in [j["id"] for j in client.get("/v1/jobs", headers=auth).json()["jobs"]]
    stored = svc.store.get(job_id)
    assert stored is not None and stored.state == JobState.CANCELLING and stored.deleted_at is not None
    # its dispatcher stops it; the next maintenance round removes what is left
    assert svc.store.transition(job_id, [JobState.CANCELLING], JobState.CANCELLED)
    assert lifecycle.maintain(svc.store, svc.storage, lifecycle.checkpoints_of(svc.settings), svc.settings) == (1, 0)
    assert svc.store.get(job_id) is None and not ckpt.exists()


def test_retention_removes_old_artifacts_and_keeps_the_jobs_metrics(
    svc: Service, client: httpx.Client, auth: dict[str, str], tmp_path: Path
) -> None:
    old, _ = fake_artifact(svc, auth, client, tmp_path / "old")
    recent, _ = fake_artifact(svc, auth, client, tmp_path / "recent")
    with svc.store.session() as s:  # `old` finished 3 days ago, with a report
        s.execute(
            update(JobRow)
            .where(JobRow.id == old)
            .values(finished_at=time.time() - 3 * 86400, report=json.dumps({"metrics": {"ppl": 41.5}}))
        )
    keep = svc.settings.model_copy(update={"artifact_retention_days": 0})
    checkpoints = lifecycle.checkpoints_of(svc.settings)
    assert lifecycle.maintain(svc.store, svc.storage, checkpoints, keep) == (0, 0)  # 0: kept for ever
    two_days = svc.settings.model_copy(update={"artifact_retention_days": 2})
    assert lifecycle.maintain(svc.store, svc.storage, checkpoints, two_days)[1] == 1
    assert lifecycle.maintain(svc.store, svc.storage, checkpoints, two_days)[1] == 0  # once
    job = client.get(f"/v1/jobs/{old}", headers=auth).json()
    assert job["state"] == "SUCCEEDED" and job["metrics"] == {"ppl": 41.5} and job["artifact_expired_at"]
    body = problem(client.get(f"/v1/jobs/{old}/artifact", headers=auth), 410)
    assert "PBS2P_ARTIFACT_RETENTION_DAYS" in body["detail"]
    problem(client.get(f"/v1/jobs/{old}/artifact/config.json", headers=auth), 410)
    assert not svc.storage.list(f"{svc.store.get(old).tenant}/{old}/")  # type: ignore[union-attr]
    assert client.get(f"/v1/jobs/{recent}/artifact", headers=auth).status_code == 200
    assert client.get(f"/v1/jobs/{recent}", headers=auth).json()["artifact_expired_at"] is None


# -- the Python client ----------------------------------------------------------------------------------------
def test_the_client_follows_next_cursor_over_every_page(svc: Service, client: httpx.Client) -> None:
    headers = svc.key("paged")
    made = [submit(client, headers, svc, name=f"j{i}")["id"] for i in range(7)]
    api = Client(svc.url, headers["Authorization"].removeprefix("Bearer "))
    pages: list[str] = []
    real_call = api._call

    def counting(method: str, path: str, **kw: Any) -> httpx.Response:
        pages.append(str(kw.get("params", {}).get("cursor")))
        return real_call(method, path, **kw)

    try:
        api._call = counting  # type: ignore[method-assign]
        assert [j["id"] for j in api.iter_jobs(page_size=3)] == made[::-1]  # newest first, none twice
        assert len(pages) == 3 and pages[0] == "None" and len(set(pages)) == 3  # 3 + 3 + 1, each from its cursor
        assert [j["id"] for j in api.list_jobs(limit=5)] == made[::-1][:5]
        assert [j["id"] for j in api.list_jobs(limit=None)] == made[::-1]
        assert api.list_jobs(("RUNNING",), limit=None) == []
        assert api.delete(made[0]) is True
        assert len(api.list_jobs(limit=None)) == 6
        with pytest.raises(ApiError, match="404"):
            api.delete(made[0])
    finally:
        api.close()


def test_the_tenant_event_stream_follows_every_job_of_the_caller(svc: Service, client: httpx.Client) -> None:
    auth, other = svc.key("streamed"), svc.key("not-streamed")
    first = submit(client, auth, svc)["id"]
    theirs = submit(client, other, svc)["id"]
    seen: list[tuple[str, str]] = []
    second = ""
    with client.stream("GET", "/v1/events", headers=auth, timeout=30) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line.startswith("data: "):
                continue
            job = json.loads(line[6:])
            seen.append((job["id"], job["state"]))
            if len(seen) == 1:  # the job changed in the last seconds came first; now more changes
                second = submit(client, auth, svc)["id"]
                assert svc.store.transition(first, [JobState.QUEUED], JobState.RUNNING)
                assert svc.store.transition(theirs, [JobState.QUEUED], JobState.RUNNING)
            if len(seen) == 3:
                break
    assert seen == [(first, "QUEUED"), (second, "QUEUED"), (first, "RUNNING")]  # in the order of the changes
    assert theirs not in {job_id for job_id, _ in seen}  # another tenant's never


def test_the_command_line_lists_every_page_submits_with_priority_and_deletes(
    svc: Service, client: httpx.Client, capsys: pytest.CaptureFixture[str]
) -> None:
    headers = svc.key("cli")
    key = headers["Authorization"].removeprefix("Bearer ")
    base = ["jobs", "--url", svc.url, "--key", key]
    made = [submit(client, headers, svc)["id"] for _ in range(3)]
    assert cli_main([*base, "submit", model_path(svc), "--priority", "5"]) == 0
    urgent = capsys.readouterr().out.strip()
    assert svc.store.get(urgent).priority == 5  # type: ignore[union-attr]
    assert cli_main([*base, "list", "--limit", "2"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [urgent, made[2]]
    assert cli_main([*base, "list", "--all"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [urgent, *made[::-1]]
    assert cli_main([*base, "delete", made[0]]) == 0
    assert capsys.readouterr().out.strip() == f"{made[0]}: deleted"
    assert svc.store.get(made[0]) is None


def test_lists_hold_summaries_and_get_the_whole_job(svc: Service, client: httpx.Client, auth: dict[str, str]) -> None:
    """GET /v1/jobs gives each job without its per-block report and timings; GET /v1/jobs/{id} has them; the two
    agree on every field the list has, and both are what the OpenAPI schema says."""
    job = submit(client, auth, svc, name="with a report")
    report = {"blocks": [{"n_keep": 6, "linears": [{"name": "q", "rel_error": 0.1}]}], "metrics": {"ppl_after": 9.5},
              "timings": {"compress_s": 1.5}}  # fmt: skip
    svc.store.transition(job["id"], [JobState.QUEUED], JobState.SUCCEEDED, report=report)
    whole = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()
    assert whole["report"] == {"blocks": report["blocks"]} and whole["timings"] == report["timings"]
    assert whole["metrics"] == report["metrics"] and whole["state"] == "SUCCEEDED"
    (listed,) = [j for j in client.get("/v1/jobs", headers=auth).json()["jobs"] if j["id"] == job["id"]]
    assert "report" not in listed and "timings" not in listed
    assert listed == {k: v for k, v in whole.items() if k not in ("report", "timings")}
    JobPublic.model_validate(whole)
    JobSummary.model_validate(listed)
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    assert set(schema["JobSummary"]["properties"]) == set(listed)
    assert set(schema["JobPublic"]["properties"]) == set(whole)


def test_a_poll_with_the_etag_is_a_304_until_the_job_changes(
    svc: Service, client: httpx.Client, auth: dict[str, str]
) -> None:
    """GET one job and GET the list send an ETag; If-None-Match with it (weakly compared, in a list, or `*`) is a
    304 without a body while the answer would be the same, and the new body once the job changed."""
    job = submit(client, auth, svc, name="polled")
    path = f"/v1/jobs/{job['id']}"
    for url in (path, "/v1/jobs?limit=5"):
        first = client.get(url, headers=auth)
        etag = first.headers["etag"]
        assert first.status_code == 200 and etag.startswith('"') and etag.endswith('"')
        assert client.get(url, headers=auth).headers["etag"] == etag  # the same answer, the same tag
        for sent in (etag, f"W/{etag}", f'"other", {etag}', "*"):
            same = client.get(url, headers={**auth, "If-None-Match": sent})
            assert (same.status_code, same.content, same.headers["etag"]) == (304, b"", etag), sent
        stale = client.get(url, headers={**auth, "If-None-Match": '"other"'})
        assert stale.status_code == 200 and stale.json() == first.json()
    before = client.get(path, headers=auth).headers["etag"]
    before_list = client.get("/v1/jobs?limit=5", headers=auth).headers["etag"]
    assert client.post(f"{path}/cancel", headers=auth).json()["state"] == "CANCELLED"
    changed = client.get(path, headers={**auth, "If-None-Match": before})
    assert changed.status_code == 200 and changed.json()["state"] == "CANCELLED" and changed.headers["etag"] != before
    listed = client.get("/v1/jobs?limit=5", headers={**auth, "If-None-Match": before_list})
    assert listed.status_code == 200 and listed.json()["jobs"][0]["state"] == "CANCELLED"
    missing = client.get("/v1/jobs/job_missing", headers={**auth, "If-None-Match": "*"})
    assert missing.status_code == 404  # no job, no 304
    spec = client.get("/openapi.json").json()["paths"]
    for route in (spec["/v1/jobs/{job_id}"]["get"], spec["/v1/jobs"]["get"]):
        assert "304" in route["responses"] and "if-none-match" in {p["name"].lower() for p in route["parameters"]}
