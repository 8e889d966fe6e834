"""Job lifecycle beyond the API's routes: bounded automatic retry of transient failures (service/dispatcher.py), and
signed webhooks (service/webhooks.py) delivered over real HTTP to a loopback receiver, retried with backoff."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError
from ray.exceptions import NodeDiedError

from pbs2p.core.errors import Pbs2pError
from pbs2p.service import dispatcher as dispatcher_module
from pbs2p.service.dispatcher import Dispatcher, failure_cause
from pbs2p.service.jobstore import Job, JobState, JobStore
from pbs2p.service.settings import Settings
from pbs2p.testing.servers import running_service
from pbs2p.workers.storage import StorageError, storage_from_url

SECRET = "s3cret-for-tests"


# -- transient failures and retries ---------------------------------------------------------------------------
def test_failures_are_classified_by_cause() -> None:
    def wrapped(inner: BaseException) -> Pbs2pError:
        try:
            raise inner
        except BaseException as exc:
            try:
                raise StorageError("S3 failed to read s3://b/k: timeout") from exc
            except StorageError as outer:
                return outer

    assert failure_cause(wrapped(ConnectTimeoutError(endpoint_url="http://s3"))) == "transient"
    assert failure_cause(wrapped(EndpointConnectionError(endpoint_url="http://s3"))) == "transient"
    assert failure_cause(TimeoutError("read timed out")) == "transient"
    assert failure_cause(NodeDiedError("node 1 died")) == "transient"
    assert failure_cause(Pbs2pError("pattern 9:8 is not N:M with N <= M")) == "invalid"
    assert failure_cause(StorageError("access denied")) == "invalid"
    assert failure_cause(KeyError("bug")) == "internal"


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[tuple[Dispatcher, JobStore]]:
    settings = Settings(data_dir=tmp_path, dispatcher=False, job_max_attempts=3)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}")
    d = Dispatcher(settings, store, storage_from_url(str(tmp_path / "artifacts")))
    try:
        yield d, store
    finally:
        d.pool.shutdown()
        store.close()


def run_once(d: Dispatcher, store: JobStore) -> Job:
    job = store.claim(d.owner)
    assert job is not None
    d._run(job)
    after = store.get(job.id)
    assert after is not None
    return after


def test_a_transient_failure_is_retried_until_the_attempts_run_out(
    setup: tuple[Dispatcher, JobStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    d, store = setup
    seen: list[str] = []

    def lost_node(spec: Any, *_a: Any, **_kw: Any) -> Any:
        seen.append(spec.ray.job_id)  # the same job id each time: it resumes from its checkpoints
        raise NodeDiedError("the node running worker 2 died")

    monkeypatch.setattr(dispatcher_module, "run_job", lost_node)
    job, _ = store.create_job("acme", "org/m", {"method": "pbs2p"})
    for attempt in (1, 2):
        after = run_once(d, store)
        assert after.state == JobState.QUEUED and after.attempts == attempt
        assert after.error is not None and f"attempt {attempt} of 3 failed" in after.error and "retrying" in after.error
        assert after.progress == {"stage": "retrying"}
    last = run_once(d, store)
    assert last.state == JobState.FAILED and last.attempts == 3 and "transient error (NodeDiedError" in str(last.error)
    assert seen == [job.id] * 3
    samples = {(s.labels["cause"], s.labels["retried"]): s.value for m in d.metrics.registry.collect()
               for s in m.samples if s.name == "pbs2p_job_failures_total"}  # fmt: skip
    assert samples == {("transient", "true"): 2.0, ("transient", "false"): 1.0}


def test_an_invalid_job_fails_at_once(setup: tuple[Dispatcher, JobStore], monkeypatch: pytest.MonkeyPatch) -> None:
    d, store = setup

    def refused(*_a: Any, **_kw: Any) -> Any:
        raise Pbs2pError("model org/m has no safetensors weights")

    monkeypatch.setattr(dispatcher_module, "run_job", refused)
    store.create_job("acme", "org/m", {"method": "pbs2p"})
    after = run_once(d, store)
    assert (
        after.state == JobState.FAILED
        and after.attempts == 1
        and after.error == "model org/m has no safetensors weights"
    )


# -- webhooks -------------------------------------------------------------------------------------------------
class Receiver(http.server.BaseHTTPRequestHandler):
    """Records each POST (headers, body, when); answers 503 to the first `fail_first` deliveries of each event,
    204 after."""

    got: list[tuple[dict[str, str], bytes, float]]
    fail_first: int

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.got.append(({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
        event = self.headers["X-Pbs2p-Event"]
        failing = sum(1 for h, _, _ in self.got if h.get("x-pbs2p-event") == event) <= self.fail_first
        self.send_response(503 if failing else 204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, type[Receiver]]]:
    handler = type("R", (Receiver,), {"got": [], "fail_first": 2})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/pbs2p", handler
    finally:
        server.shutdown()
        server.server_close()


def wait_for(cond: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_state_changes_are_posted_signed_and_retried(tmp_path: Path, receiver: tuple[str, type[Receiver]]) -> None:
    url, handler = receiver
    root = tmp_path / "root"
    (root / "model").mkdir(parents=True)
    with running_service(tmp_path / "data", root, webhook_secret=SECRET, webhook_hosts="127.0.0.1") as svc:
        auth = svc.key("hooked")
        with httpx.Client(base_url=svc.url, timeout=20) as client:
            resp = client.post("/v1/jobs", json={"model": "smollm2-135m", "webhook_url": url}, headers=auth)
            assert resp.status_code == 201, resp.text
            job_id = resp.json()["id"]
            assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).status_code == 200
            for bad, why in (
                ("http://example.com/hook", "not one of the service's webhook hosts"),
                ("ftp://127.0.0.1/x", "http:// or https://"),
                ("http://user:pw@127.0.0.1/x", "no credentials"),
            ):
                r = client.post("/v1/jobs", json={"model": "smollm2-135m", "webhook_url": bad}, headers=auth)
                assert r.status_code == 422 and why in r.json()["detail"], r.text
            # two events (QUEUED, CANCELLED), each refused twice (503) before it is taken
            wait_for(lambda: len(handler.got) >= 6)
            time.sleep(0.5)  # nothing more comes: a 2xx ends an event's deliveries
    deliveries = handler.got
    assert len(deliveries) == 6
    by_event: dict[str, list[tuple[dict[str, str], bytes, float]]] = {}
    for headers, body, at in deliveries:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-pbs2p-signature"], expected)
        assert headers["x-pbs2p-event"] == json.loads(body)["id"] and headers["content-type"] == "application/json"
        by_event.setdefault(headers["x-pbs2p-event"], []).append((headers, body, at))
    states = []
    for tries in by_event.values():  # in the order of their first delivery
        assert len(tries) == 3 and len({body for _, body, _ in tries}) == 1  # the same bytes until a 2xx
        gaps = [tries[i + 1][2] - tries[i][2] for i in (0, 1)]
        assert gaps[0] >= 0.9 and gaps[1] >= 1.9  # backoff: 1 s, then 2 s (lower bounds only)
        event = json.loads(tries[0][1])
        assert event["type"] == "job.state_changed" and event["job"]["id"] == job_id
        states.append(event["job"]["state"])
    assert states == ["QUEUED", "CANCELLED"]


def test_webhooks_are_refused_when_the_service_has_no_secret(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with running_service(tmp_path / "data", root) as svc, httpx.Client(base_url=svc.url, timeout=20) as client:
        r = client.post("/v1/jobs", json={"model": "smollm2-135m", "webhook_url": "http://127.0.0.1:9/x"},
                        headers=svc.key("t"))  # fmt: skip
        assert r.status_code == 422 and "PBS2P_WEBHOOK_SECRET" in r.json()["detail"]
        assert r.json()["errors"][0]["field"] == "webhook_url"
