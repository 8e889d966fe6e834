"""A finished job's artifact: its files (size, sha256, URL) and each file's bytes or a presigned URL."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import FileResponse, RedirectResponse

from pbs2p.core.format import MANIFEST_FILE
from pbs2p.workers.storage import LocalStorage, ObjectNotFound, Storage, StorageError, check_key, join_key

from ...jobstore import Job, JobState
from ..deps import OwnJob, State
from ..problems import Problem, error_responses
from ..schemas import ArtifactFile, ArtifactPublic

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs/{job_id}/artifact", tags=["artifacts"])


def manifest_of(job: Job, storage: Storage) -> dict[str, Any]:
    if job.artifact_expired_at is not None:
        raise Problem(
            410,
            "Artifact expired",
            f"the artifact of job {job.id} was removed after the retention period (PBS2P_ARTIFACT_RETENTION_DAYS); "
            f"the job keeps its metrics and report",
        )
    if job.state != JobState.SUCCEEDED or not job.artifact:
        raise Problem(
            409, "Artifact not ready", f"job {job.id} is {job.state.value}; its artifact exists once it SUCCEEDED"
        )
    try:
        return dict(json.loads(storage.get_bytes(join_key(job.artifact, MANIFEST_FILE))))
    except (ObjectNotFound, StorageError, ValueError) as exc:
        log.error("job %s: artifact manifest unreadable: %s", job.id, exc)
        raise Problem(500, "Artifact unavailable", f"the artifact of job {job.id} cannot be read: {exc}") from None


@router.get(
    "", operation_id="get_artifact", response_model=ArtifactPublic, responses=error_responses(401, 404, 409, 410, 422)
)
def artifact(job: OwnJob, state: State) -> ArtifactPublic:
    """Every file of the artifact with its size, sha256 and download URL (manifest.json last)."""
    manifest = manifest_of(job, state.storage)
    base = f"/v1/jobs/{job.id}/artifact"
    files = [
        ArtifactFile(name=name, size=int(e["size"]), sha256=str(e["sha256"]), url=f"{base}/{name}")
        for name, e in sorted(manifest.get("files", {}).items())
    ]
    return ArtifactPublic(
        job=job.id, format_version=manifest.get("format_version"), files=files, manifest_url=f"{base}/{MANIFEST_FILE}"
    )


@router.get(
    "/{name:path}",
    operation_id="download_artifact_file",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file (local storage)"},
        307: {"description": "Redirect to a presigned URL of the file (S3 storage)"},
        **error_responses(401, 404, 409, 410, 422),
    },
)
def artifact_file(job: OwnJob, name: str, state: State) -> Response:
    """One file: a redirect to a presigned URL (S3) or the bytes (local storage)."""
    storage = state.storage
    manifest = manifest_of(job, storage)
    if name != MANIFEST_FILE and name not in manifest.get("files", {}):
        raise Problem(404, "Not found", f"the artifact of job {job.id} has no file {name!r}")
    assert job.artifact is not None
    key = join_key(job.artifact, check_key(name))
    if isinstance(storage, LocalStorage):
        return FileResponse(storage.locate(key), media_type="application/octet-stream", filename=name)
    url = storage.url(key, expires=state.settings.presign_seconds)
    if url is None:
        raise Problem(500, "No download URL", f"the storage backend gives no URL for {name}")
    return RedirectResponse(url, status_code=307)
