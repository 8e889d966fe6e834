"""`pbs2p serve`: the job store, the artifact storage, the dispatcher and the API in one process."""

from __future__ import annotations

import logging

import uvicorn
from fastapi import FastAPI

from pbs2p.workers.storage import storage_from_url

from .api import create_app
from .dispatcher import Dispatcher
from .jobstore import JobStore
from .settings import Settings

log = logging.getLogger(__name__)


def build_app(settings: Settings) -> FastAPI:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = JobStore(settings.db_url)
    storage = storage_from_url(settings.artifacts_url, settings.s3)
    dispatcher = Dispatcher(settings, store, storage) if settings.dispatcher else None
    return create_app(settings, store, storage, dispatcher)


def serve(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    access = logging.getLogger("pbs2p.access")  # JSON lines as they are, not wrapped in the text format
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.handlers, access.propagate = [handler], False
    app = build_app(settings)
    log.info(
        "pbs2p serve on http://%s:%d (database %s, artifacts %s, Ray %s)",
        settings.host,
        settings.port,
        settings.db_url.split("@")[-1],  # no password in the log
        settings.artifacts_url,
        settings.ray_address,
    )
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level, access_log=False)
