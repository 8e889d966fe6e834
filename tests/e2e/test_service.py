"""The service end to end: `pbs2p serve` in a child process (API + dispatcher + a local Ray on 127.0.0.1), driven
over real HTTP; the real model compressed and evaluated; the service SIGKILLed mid-job and restarted; artifacts in
S3 (moto's server) with the job store in PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from pbs2p.core.config import CompressionConfig
from pbs2p.core.errors import Pbs2pError
from pbs2p.core.format import MANIFEST_FILE
from pbs2p.service.cli.demo import start_service, stop_service
from pbs2p.service.client import Client
from pbs2p.service.jobstore import JobStore
from pbs2p.service.settings import Settings
from pbs2p.testing.artifacts import file_hashes
from pbs2p.testing.tiny import make_model, save_tokenizer, write_text
from pbs2p.workers.evaluation import EvalSpec, evaluate_model
from pbs2p.workers.job import JobSpec, run_job
from pbs2p.workers.settings import WorkerSettings


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed model root: a seeded tiny Llama (6 blocks) and a calibration text."""
    root = tmp_path_factory.mktemp("roots")
    make_model(root / "tiny", layers=6)
    save_tokenizer(root / "tiny")
    write_text(root / "calib.txt", docs=20)
    return root


def tiny_config(root: Path) -> dict[str, Any]:
    return {"calib": str(root / "calib.txt"), "calib_samples": 4, "seqlen": 32, "block_size": 32, "salient_columns": 2}


def service(data: Path, root: Path | None = None, **env: str) -> tuple[subprocess.Popen[bytes], str, str]:
    """Start `pbs2p serve` on `data` (in its own process group); returns it, its URL and a fresh API key."""
    key = JobStore(Settings(data_dir=data, database_url=env.get("PBS2P_DATABASE_URL", "")).db_url).create_key("t")
    base = {"PBS2P_POLL_SECONDS": "0.2", "PBS2P_RAY_NUM_CPUS": "2", "OMP_NUM_THREADS": "1"}
    if root is not None:
        base["PBS2P_MODEL_ROOTS"] = str(root)
    proc, url = start_service(data, {**base, **env})
    return proc, url, key


@pytest.mark.integration
def test_real_model_over_http(real_model: Path, tmp_path: Path) -> None:
    """Submit the packaged SmolLM2-135M, follow it to SUCCEEDED, download and verify every file, load the
    download and get the perplexity the job reported."""
    proc, url, key = service(tmp_path / "svc")
    try:
        client = Client(url, key)
        # block tuning off: the SPBO report compares each linear's error with its one-shot code's, and tuning
        # (on by default) trades the linears' own errors for the block's output error
        cfg = {
            "calib_samples": 4,
            "seqlen": 128,
            "block_tune_steps": 0,
            "ablations": {"cfs_samples": 4, "spbo_report": True},
        }
        job = client.submit("smollm2-135m", cfg, {"data": "wiki", "seqlen": 128, "windows": 2}, name="real")
        seen: list[dict[str, Any]] = []
        job = client.wait(job["id"], seen.append)
        assert job["state"] == "SUCCEEDED", job["error"]
        stages = {j["progress"].get("stage") for j in seen}
        assert "compress" in stages and any(j["progress"].get("eta_seconds") is not None for j in seen)
        blocks = job["report"]["blocks"]
        assert len(blocks) == 30 and sum(b["n_keep"] for b in blocks) == 6 * 30  # CFS keeps the average N
        layer = blocks[0]["linears"][0]
        assert layer["rel_error_oneshot"] >= layer["rel_error"] > 0
        m = job["metrics"]
        assert m["true_bits"] < 2.2 and m["ppl_before"] < m["ppl_after"]
        files = client.download(job["id"], tmp_path / "dl")
        assert {f["name"] for f in files} >= {"config.json", "tokenizer.json"}
        again = evaluate_model(tmp_path / "dl", EvalSpec(seqlen=128, windows=2))  # the packed artifact
        assert again["ppl"] == pytest.approx(m["ppl_after"], rel=1e-6)
    finally:
        stop_service(proc)


