"""Jobs out of the API process (`pbs2p api` + `pbs2p worker`, and `pbs2p serve` supervising a worker child): real
processes on 127.0.0.1, a SQLite file or PostgreSQL, a local Ray per worker. SIGKILL of the API leaves the job
running; SIGKILL (or a freeze) of the worker hands the job to the next worker, which resumes it from its last
checkpointed block to the uninterrupted run's bytes; a cancel and a DELETE reach a worker through the store."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from pbs2p.core.config import CompressionConfig
from pbs2p.core.format import MANIFEST_FILE
from pbs2p.service.cli.demo import start_service, stop_service
from pbs2p.service.client import Client
from pbs2p.service.jobstore import JobStore
from pbs2p.service.settings import Settings
from pbs2p.testing.artifacts import file_hashes
from pbs2p.testing.tiny import make_model, save_tokenizer, write_text
from pbs2p.workers.job import JobSpec, run_job
from pbs2p.workers.settings import WorkerSettings

LEASE_S = 4.0
BASE_ENV = {
    "PBS2P_POLL_SECONDS": "0.2",
    "PBS2P_LEASE_SECONDS": str(LEASE_S),
    "PBS2P_RAY_NUM_CPUS": "1",
    "OMP_NUM_THREADS": "1",
}


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed model root: a seeded tiny Llama (8 blocks: a few seconds of work) and a calibration text."""
    root = tmp_path_factory.mktemp("roots")
    make_model(root / "tiny", layers=8)
    save_tokenizer(root / "tiny")
    write_text(root / "calib.txt", docs=20)
    return root


