"""What happens to jobs after they run: deletion (the row, its artifact and its checkpoints) and the retention of
finished artifacts (PBS2P_ARTIFACT_RETENTION_DAYS). `maintain` is the dispatcher's periodic task; `purge` also runs
at once for a DELETE of a job that is not running."""

from __future__ import annotations

import logging
import time

from pbs2p.workers.storage import Storage, storage_from_url

from .jobstore import Job, JobStore
from .settings import Settings

log = logging.getLogger(__name__)


def checkpoints_of(settings: Settings) -> Storage:
    return storage_from_url(settings.checkpoints_url, settings.s3)


def purge(store: JobStore, storage: Storage, checkpoints: Storage, job: Job) -> bool:
    """Remove a finished job's artifact and checkpoints, then its row; False (left for the next round) when the
    storage refused."""
    try:
        if job.artifact:
            storage.delete_prefix(job.artifact.rstrip("/") + "/")
        checkpoints.delete_prefix(job.id + "/")
    except Exception as exc:  # the row stays (hidden) and the next round tries again
        log.warning("job %s: deleted, but its files are not removed yet: %s", job.id, exc)
        return False
    return store.remove(job.id)


def expire(store: JobStore, storage: Storage, job: Job) -> bool:
    """Remove the artifact of `job`; the job keeps its report and says when its artifact expired."""
    assert job.artifact is not None
    try:
        storage.delete_prefix(job.artifact.rstrip("/") + "/")
    except Exception as exc:
        log.warning("job %s: expired artifact not removed yet: %s", job.id, exc)
        return False
    return store.mark_artifact_expired(job.id)


def maintain(store: JobStore, storage: Storage, checkpoints: Storage, settings: Settings) -> tuple[int, int]:
    """One round: remove deleted jobs whose run has ended, and artifacts past their retention. (purged, expired)"""
    purged = sum(purge(store, storage, checkpoints, job) for job in store.deleted_and_finished())
    expired = 0
    if settings.artifact_retention_days > 0:
        cutoff = time.time() - settings.artifact_retention_days * 86400
        for job in store.expired_artifacts(cutoff):
            if expire(store, storage, job):
                expired += 1
                log.info("job %s: artifact removed (older than %g days)", job.id, settings.artifact_retention_days)
    return purged, expired