def test_killed_service_finishes_the_job_once(roots: Path, tmp_path: Path) -> None:
    """SIGKILL the whole service mid-job (the API's process group and its worker's, Ray included), start it again:
    the job resumes from its last checkpointed block, finishes exactly once, and its artifact is the uninterrupted
    run's, byte for byte. (tests/e2e/test_worker.py kills the API and the worker apart.)"""
    data = tmp_path / "svc"
    proc, url, key = service(data, roots)
    client = Client(url, key)
    try:
        job = client.submit(str(roots / "tiny"), tiny_config(roots))
        deadline = time.monotonic() + 600  # generous: the CI machine may be busy
        while (client.get(job["id"])["progress"].get("block") or 0) < 2:
            assert time.monotonic() < deadline, "the job never reached block 2"
            time.sleep(0.1)
    finally:
        workers = psutil.Process(proc.pid).children()  # the worker child: a process group of its own
        os.killpg(proc.pid, signal.SIGKILL)
        for worker in workers:
            os.killpg(worker.pid, signal.SIGKILL)
        proc.wait()
    with pytest.raises(Pbs2pError, match="cannot reach"):  # the service is gone
        client.get(job["id"])
    proc, url, _ = service(data, roots)
    try:
        client = Client(url, key)
        done = client.wait(job["id"])
        assert done["state"] == "SUCCEEDED", done["error"]
        assert done["attempts"] == 2
        assert [j["id"] for j in client.list_jobs()] == [job["id"]]
        client.download(job["id"], tmp_path / "dl")
    finally:
        stop_service(proc)
    log = (data / "service.log").read_text()
    assert f"resuming job {job['id']} after block" in log
    assert log.count(f"job {job['id']}: SUCCEEDED") == 1

    spec = JobSpec(str(roots / "tiny"), CompressionConfig.from_dict(done["config"]))  # uninterrupted, here
    run_job(spec, tmp_path / "local", WorkerSettings(cache_dir=tmp_path / "cache"))
    local = file_hashes(tmp_path / "local")
    assert MANIFEST_FILE in local and file_hashes(tmp_path / "dl") == local


def test_s3_artifacts_and_postgres_store(
    roots: Path, tmp_path: Path, s3_endpoint: str, s3_client: Any, bucket: str, pg_url: str
) -> None:
    """Production wiring: the model read from an s3:// prefix, artifacts uploaded to S3 over HTTP, downloads
    redirected to presigned URLs, jobs in PostgreSQL."""
    for f in sorted((roots / "tiny").iterdir()):
        s3_client.upload_file(str(f), bucket, f"models/tiny/{f.name}")
    env = {
        "PBS2P_DATABASE_URL": pg_url,
        "PBS2P_STORAGE_URL": f"s3://{bucket}/artifacts",
        "PBS2P_S3_ENDPOINT_URL": s3_endpoint,
        "PBS2P_S3_REGION": "us-east-1",
        "PBS2P_S3_PATH_STYLE": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    proc, url, key = service(tmp_path / "svc", roots, **env)
    try:
        client = Client(url, key)
        job = client.wait(client.submit(f"s3://{bucket}/models/tiny", tiny_config(roots))["id"])
        assert job["state"] == "SUCCEEDED", job["error"]
        listing = client.http.get(f"/v1/jobs/{job['id']}/artifact").json()
        first = listing["files"][0]
        resp = client.http.get(first["url"], follow_redirects=False)
        assert resp.status_code == 307 and resp.headers["location"].startswith(s3_endpoint)
        body = httpx.get(resp.headers["location"]).content  # a plain client, no API key: the URL is presigned
        assert hashlib.sha256(body).hexdigest() == first["sha256"]
        client.download(job["id"], tmp_path / "dl")
    finally:
        stop_service(proc)
    with JobStore(pg_url).session() as s:  # the job lives in PostgreSQL
        from sqlalchemy import text

        assert s.execute(text("SELECT state FROM jobs")).scalars().all() == ["SUCCEEDED"]
