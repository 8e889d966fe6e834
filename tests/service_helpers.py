"""Shared pieces of the service tests: the real API served by uvicorn on 127.0.0.1 in a background thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings
from service.store import Store
from workers.storage import LocalStorage, storage_from_url


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
    store: Store
    storage: LocalStorage
    root: Path  # the only allowed model root

    def key(self, tenant: str) -> dict[str, str]:
        """Headers with a fresh API key of `tenant`."""
        return {"Authorization": f"Bearer {self.store.create_key(tenant)}"}


@contextmanager
def running_service(data_dir: Path, root: Path, **settings: object) -> Iterator[Service]:
    """The app of `create_app` over a SQLite store and local storage in `data_dir`; models allowed under `root`."""
    cfg = Settings(data_dir=data_dir, model_roots=str(root), dispatcher=False, poll_seconds=0.05, **settings)
    store = Store(f"sqlite:///{data_dir / 'jobs.db'}")
    storage = storage_from_url(str(data_dir / "artifacts"))
    assert isinstance(storage, LocalStorage)
    app = create_app(cfg, store, storage, dispatcher=None)
    try:
        with serve(app) as url:
            yield Service(url=url, settings=cfg, store=store, storage=storage, root=root.resolve())
    finally:
        store.close()
