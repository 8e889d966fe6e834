"""The dispatcher: takes queued jobs from the store and runs them on Ray with bounded concurrency.

It runs in `pbs2p worker` (service/worker.py), apart from the API, or inside the API with
`pbs2p serve --one-process`. Each job runs in a thread of this process as the Ray driver of `compress_model_ray`
(the job coordinator), checkpointing every block under PBS2P_CHECKPOINT_URL/<job id>. The dispatcher heartbeats
the jobs it owns; a job whose owner stopped heartbeating (a killed worker) is re-queued by whichever dispatcher
notices, and resumes from its last checkpointed block. Cancellation is cooperative: the job stops at its next block
(a cancel or a DELETE is a state change in the store, which its progress report reads). With PBS2P_WEBHOOK_SECRET
set it also delivers the webhooks waiting in the store's outbox, the API's and other workers' too (service/webhooks.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pbs2p.core.config import CompressionConfig
from pbs2p.core.errors import Pbs2pError
from pbs2p.workers.distributed import init_ray, shutdown_ray
from pbs2p.workers.evaluation import EvalSpec
from pbs2p.workers.job import JobSpec, RayOptions, Upload, run_job
from pbs2p.workers.storage import Storage, storage_from_url

from . import lifecycle
from .jobmetrics import JobMetrics
from .jobstore import ACTIVE, Job, JobState, JobStore
from .settings import Settings
from .webhooks import Sender

log = logging.getLogger(__name__)
MAINTAIN_S = 60.0  # how often the dispatcher removes deleted jobs and expired artifacts


class JobCancelled(Exception):
    """The job was asked to stop (CANCELLING)."""


class LostJob(Exception):
    """This dispatcher no longer owns the job (it was re-queued elsewhere)."""


class ShuttingDown(Exception):
    """The service is stopping: the job goes back to the queue and resumes later."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobProgress:
    """The progress callback of one job: records stage, block i of L and an ETA in the store (at most every
    half second), and raises when the job must stop (cancel, lost ownership, shutdown)."""

    def __init__(self, store: JobStore, job_id: str, owner: str, stopping: threading.Event) -> None:
        self.store, self.job_id, self.owner, self.stopping = store, job_id, owner, stopping
        self.last_write = 0.0
        self.stage_start: tuple[str, float, int] | None = None  # (stage, time, done) when this stage's work began

    def __call__(self, stage: str, done: int, total: int) -> None:
        # the artifact is written (and evaluated): RUNNING -> UPLOADING
        uploading = stage == "upload" and done == 0
        if uploading and not self.store.transition(self.job_id, [JobState.RUNNING], JobState.UPLOADING, self.owner):
            raise self.why_not()
        now = time.time()
        progress: dict[str, Any] = {"stage": stage, "percent": round(100.0 * done / total, 1) if total else None}
        if stage == "compress":
            progress.update(block=done, blocks=total)
        elif stage == "downloading":
            progress.update(bytes_done=done, bytes_total=total)
        if self.stage_start is None or self.stage_start[0] != stage:
            self.stage_start = (stage, now, done)
        _, t0, d0 = self.stage_start
        if done > d0 and total:  # the stage's ETA from its own rate so far (blocks, or bytes while downloading)
            progress["eta_seconds"] = round((now - t0) / (done - d0) * (total - done), 1)
        if now - self.last_write < 0.5 and 0 < done < total and not self.stopping.is_set():
            return
        self.last_write = now
        state = self.store.set_progress(self.job_id, self.owner, progress)
        if state is None:
            raise LostJob(self.job_id)
        if state == JobState.CANCELLING:
            raise JobCancelled(self.job_id)
        if self.stopping.is_set():
            raise ShuttingDown(self.job_id)

    def why_not(self) -> Exception:
        """Why a transition of this runner's failed: a cancel request, or the job is no longer its own."""
        job = self.store.get(self.job_id)
        if job is not None and job.state == JobState.CANCELLING and job.owner == self.owner:
            return JobCancelled(self.job_id)
        return LostJob(self.job_id)


TRANSIENT_ERRORS = (TimeoutError, ConnectionError)  # and Ray's lost nodes, workers and objects (below)


