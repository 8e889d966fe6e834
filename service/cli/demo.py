"""The README's main job: the service up, the real model compressed over HTTP, the artifact downloaded and checked."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pbs2p.core.config import CompressionConfig
from pbs2p.core.errors import Pbs2pError
from pbs2p.core.format import inspect_artifact

from ..client import Client
from ..jobstore import JobStore
from ..settings import Settings
from .progress import JobBar

MODEL = "smollm2-135m"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_service(
    data_dir: Path, env: dict[str, str] | None = None, timeout: float = 120.0, command: str = "serve", *args: str
) -> tuple[subprocess.Popen[bytes], str]:
    """`pbs2p serve` (or `pbs2p api`: `command`, with `args`) in a child process on a free loopback port; returns it
    and its URL once /healthz answers."""
    port = _free_port()
    full_env = {**os.environ, "PBS2P_DATA_DIR": str(data_dir), "PBS2P_HOST": "127.0.0.1", "PBS2P_PORT": str(port)}
    full_env.update(env or {})
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / "service.log", "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(  # its own process group: the service and its local Ray stop together
            [sys.executable, "-m", "pbs2p.service.cli", command, *args],
            env=full_env,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Pbs2pError(f"the service exited with code {proc.returncode}; see {data_dir / 'service.log'}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise Pbs2pError(f"the service did not answer on {url} within {timeout:.0f} s; see {data_dir / 'service.log'}")


def stop_service(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """SIGTERM (running jobs go back to the queue), then whatever is left of its process group is killed."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def run_demo(cfg: CompressionConfig, out: Path, windows: int) -> int:
    t = time.perf_counter()
    data_dir = (out / "service").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = JobStore(Settings(data_dir=data_dir).db_url).create_key("demo")  # what `pbs2p keys create` does
    proc, url = start_service(data_dir)
    print(f"service up at {url} (data in {data_dir}, log in {data_dir / 'service.log'})", file=sys.stderr)
    try:
        client = Client(url, key)
        job = client.submit(MODEL, cfg.to_dict(), {"data": "wiki", "seqlen": cfg.seqlen, "windows": windows}, "demo")
        print(f"submitted {MODEL} over HTTP as job {job['id']}", file=sys.stderr)
        job = client.wait(job["id"], JobBar())
        if job["state"] != "SUCCEEDED":
            raise Pbs2pError(f"job {job['id']} ended {job['state']}: {job.get('error')}")
        artifact = out / "artifact"
        files = client.download(job["id"], artifact)
        print(f"downloaded {len(files) + 1} files to {artifact}, every sha256 verified", file=sys.stderr)
    finally:
        stop_service(proc)
    m = job["metrics"]
    total = inspect_artifact(artifact)["total"]  # true bits from the bytes downloaded
    print(f"\n| model | wiki ppl (seqlen {m['eval_seqlen']}, {m['eval_windows']} windows) | paper bits | true bits |")
    print("|---|---|---|---|")
    print(f"| {MODEL} fp32 | {m['ppl_before']:.2f} | 32 | 32 |")
    print(
        f"| {cfg.method} {cfg.pattern} | {m['ppl_after']:.2f} | {total['paper_bits']:.3f} | {total['true_bits']:.3f} |"
    )
    took = time.perf_counter() - t
    print(f"\nartifact in {artifact} ({took:.0f} s in all); per-layer bits: pbs2p inspect {artifact}", file=sys.stderr)
    return 0