@pytest.fixture(params=["sqlite", "postgresql"])
def db_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The job store: a SQLite file under the data dir, or a fresh PostgreSQL schema (pg_url skips loudly)."""
    if request.param == "sqlite":
        return {}
    return {"PBS2P_DATABASE_URL": request.getfixturevalue("pg_url")}


def tiny_config(root: Path) -> dict[str, Any]:
    return {"calib": str(root / "calib.txt"), "calib_samples": 4, "seqlen": 32, "block_size": 32, "salient_columns": 2}


class Processes:
    """The service's processes of one test, each in a process group of its own; whatever is left is killed."""

    def __init__(self, data: Path, env: dict[str, str]) -> None:
        self.data, self.env = data, env
        self.procs: list[subprocess.Popen[bytes]] = []

    def api(self, command: str = "api") -> str:
        proc, url = start_service(self.data, self.env, 120.0, command)
        self.procs.append(proc)
        return url

    def worker(self) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.env, "PBS2P_DATA_DIR": str(self.data)}
        with open(self.data / "service.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "pbs2p.service.cli", "worker"], env=env, stdout=log,
                                    stderr=log, start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                stop_service(proc)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def processes(data: Path, db: dict[str, str], root: Path, **env: str) -> Iterator[tuple[Processes, str]]:
    """(the processes, an API key of tenant t); the store is created here, as `pbs2p keys create` would."""
    data.mkdir(parents=True)
    env = {**BASE_ENV, **db, "PBS2P_MODEL_ROOTS": str(root), **env}
    store = JobStore(Settings(data_dir=data, database_url=db.get("PBS2P_DATABASE_URL", "")).db_url)
    key = store.create_key("t")
    store.close()
    procs = Processes(data, env)
    try:
        yield procs, key
    finally:
        procs.close()


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout  # generous: the machine may be busy
    while True:
        got = cond()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def block_of(job: dict[str, Any]) -> int:
    return int(job["progress"].get("block") or 0) if job["state"] == "RUNNING" else 0


def uninterrupted(root: Path, config: dict[str, Any], out: Path) -> dict[str, str]:
    """The artifact's file hashes of the same job run here, start to end."""
    run_job(JobSpec(str(root / "tiny"), CompressionConfig.from_dict(config)), out, WorkerSettings(cache_dir=out.parent))
    hashes = file_hashes(out)
    assert MANIFEST_FILE in hashes
    return hashes


def test_killed_api_leaves_the_job_running(roots: Path, tmp_path: Path, db_env: dict[str, str]) -> None:
    """SIGKILL the API while a worker runs a job: the job goes on (its progress moves in the store while no API
    runs), a new API process sees it SUCCEEDED after one attempt; a DELETE through that API reaches the worker: the
    running job stops, its checkpoints and row go."""
    data = tmp_path / "svc"
    with processes(data, db_env, roots) as (procs, key):
        procs.worker()
        url = procs.api()
        client = Client(url, key)
        job = client.submit(str(roots / "tiny"), tiny_config(roots))
        wait_for("block 1", lambda: block_of(client.get(job["id"])) >= 1)
        api = procs.procs[-1]
        os.killpg(api.pid, signal.SIGKILL)
        api.wait()
        store = JobStore(Settings(data_dir=data, database_url=db_env.get("PBS2P_DATABASE_URL", "")).db_url)
        try:
            at_kill = store.get(job["id"])
            assert at_kill is not None and at_kill.state.value == "RUNNING"
            wait_for("progress without an API", lambda: _moved(store, job["id"], at_kill.progress, at_kill.state))
        finally:
            store.close()
        client = Client(procs.api(), key)
        done = client.wait(job["id"])
        assert done["state"] == "SUCCEEDED", done["error"]
        assert done["attempts"] == 1
        client.download(job["id"], tmp_path / "dl")

        second = client.submit(str(roots / "tiny"), tiny_config(roots), name="deleted while running")
        wait_for("block 1 of the second job", lambda: block_of(client.get(second["id"])) >= 1)
        assert client.http.delete(f"/v1/jobs/{second['id']}").status_code == 202
        assert client.http.get(f"/v1/jobs/{second['id']}").status_code == 404  # gone for the tenant at once
        store = JobStore(Settings(data_dir=data, database_url=db_env.get("PBS2P_DATABASE_URL", "")).db_url)
        try:
            wait_for("the worker to remove the deleted job", lambda: store.get(second["id"]) is None)
        finally:
            store.close()
        assert not (data / "checkpoints" / second["id"]).exists()
    log = (data / "service.log").read_text()
    assert log.count(f"job {job['id']}: SUCCEEDED") == 1 and f"job {second['id']}: CANCELLED" in log
    assert file_hashes(tmp_path / "dl") == uninterrupted(roots, done["config"], tmp_path / "local")


def _moved(store: JobStore, job_id: str, progress: dict[str, Any], state: Any) -> bool:
    now = store.get(job_id)
    return now is not None and (now.progress != progress or now.state != state)


def test_killed_worker_is_restarted_and_resumes(roots: Path, tmp_path: Path, db_env: dict[str, str]) -> None:
    """`pbs2p serve`: SIGKILL its worker child (the worker's process group: the worker and its Ray) mid-job. The
    supervisor starts a new worker, which re-queues the dead worker's job and resumes it from the last checkpointed
    block: SUCCEEDED once, after two attempts, with the uninterrupted run's bytes. A cancel reaches it too."""
    data = tmp_path / "svc"
    with processes(data, db_env, roots) as (procs, key):
        client = Client(procs.api("serve"), key)
        serve = psutil.Process(procs.procs[-1].pid)
        job = client.submit(str(roots / "tiny"), tiny_config(roots))
        wait_for("block 2", lambda: block_of(client.get(job["id"])) >= 2)
        (worker,) = [p for p in serve.children() if "worker" in p.cmdline()]
        os.killpg(worker.pid, signal.SIGKILL)
        done = client.wait(job["id"])  # the API never stopped answering
        assert done["state"] == "SUCCEEDED", done["error"]
        assert done["attempts"] == 2
        (again,) = [p for p in serve.children() if "worker" in p.cmdline()]
        assert again.pid != worker.pid
        client.download(job["id"], tmp_path / "dl")

        second = client.submit(str(roots / "tiny"), tiny_config(roots), name="cancelled")
        wait_for("block 1 of the second job", lambda: block_of(client.get(second["id"])) >= 1)
        client.http.post(f"/v1/jobs/{second['id']}/cancel").raise_for_status()
        assert client.wait(second["id"])["state"] == "CANCELLED"
    log = (data / "service.log").read_text()
    assert f"resuming job {job['id']} after block" in log
    assert log.count(f"job {job['id']}: SUCCEEDED") == 1
    assert f"worker (pid {worker.pid}) exited with -9; restarting it" in log
    assert file_hashes(tmp_path / "dl") == uninterrupted(roots, done["config"], tmp_path / "local")


def test_frozen_worker_loses_its_job_when_its_lease_expires(roots: Path, tmp_path: Path, pg_url: str) -> None:
    """A worker that stops heartbeating but is not dead (SIGSTOP: a hung host, a network partition) keeps its job
    until PBS2P_LEASE_SECONDS have passed; then another worker re-queues and resumes it. The frozen one, woken,
    finds the job no longer its own and leaves it alone (PostgreSQL store)."""
    data = tmp_path / "svc"
    lease = 20.0  # longer than a worker takes to start here: the re-queue is the lease's, not the new worker's start
    with processes(data, {"PBS2P_DATABASE_URL": pg_url}, roots, PBS2P_LEASE_SECONDS=str(lease)) as (procs, key):
        first = procs.worker()
        client = Client(procs.api(), key)
        job = client.submit(str(roots / "tiny"), tiny_config(roots))
        wait_for("block 2", lambda: block_of(client.get(job["id"])) >= 2)
        os.killpg(first.pid, signal.SIGSTOP)  # the worker and its Ray freeze
        frozen_at = time.time()
        procs.worker()
        wait_for("the job to be re-queued", lambda: client.get(job["id"])["attempts"] == 2)
        assert time.time() - frozen_at >= lease - 1.0  # not before its lease ran out (the owner's pid is alive)
        os.killpg(first.pid, signal.SIGCONT)
        done = client.wait(job["id"])
        assert done["state"] == "SUCCEEDED", done["error"]
        client.download(job["id"], tmp_path / "dl")
    log = (data / "service.log").read_text()
    assert f"resuming job {job['id']} after block" in log
    assert log.count(f"job {job['id']}: SUCCEEDED") == 1
    assert file_hashes(tmp_path / "dl") == uninterrupted(roots, done["config"], tmp_path / "local")