def failure_cause(exc: BaseException) -> str:
    """`transient` (may work when tried again: a storage timeout, a dropped connection, a lost Ray node, worker or
    object), `invalid` (the job's input: a Pbs2pError says what to change), else `internal`."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:  # the cause chain: a Pbs2pError may wrap a timeout
        seen.add(id(e))
        if isinstance(e, TRANSIENT_ERRORS) or _ray_lost(e) or _storage_timeout(e):
            return "transient"
        e = e.__cause__ or e.__context__
    return "invalid" if isinstance(exc, Pbs2pError) else "internal"


def _ray_lost(exc: BaseException) -> bool:
    try:
        from ray import exceptions as rex
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    lost = (rex.NodeDiedError, rex.WorkerCrashedError, rex.RayActorError, rex.ObjectLostError,
            rex.RaySystemError, rex.OwnerDiedError)  # fmt: skip
    return isinstance(exc, lost)


def _storage_timeout(exc: BaseException) -> bool:
    """botocore's timeouts and connection failures (an S3 endpoint that did not answer in time)."""
    try:
        from botocore import exceptions as bex
    except ImportError:  # pragma: no cover - boto3 is a dependency
        return False
    if isinstance(exc, bex.ClientError):  # the server's own trouble (5xx, SlowDown, RequestTimeout) passes
        err, meta = exc.response.get("Error", {}), exc.response.get("ResponseMetadata", {})
        return int(meta.get("HTTPStatusCode") or 0) >= 500 or err.get("Code") in ("SlowDown", "RequestTimeout")
    return isinstance(exc, bex.ConnectionError | bex.HTTPClientError | bex.ConnectTimeoutError | bex.ReadTimeoutError)


