"""Job lifecycle beyond the API's routes: bounded automatic retry of transient failures (service/dispatcher.py), and
signed webhooks (service/webhooks.py, service/outbox.py) delivered over real HTTP to a loopback receiver by worker
processes (real `pbs2p worker`s, or their webhook sender) from the outbox in a SQLite file or the PostgreSQL of
127.0.0.1:5432: never by the API, after a killed worker by the next one, retried with backoff up to a bound, and
once per attempt with two workers."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import http.server
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError
from ray.exceptions import NodeDiedError
from sqlalchemy import create_engine, text

from pbs2p.core.errors import Pbs2pError
from pbs2p.service import dispatcher as dispatcher_module
from pbs2p.service import outbox
from pbs2p.service.dispatcher import Dispatcher, failure_cause
from pbs2p.service.jobstore import Job, JobState, JobStore
from pbs2p.service.settings import Settings
from pbs2p.service.webhooks import Sender
from pbs2p.testing.servers import running_service
from pbs2p.workers.storage import StorageError, storage_from_url

SECRET = "s3cret-for-tests"
PG_URL = os.environ.get("PBS2P_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


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


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A SQLite file under tmp_path/data, or a fresh schema of the PostgreSQL at 127.0.0.1:5432 as in
    test_jobstore.py (skipped loudly when it is unreachable, a failure under CI; dropped after the test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'jobs.db'}"
        return
    admin = create_engine(PG_URL, connect_args={"connect_timeout": 3})
    schema = f"t_{secrets.token_hex(6)}"
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except Exception as exc:  # any reason it cannot be reached
        admin.dispose()
        msg = f"PostgreSQL NOT REACHABLE at {PG_URL} ({type(exc).__name__}: {exc}); PostgreSQL outbox tests NOT RUN"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@contextlib.contextmanager
def worker(data: Path, database_url: str) -> Iterator[subprocess.Popen[bytes]]:
    """A real `pbs2p worker` process (its own process group, a local Ray of 1 CPU) over the store at
    `database_url`, with webhooks on; SIGKILLed with its group at the end unless it is gone by then."""
    data.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PBS2P_DATA_DIR": str(data), "PBS2P_DATABASE_URL": database_url,
           "PBS2P_WEBHOOK_SECRET": SECRET, "PBS2P_POLL_SECONDS": "0.05", "PBS2P_RAY_NUM_CPUS": "1",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    with open(data / "worker.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pbs2p.service.cli", "worker"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        yield proc
    finally:
        kill_worker(proc)


def kill_worker(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the worker and its local Ray
    proc.wait(30)


def owned_by(proc: subprocess.Popen[bytes]) -> str:
    """The middle of the dispatcher owner names of `proc` (host:pid:random), as its claims record them."""
    return f":{proc.pid}:"


def check_deliveries(got: list[tuple[dict[str, str], bytes, float]]) -> dict[str, list[tuple[bytes, float]]]:
    """Every request signed over its exact body, with the event id in its header; (body, time) per event id in the
    order of their first request, each event's requests the same bytes."""
    by_event: dict[str, list[tuple[bytes, float]]] = {}
    for headers, body, at in got:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["x-pbs2p-signature"], expected)
        assert headers["x-pbs2p-event"] == json.loads(body)["id"] and headers["content-type"] == "application/json"
        by_event.setdefault(headers["x-pbs2p-event"], []).append((body, at))
    assert all(len({body for body, _ in tries}) == 1 for tries in by_event.values())  # the same bytes each time
    return by_event


def test_a_requests_state_changes_are_posted_by_the_worker_signed_and_retried(
    tmp_path: Path, receiver: tuple[str, type[Receiver]]
) -> None:
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
            resp = client.post("/v1/jobs", json={"model": "smollm2-135m", "webhook_url": url}, headers=auth)
            deleted_id = resp.json()["id"]
            assert client.delete(f"/v1/jobs/{deleted_id}", headers=auth).status_code == 204  # cancelled, removed
            assert svc.store.get(deleted_id) is None  # its row is gone; its events are not
            for bad, why in (
                ("http://example.com/hook", "not one of the service's webhook hosts"),
                ("ftp://127.0.0.1/x", "http:// or https://"),
                ("http://user:pw@127.0.0.1/x", "no credentials"),
            ):
                r = client.post("/v1/jobs", json={"model": "smollm2-135m", "webhook_url": bad}, headers=auth)
                assert r.status_code == 422 and why in r.json()["detail"], r.text
        time.sleep(1.5)  # the API (no worker running) sends nothing: its changes wait in the outbox
        assert handler.got == []
        pending = svc.store.outbox.deliveries()
        assert [r.attempts for r in pending] == [0] * 4 and all(r.due_at is not None for r in pending)
        with worker(tmp_path / "data", svc.settings.db_url) as proc:
            # four events (QUEUED, CANCELLED of each job), each refused twice (503) before it is taken
            wait_for(lambda: len(handler.got) >= 12, timeout=60)
            time.sleep(0.5)  # nothing more comes: a 2xx ends an event's deliveries
            rows = svc.store.outbox.deliveries()
    assert len(handler.got) == 12
    assert all(h["user-agent"] == "pbs2p-webhooks" for h, _, _ in handler.got)
    events = []
    for tries in check_deliveries(handler.got).values():  # in the order of their first delivery
        assert len(tries) == 3
        gaps = [tries[i + 1][1] - tries[i][1] for i in (0, 1)]
        assert gaps[0] >= 0.9 and gaps[1] >= 1.9  # backoff: 1 s, then 2 s (lower bounds only)
        event = json.loads(tries[0][0])
        events.append((event["job"]["id"], event["type"], event["job"]["state"]))
    assert events == [
        (job_id, "job.state_changed", "QUEUED"),
        (job_id, "job.state_changed", "CANCELLED"),
        (deleted_id, "job.state_changed", "QUEUED"),
        (deleted_id, "job.deleted", "CANCELLED"),
    ]
    for row in rows:  # sent by the worker process, recorded in the store
        assert owned_by(proc) in str(row.claimed_by) and row.attempts == 3 and row.last_error == "HTTP 503"
        assert row.delivered_at is not None and row.due_at is None and row.given_up_at is None


