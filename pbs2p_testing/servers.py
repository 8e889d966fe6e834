"""Real servers on 127.0.0.1 for tests and benchmarks: an S3 endpoint (moto's server) and the API (uvicorn)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from pbs2p.service.api import create_app
from pbs2p.service.jobstore import JobStore
from pbs2p.service.settings import Settings
from pbs2p.workers.storage import LocalStorage, storage_from_url

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only, whatever the env says


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def moto_server(log_path: Path, timeout: float = 30.0) -> Iterator[str]:
    """moto's S3 server as a subprocess on a free loopback port; yields its URL, stops it after."""
    port = free_port()
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                _NO_PROXY.open(url + "/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on {url} within {timeout:.0f} s") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """Serve `app` over real HTTP on a free port of 127.0.0.1; yields the base URL, stops the server after."""
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)
        assert not thread.is_alive(), "uvicorn did not stop"


@dataclass
class Service:
    """A running API: its base URL and the store, storage and settings behind it."""

    url: str
    settings: Settings
    store: JobStore
    storage: LocalStorage
    root: Path  # the only allowed model root

    def key(self, tenant: str) -> dict[str, str]:
        """Headers with a fresh API key of `tenant`."""
        return {"Authorization": f"Bearer {self.store.create_key(tenant)}"}


@contextmanager
def running_service(data_dir: Path, root: Path, **settings: Any) -> Iterator[Service]:
    """The app of `create_app` over a SQLite store and local storage in `data_dir`; models allowed under `root`."""
    cfg = Settings(data_dir=data_dir, model_roots=str(root), dispatcher=False, poll_seconds=0.05, **settings)
    store = JobStore(f"sqlite:///{data_dir / 'jobs.db'}")
    storage = storage_from_url(str(data_dir / "artifacts"))
    assert isinstance(storage, LocalStorage)
    app = create_app(cfg, store, storage, dispatcher=None)
    try:
        with serve(app) as url:
            yield Service(url=url, settings=cfg, store=store, storage=storage, root=root.resolve())
    finally:
        store.close()