class Dispatcher:
    def __init__(self, settings: Settings, store: JobStore, storage: Storage) -> None:
        self.settings, self.store, self.storage = settings, store, storage
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.stopping = threading.Event()
        self.draining = threading.Event()  # set: take no new job (the running ones finish)
        self.pool = ThreadPoolExecutor(settings.max_running_jobs, thread_name_prefix="pbs2p-job")
        self.running: dict[str, Future[None]] = {}
        self.thread: threading.Thread | None = None
        self.ray_address: str | None = None
        self.metrics = JobMetrics()
        self.webhooks = Sender(settings, store, self.owner) if settings.webhook_secret else None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.webhooks is not None:
            self.webhooks.start()
        self.thread = threading.Thread(target=self._loop, name="pbs2p-dispatcher", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def busy(self) -> bool:
        """Whether a job of this dispatcher is still running."""
        return any(not f.done() for f in list(self.running.values()))

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking jobs; running ones stop at their next progress report and go back to the queue."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.webhooks is not None:  # after the jobs: their last state changes are in the outbox by now
            self.webhooks.stop()
        shutdown_ray()  # a local Ray started by this process stops with it (its agents would linger)

    def _loop(self) -> None:
        try:
            self._start_ray()
        except Exception:
            log.exception("dispatcher: Ray did not start; no job will run")
            return
        last_recover = last_maintain = 0.0
        while not self.stopping.is_set():
            try:
                now = time.time()
                self.running = {k: f for k, f in self.running.items() if not f.done()}
                self.store.heartbeat(self.owner, self.running)
                if now - last_recover >= min(self.settings.lease_seconds / 2, 10.0):
                    last_recover = now
                    moved = self.store.recover(self.settings.lease_seconds, self._dead_owners())
                    if moved:
                        log.warning("re-queued jobs of a dispatcher that is gone: %s", ", ".join(moved))
                if now - last_maintain >= MAINTAIN_S:
                    last_maintain = now
                    lifecycle.maintain(self.store, self.storage, lifecycle.checkpoints_of(self.settings), self.settings)
                while len(self.running) < self.settings.max_running_jobs and not self._halted():
                    job = self.store.claim(self.owner, self.settings.tenant_max_running_jobs)
                    if job is None:
                        break
                    log.info("job %s: started (attempt %d)", job.id, job.attempts)
                    self.running[job.id] = self.pool.submit(self._run, job)
            except Exception:
                log.exception("dispatcher loop")
            self.stopping.wait(self.settings.poll_seconds)

    def _halted(self) -> bool:
        return self.stopping.is_set() or self.draining.is_set()

    def _start_ray(self) -> None:
        address = None if self.settings.ray_address == "local" else self.settings.ray_address
        self.ray_address = init_ray(address, num_cpus=self.settings.ray_num_cpus)

    def _dead_owners(self) -> list[str]:
        """Owners on this host whose process is gone: their jobs need not wait for the lease to expire."""
        host = socket.gethostname()
        dead = []
        for owner in self.store.owners():
            h, _, rest = owner.partition(":")
            pid = rest.partition(":")[0]
            if h == host and owner != self.owner and pid.isdigit() and not _pid_alive(int(pid)):
                dead.append(owner)
        return dead

    # -- one job ----------------------------------------------------------------------------------------
    def _run(self, job: Job) -> None:
        work = Path(self.settings.data_dir) / "work" / job.id
        progress = JobProgress(self.store, job.id, self.owner, self.stopping)
        prefix = f"{job.tenant}/{job.id}"
        try:
            shutil.rmtree(work, ignore_errors=True)
            spec = JobSpec(
                job.model,
                CompressionConfig.from_dict(job.config),
                EvalSpec.model_validate(job.evaluate) if job.evaluate else None,
                RayOptions(
                    address=self.ray_address,
                    workers=self.settings.job_workers,
                    gpus_per_worker=self.settings.gpus_per_worker,
                    job_id=job.id,
                    checkpoint_url=self.settings.checkpoints_url,
                    keep_checkpoint=True,  # removed once SUCCEEDED: a crash during upload must not recompress
                ),
            )
            upload = Upload(self.storage, prefix)
            result = run_job(spec, work / "artifact", self.settings, roots=self.settings.roots, progress=progress,
                             upload=upload)  # fmt: skip
            if self.store.transition(
                job.id, [JobState.UPLOADING], JobState.SUCCEEDED, owner=self.owner, report=result.summary(),
                artifact=prefix, progress={"stage": "done", "percent": 100.0},
            ):  # fmt: skip
                log.info("job %s: SUCCEEDED", job.id)
                self.metrics.finished.labels(JobState.SUCCEEDED.value).inc()
                self.metrics.record_timings(result.timings, time.time() - (job.started_at or time.time()))
                self._clear_checkpoint(job.id)
            else:
                raise progress.why_not()
        except JobCancelled:
            if self.store.transition(job.id, [JobState.CANCELLING], JobState.CANCELLED, owner=self.owner):
                log.info("job %s: CANCELLED", job.id)
                self._clear_checkpoint(job.id)
                done = self.store.get(job.id)
                if done is not None and done.deleted_at is not None:  # DELETE while it ran: now it goes
                    lifecycle.purge(self.store, self.storage, lifecycle.checkpoints_of(self.settings), done)
        except LostJob:
            log.warning("job %s: no longer owned by this dispatcher; left to its new owner", job.id)
        except ShuttingDown:
            if self.store.transition(job.id, list(ACTIVE), JobState.QUEUED, owner=self.owner):
                log.info("job %s: back in the queue (service stopping); it resumes from its checkpoint", job.id)
        except Exception as exc:
            self._failed(job, exc)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _failed(self, job: Job, exc: Exception) -> None:
        """A transient failure goes back to the queue (it resumes from its last checkpointed block) until the job
        has had PBS2P_JOB_MAX_ATTEMPTS attempts; anything else, or the last attempt, is FAILED."""
        cause = failure_cause(exc)
        if cause == "invalid":
            message = str(exc)
            log.warning("job %s: attempt %d failed: %s", job.id, job.attempts, message)
        else:
            message = f"{cause} error ({type(exc).__name__}: {exc}); see the service log"
            log.exception("job %s: attempt %d failed (%s)", job.id, job.attempts, cause)
        retry = cause == "transient" and job.attempts < self.settings.job_max_attempts
        self.metrics.failures.labels(cause, str(retry).lower()).inc()
        if retry:
            note = f"attempt {job.attempts} of {self.settings.job_max_attempts} failed: {message}; retrying"
            if self.store.transition(
                job.id, [JobState.RUNNING, JobState.UPLOADING], JobState.QUEUED, owner=self.owner,
                error=note, progress={"stage": "retrying"},
            ):  # fmt: skip
                log.info("job %s: back in the queue for attempt %d", job.id, job.attempts + 1)
                return
        if self.store.transition(job.id, list(ACTIVE), JobState.FAILED, owner=self.owner, error=message):
            self.metrics.finished.labels(JobState.FAILED.value).inc()
        else:
            log.warning("job %s: failure not recorded (state changed meanwhile)", job.id)

    def _clear_checkpoint(self, job_id: str) -> None:
        try:
            storage_from_url(self.settings.checkpoints_url, self.settings.s3).delete_prefix(job_id + "/")
        except Exception as exc:  # a leftover checkpoint wastes space but harms nothing
            log.warning("job %s: checkpoint not removed: %s", job_id, exc)