def test_a_delivery_pending_when_the_worker_is_killed_is_sent_by_the_next_worker(
    tmp_path: Path, db_url: str, receiver: tuple[str, type[Receiver]]
) -> None:
    url, handler = receiver
    handler.fail_first = 10**6  # refused until the second worker runs
    store = JobStore(db_url)
    try:
        job, _ = store.create_job("acme", "org/m", {"method": "pbs2p"}, webhook_url=url)
        assert store.transition(job.id, [JobState.QUEUED], JobState.CANCELLED)  # 2 events; no job for a worker

        def waiting() -> bool:  # every row tried, its answer recorded, its next attempt not yet made
            rows = store.outbox.deliveries(job.id)
            return all(r.attempts >= 1 and r.due_at is not None and r.last_attempt_at is not None
                       and r.due_at - r.last_attempt_at < outbox.LEASE_S for r in rows)  # fmt: skip

        with worker(tmp_path / "data", db_url) as first:
            wait_for(waiting, timeout=60)
            kill_worker(first)  # SIGKILL while both deliveries wait for their retry
        tried = len(handler.got)
        time.sleep(1.5)  # no worker: nothing is sent (the retry was due after 1 s)
        assert len(handler.got) == tried >= 2
        handler.fail_first = 0
        with worker(tmp_path / "data", db_url) as second:
            wait_for(lambda: all(r.delivered_at is not None for r in store.outbox.deliveries(job.id)), timeout=60)
        rows = store.outbox.deliveries(job.id)
    finally:
        store.close()
    by_event = check_deliveries(handler.got)
    assert [json.loads(tries[0][0])["job"]["state"] for tries in by_event.values()] == ["QUEUED", "CANCELLED"]
    for row in rows:
        assert owned_by(second) in str(row.claimed_by) and row.last_error == "HTTP 503" and row.due_at is None
        assert row.attempts == len(by_event[row.event_id]) >= 2  # the first worker's refused ones, then one more


def sender(url: str, owner: str, attempts: int = 6) -> tuple[JobStore, Sender]:
    """The worker's webhook part over its own store (as a worker process has), not started."""
    store = JobStore(url)
    settings = Settings(webhook_secret=SECRET, webhook_attempts=attempts, poll_seconds=0.05)
    return store, Sender(settings, store, owner)


def test_a_failing_receiver_is_retried_with_backoff_then_given_up(
    db_url: str, receiver: tuple[str, type[Receiver]]
) -> None:
    url, handler = receiver
    handler.fail_first = 10**6
    store, webhooks = sender(db_url, "w1", attempts=3)
    try:
        job, _ = store.create_job("acme", "org/m", {"method": "pbs2p"}, webhook_url=url)
        webhooks.start()
        wait_for(lambda: webhooks.given_up == 1)
        time.sleep(0.5)  # no fourth attempt
        webhooks.stop()
        (row,) = store.outbox.deliveries(job.id)
    finally:
        webhooks.stop()
        store.close()
    (tries,) = check_deliveries(handler.got).values()
    assert len(tries) == 3
    gaps = [tries[i + 1][1] - tries[i][1] for i in (0, 1)]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9  # backoff: 1 s, then 2 s
    assert row.attempts == 3 and row.last_error == "HTTP 503" and row.claimed_by == "w1"
    assert row.given_up_at is not None and row.delivered_at is None and row.due_at is None
    assert webhooks.delivered == 0


def test_two_workers_deliver_each_row_once(db_url: str, receiver: tuple[str, type[Receiver]]) -> None:
    url, handler = receiver
    handler.fail_first = 1  # each event refused once, then taken: a second sender of one attempt shows as a 3rd POST
    (store_a, a), (store_b, b) = sender(db_url, "w-a"), sender(db_url, "w-b")
    try:
        for i in range(20):
            job, _ = store_a.create_job("acme", f"org/m{i}", {"method": "pbs2p"}, webhook_url=url)
            assert store_b.transition(job.id, [JobState.QUEUED], JobState.CANCELLED)
        a.start()
        b.start()
        wait_for(lambda: a.delivered + b.delivered >= 40, timeout=60)
        time.sleep(0.5)
        a.stop()
        b.stop()
        rows = store_a.outbox.deliveries()
    finally:
        a.stop()
        b.stop()
        store_a.close()
        store_b.close()
    by_event = check_deliveries(handler.got)
    assert len(rows) == 40 and set(by_event) == {r.event_id for r in rows}
    assert all(len(tries) == 2 for tries in by_event.values()), {k: len(v) for k, v in by_event.items()}
    assert all(r.delivered_at is not None and r.attempts == 2 and r.claimed_by in ("w-a", "w-b") for r in rows)
    assert a.delivered + b.delivered == 40 and a.given_up + b.given_up == 0


def test_webhooks_are_refused_when_the_service_has_no_secret(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with running_service(tmp_path / "data", root) as svc, httpx.Client(base_url=svc.url, timeout=20) as client:
        r = client.post("/v1/jobs", json={"model": "smollm2-135m", "webhook_url": "http://127.0.0.1:9/x"},
                        headers=svc.key("t"))  # fmt: skip
        assert r.status_code == 422 and "PBS2P_WEBHOOK_SECRET" in r.json()["detail"]
        assert r.json()["errors"][0]["field"] == "webhook_url"
