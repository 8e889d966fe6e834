"""Operations: liveness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import State
from ..schemas import Health

router = APIRouter(tags=["ops"])


@router.get("/healthz", operation_id="healthz", response_model=Health)
def healthz(state: State) -> Health:
    """Liveness: the database answers; whether this process's dispatcher runs."""
    state.store.counts()  # the database answers
    dispatcher = state.dispatcher
    return Health(status="ok", dispatcher=dispatcher is not None and dispatcher.alive())


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
def prometheus(state: State) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
