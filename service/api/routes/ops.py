"""Operations: liveness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import State

router = APIRouter(tags=["ops"])


@router.get("/healthz")
def healthz(state: State) -> dict[str, Any]:
    state.store.counts()  # the database answers
    dispatcher = state.dispatcher
    return {"status": "ok", "dispatcher": dispatcher is not None and dispatcher.alive()}


@router.get("/metrics", response_class=Response)
def prometheus(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
