"""The dispatcher: takes queued jobs from the store and runs them on Ray with bounded concurrency.

Each job runs in a thread of this process as the Ray driver of `compress_model_ray` (the job coordinator),
checkpointing every block under PBS2P_CHECKPOINT_URL/<job id>. The dispatcher heartbeats the jobs it owns;
a job whose owner stopped heartbeating (a killed service) is re-queued by whichever dispatcher notices, and
resumes from its last checkpointed block. Cancellation is cooperative: the job stops at its next block.
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

from pbs2p_core.config import CompressionConfig
from pbs2p_core.errors import Pbs2pError
from workers.storage import S3Settings, Storage, storage_from_url

from .models import fetch_model
from .settings import Settings
from .store import ACTIVE, Job, JobState, Store

log = logging.getLogger(__name__)


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

    def __init__(self, store: Store, job_id: str, owner: str, stopping: threading.Event) -> None:
        self.store, self.job_id, self.owner, self.stopping = store, job_id, owner, stopping
        self.last_write = 0.0
        self.compress_start: tuple[float, int] | None = None  # (time, blocks done) when block work began

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.time()
        progress: dict[str, Any] = {"stage": stage, "percent": round(100.0 * done / total, 1) if total else None}
        if stage == "compress":
            progress.update(block=done, blocks=total)
            if self.compress_start is None:
                self.compress_start = (now, done)
            t0, d0 = self.compress_start
            if done > d0:
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


class Dispatcher:
    def __init__(self, settings: Settings, store: Store, storage: Storage, s3: S3Settings | None = None) -> None:
        self.settings, self.store, self.storage = settings, store, storage
        self.s3 = s3 if s3 is not None else S3Settings.defaults()  # for s3:// models and checkpoints
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.stopping = threading.Event()
        self.pool = ThreadPoolExecutor(settings.max_running_jobs, thread_name_prefix="pbs2p-job")
        self.running: dict[str, Future[None]] = {}
        self.thread: threading.Thread | None = None
        self.ray_address: str | None = None

    # -- lifecycle --------------------------------------------------------------------------------------
    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="pbs2p-dispatcher", daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking jobs; running ones stop at their next progress report and go back to the queue."""
        self.stopping.set()
        if self.thread is not None:
            self.thread.join(timeout)
        self.pool.shutdown(wait=True, cancel_futures=True)
        import ray

        if ray.is_initialized():
            ray.shutdown()  # a local Ray started by this process stops with it (its agents would linger)

    def _loop(self) -> None:
        try:
            self._start_ray()
        except Exception:
            log.exception("dispatcher: Ray did not start; no job will run")
            return
        last_recover = 0.0
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
                while len(self.running) < self.settings.max_running_jobs and not self.stopping.is_set():
                    job = self.store.claim(self.owner)
                    if job is None:
                        break
                    log.info("job %s: started (attempt %d)", job.id, job.attempts)
                    self.running[job.id] = self.pool.submit(self._run, job)
            except Exception:
                log.exception("dispatcher loop")
            self.stopping.wait(self.settings.poll_seconds)

    def _start_ray(self) -> None:
        from workers.distributed import init_ray

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
        try:
            report = self._compress(job, work / "artifact", progress)
            if job.evaluate:
                metrics, seconds = self._evaluate(job, work / "artifact", progress)
                report["metrics"].update(metrics)
                report["timings"]["evaluate_s"] = seconds
            if not self.store.transition(job.id, [JobState.RUNNING], JobState.UPLOADING, owner=self.owner):
                raise self._why_not(job.id)
            progress("upload", 0, 1)
            prefix = f"{job.tenant}/{job.id}"
            self.storage.upload_dir(work / "artifact", prefix)
            if self.store.transition(
                job.id, [JobState.UPLOADING], JobState.SUCCEEDED, owner=self.owner, report=report, artifact=prefix,
                progress={"stage": "done", "percent": 100.0},
            ):  # fmt: skip
                log.info("job %s: SUCCEEDED", job.id)
                self._clear_checkpoint(job.id)
            else:
                raise self._why_not(job.id)
        except JobCancelled:
            if self.store.transition(job.id, [JobState.CANCELLING], JobState.CANCELLED, owner=self.owner):
                log.info("job %s: CANCELLED", job.id)
                self._clear_checkpoint(job.id)
        except LostJob:
            log.warning("job %s: no longer owned by this dispatcher; left to its new owner", job.id)
        except ShuttingDown:
            if self.store.transition(job.id, list(ACTIVE), JobState.QUEUED, owner=self.owner):
                log.info("job %s: back in the queue (service stopping); it resumes from its checkpoint", job.id)
        except Exception as exc:
            if isinstance(exc, Pbs2pError):
                message = str(exc)
                log.warning("job %s: FAILED: %s", job.id, message)
            else:
                message = f"internal error ({type(exc).__name__}: {exc}); see the service log"
                log.exception("job %s: FAILED", job.id)
            if not self.store.transition(job.id, list(ACTIVE), JobState.FAILED, owner=self.owner, error=message):
                log.warning("job %s: failure not recorded (state changed meanwhile)", job.id)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _why_not(self, job_id: str) -> Exception:
        job = self.store.get(job_id)
        if job is not None and job.state == JobState.CANCELLING and job.owner == self.owner:
            return JobCancelled(job_id)
        return LostJob(job_id)

    def _compress(self, job: Job, out: Path, progress: JobProgress) -> dict[str, Any]:
        from transformers import AutoTokenizer

        from workers.distributed import compress_model_ray
        from workers.sources import calibration_windows, load_documents

        progress("prepare", 0, 1)
        t0 = time.perf_counter()
        model_dir = fetch_model(job.model, self.settings.roots, self.settings.max_model_bytes, self.s3)
        cfg = CompressionConfig.from_dict(job.config)
        tok = AutoTokenizer.from_pretrained(model_dir)
        calib = calibration_windows(tok, load_documents(cfg.calib, "calib"), cfg.calib_samples, cfg.seqlen, cfg.seed)
        prepare_s = time.perf_counter() - t0
        shutil.rmtree(out.parent, ignore_errors=True)
        report = compress_model_ray(
            model_dir,
            out,
            cfg,
            calib,
            address=self.ray_address,
            workers=self.settings.job_workers,
            gpus_per_worker=self.settings.gpus_per_worker,
            job_id=job.id,
            checkpoint_url=self.settings.checkpoints_url,
            s3=self.s3,
            keep_checkpoint=True,  # removed once SUCCEEDED: a crash during upload must not recompress
            progress=progress,
        ).to_dict()
        bits = report.get("bits") or {}
        return {
            "metrics": {
                "mean_rel_error": report["mean_rel_error"],
                "paper_bits": bits.get("paper_bits"),
                "true_bits": bits.get("true_bits"),
                "calib_tokens": report["calib_tokens"],
            },
            "timings": {"prepare_s": round(prepare_s, 2), "compress_s": round(report["seconds"], 2)},
            "model_type": report["model_type"],
            "blocks": [
                {
                    "index": b["index"],
                    "n_keep": b["n_keep"],
                    "cosine": b["cosine"],
                    "seconds": round(b["seconds"], 2),
                    "linears": [
                        {k: lr[k] for k in ("name", "shape", "rel_error", "rel_error_oneshot", "bits")}
                        for lr in b["linears"]
                    ],
                }
                for b in report["blocks"]
            ],
        }

    def _evaluate(self, job: Job, artifact: Path, progress: JobProgress) -> tuple[dict[str, Any], float]:
        """Perplexity of the source model and of the packed artifact on the same windows (and the seconds)."""
        from .cli import run_eval

        ev = dict(job.evaluate or {})
        t0 = time.perf_counter()
        model_dir = fetch_model(job.model, self.settings.roots, self.settings.max_model_bytes, self.s3)
        kw: dict[str, Any] = dict(data=ev.get("data", "wiki"), seqlen=ev.get("seqlen", 512), windows=ev.get("windows"))
        progress("evaluate", 0, 2)
        before = run_eval(str(model_dir), progress=False, **kw)
        progress("evaluate", 1, 2)
        after = run_eval(str(artifact), progress=False, **kw)
        progress("evaluate", 2, 2)
        return {
            "ppl_before": before["ppl"],
            "ppl_after": after["ppl"],
            "eval_tokens": after["tokens"],
            "eval_windows": after["windows"],
            "eval_seqlen": after["seqlen"],
            "eval_bos": after["bos"],
        }, round(time.perf_counter() - t0, 2)

    def _clear_checkpoint(self, job_id: str) -> None:
        try:
            storage_from_url(self.settings.checkpoints_url, self.s3).delete_prefix(job_id + "/")
        except Exception as exc:  # a leftover checkpoint wastes space but harms nothing
            log.warning("job %s: checkpoint not removed: %s", job_id, exc)
