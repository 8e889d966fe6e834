"""The HTTP API (FastAPI): jobs under /v1 behind `Authorization: Bearer <key>`, errors as RFC 9457 problems.

`create_app` only assembles: the collaborators go into `app.state`, the routes (routes/) reach them through
dependencies (deps.py), errors become problem documents (problems.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from pbs2p.workers.storage import Storage

from ..jobstore import JobStore
from ..settings import Settings
from .dashboard import mount_dashboard
from .deps import AppState
from .hotpath import HotReads
from .metrics import Metrics
from .middleware import BodyLimit, RequestContext
from .problems import add_problem_handlers, problem_openapi
from .routes import artifacts, events, jobs, ops


def create_app(settings: Settings, store: JobStore, storage: Storage, dispatcher: Any = None) -> FastAPI:
    """The API over `store` and `storage`; `dispatcher` (optional) is started and stopped with the app. The API sends
    no webhook: its state changes leave theirs in the store's outbox, for a worker (or `dispatcher`) to deliver."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if dispatcher is not None:
            dispatcher.start()
        try:
            yield
        finally:
            if dispatcher is not None:
                await run_in_threadpool(dispatcher.stop)

    app = FastAPI(
        title="pbs2p",
        version="1",
        summary="PBS²P compression jobs: 1-bit weights on N:M sparsity for LLMs",
        lifespan=lifespan,
    )
    metrics = Metrics(store, getattr(dispatcher, "metrics", None))
    app.state.pbs2p = AppState(settings, store, storage, dispatcher, metrics)
    add_problem_handlers(app)
    app.add_middleware(HotReads)  # innermost: the polling GETs' plain case, inside the two below
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestContext, metrics=metrics, access_log=settings.access_log)  # outermost
    for router in (ops.router, jobs.router, events.router, artifacts.router):
        app.include_router(router)
    problem_openapi(app)
    mount_dashboard(app)  # the web UI at /ui/ (and / redirects there); its data comes from /v1
    return app
