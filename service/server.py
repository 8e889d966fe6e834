"""`pbs2p serve` and `pbs2p api`: the API over the job store and the artifact storage, with (serve) or without
(api) the job driver: by default a `pbs2p worker` child that this process supervises (service/worker.py), or with
`serve --one-process` the dispatcher in this process (as before the worker existed)."""

from __future__ import annotations

import logging
import os

import uvicorn
from fastapi import FastAPI

from pbs2p.workers.storage import storage_from_url

from .api import create_app
from .dispatcher import Dispatcher
from .jobstore import JobStore
from .settings import Settings
from .worker import WorkerProcess

log = logging.getLogger(__name__)
MODES = ("serve", "api", "one-process")  # API + worker child; API only; API + dispatcher in this process


def configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    access = logging.getLogger("pbs2p.access")  # JSON lines as they are, not wrapped in the text format
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.handlers, access.propagate = [handler], False


def build_app(settings: Settings, mode: str = "one-process") -> FastAPI:
    """The app of `mode` (MODES). PBS2P_DISPATCHER=false makes any mode API only."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: use one of {', '.join(MODES)}")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.db_url)
    storage = storage_from_url(settings.artifacts_url, settings.s3)
    driver: Dispatcher | WorkerProcess | None = None
    if settings.dispatcher and mode == "one-process":
        driver = Dispatcher(settings, store, storage)
    elif settings.dispatcher and mode == "serve":  # the worker reads the same settings (the data dir given here)
        driver = WorkerProcess({**os.environ, "PBS2P_DATA_DIR": str(settings.data_dir.resolve())})
    return create_app(settings, store, storage, driver)


def serve(settings: Settings, mode: str = "serve") -> None:
    configure_logging(settings)
    app = build_app(settings, mode)
    jobs = {"serve": "a worker process", "api": "none (API only)", "one-process": "in this process"}[mode]
    log.info(
        "pbs2p %s on http://%s:%d (database %s, artifacts %s, Ray %s, jobs: %s)",
        "api" if mode == "api" else "serve",
        settings.host,
        settings.port,
        settings.db_url.split("@")[-1],  # no password in the log
        settings.artifacts_url,
        settings.ray_address,
        jobs if settings.dispatcher else "none (PBS2P_DISPATCHER=false)",
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
