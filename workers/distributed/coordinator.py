"""A compression job on a Ray cluster: block leads stream blocks, linears fan out over the job's workers.

What runs where:
- The driver (`compress_model_ray`, the job coordinator) only orders work, keeps the job's checkpoint
  bookkeeping and writes the artifact from the checkpoints (packed codes, never the FP weights).
- Each job has `workers` BlockWorker actors (named by job id; one GPU each when the cluster has GPUs, else
  CPUs). A worker sets its device up once and has three lanes (concurrency groups, one thread each):
  * lead: runs a whole block (`pipeline.compress_block`): reads the block's weights from safetensors, keeps
    the calibration activations, accumulates the Hessians, fans the linears out and writes the block's
    checkpoint (compressed tensors + next inputs) to storage;
  * linear: one `compress_linear(W, H)` per call, W and H put into the object store once by the lead;
  * fp: in independent propagation, the FP pass that hands each block its full-precision inputs.
- Sequential propagation: worker 0 leads every block (the activations never leave it); the per-block fan-out
  uses all workers. Independent propagation: blocks are led by all workers in parallel (at most `workers`
  in flight, each with its FP inputs), the fan-outs share the workers.
Failures: a dead worker is restarted by Ray (`max_restarts`); its in-flight linear calls are retried
(`max_task_retries`); a block whose lead died is redone by the coordinator from the last checkpoint.
A killed coordinator started again with the same job id resumes after the last checkpointed block.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import ActorUnavailableError, RayActorError

from pbs2p.core.config import CompressionConfig
from pbs2p.core.errors import Pbs2pError
from pbs2p.core.format import ArtifactWriter

from ..checkpoints import JobCheckpoint, check_job_id, fingerprint
from ..model_stream import BlockModel
from ..report import BlockReport, CompressReport, ProgressFn, build_report
from ..settings import WorkerSettings
from ..storage import storage_from_url
from .cluster import NAMESPACE, init_ray, lost, plan_resources, unwrap
from .worker import BlockWorker

log = logging.getLogger(__name__)

MAX_RESTARTS = 4  # a worker process killed more often than this fails the job
BLOCK_ATTEMPTS = 3  # a block whose lead died is redone this many times at most
WORKER_WAIT_S = 600.0  # how long a restarting worker may take to come back


def wait_for_workers(pool: list[Any], timeout: float = WORKER_WAIT_S) -> None:
    """Until every worker answers: a killed one is being restarted by Ray (its process starts again)."""
    deadline = time.monotonic() + timeout
    for k, worker in enumerate(pool):
        while True:
            try:
                ray.get(worker.pid.remote())
                break
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise Pbs2pError(
                        f"worker {k} did not come back within {timeout:.0f} s; check the cluster"
                    ) from None
                time.sleep(0.5)
            except RayActorError as exc:
                raise Pbs2pError(
                    f"worker {k} died for good (restarted {MAX_RESTARTS} times already): {exc}; check the "
                    f"workers' logs (out of memory?) and start the job again: it resumes from its checkpoints"
                ) from None


def _call(what: str, make: Callable[[], Any], pool: list[Any], attempts: int = BLOCK_ATTEMPTS) -> Any:
    """ray.get(make()), made again (once the workers are back) when a worker died under it."""
    for attempt in range(1, attempts + 1):
        try:
            return ray.get(make())
        except Exception as exc:
            if not lost(exc) or attempt == attempts:
                raise unwrap(exc) from exc
            log.warning("%s: a worker died (%s); doing it again (attempt %d)", what, type(exc).__name__, attempt + 1)
            wait_for_workers(pool)
    raise AssertionError("unreachable")


class _Job:
    def __init__(
        self,
        bm: BlockModel,
        cfg: CompressionConfig,
        ckpt: JobCheckpoint,
        writer: ArtifactWriter,
        pool: list[Any],
        calib: Any,
        progress: ProgressFn,
    ) -> None:
        self.bm, self.cfg, self.ckpt, self.writer, self.pool, self.progress = bm, cfg, ckpt, writer, pool, progress
        self.calib = calib  # an object ref: put once, passed to every call that may need the embedding pass
        self.L = bm.num_blocks
        self.reports: dict[int, BlockReport] = {}
        self.written = 0  # blocks 0..written-1 are in the artifact

    def _write_ready(self, done: set[int]) -> None:
        """Write finished blocks into the artifact in index order (the manifest lists them in that order)."""
        while self.written in done:
            stored = self.ckpt.load_block(self.written)
            self.writer.write_block(self.written, stored.tensors, stored.results)
            self.reports[self.written] = stored.report
            self.written += 1
            self.progress("compress", self.written, self.L)

    def sequential(self, n_keep: list[int], cosines: list[float | None], finished: list[int]) -> None:
        start = 0
        while start in finished:
            start += 1
        if start:
            log.info("resuming job %s after block %d", self.ckpt.job_id, start - 1)
        self._write_ready(set(range(start)))
        lead = self.pool[0]
        for i in range(start, self.L):
            _call(
                f"job {self.ckpt.job_id}: block {i}",
                lambda i=i: lead.run_block.remote(i, n_keep[i], cosines[i], self.pool, self.calib),  # type: ignore[misc]
                self.pool,
            )
            log.info("job %s: block %d checkpointed", self.ckpt.job_id, i)
            self._write_ready({i})

    def independent(self, n_keep: list[int], cosines: list[float | None], finished: list[int]) -> None:
        done = set(finished)
        if done:
            log.info("resuming job %s: blocks %s of %d are checkpointed", self.ckpt.job_id, sorted(done), self.L)
        self._write_ready(done)
        for attempt in range(1, BLOCK_ATTEMPTS + 1):
            failed = self._independent_round(n_keep, cosines, done)
            if not failed:
                return
            if attempt == BLOCK_ATTEMPTS:
                raise unwrap(failed[0][1])
            log.warning(
                "job %s: blocks %s lost their worker; doing them again", self.ckpt.job_id, [i for i, _ in failed]
            )
            wait_for_workers(self.pool)

    def _independent_round(
        self, n_keep: list[int], cosines: list[float | None], done: set[int]
    ) -> list[tuple[int, BaseException]]:
        """Every block not done, led by the workers in turn, at most one block in flight per worker; the FP pass
        (on worker 0) runs ahead of the leads by at most that many blocks. Returns the blocks that lost a worker."""
        inflight: dict[Any, int] = {}
        failed: list[tuple[int, BaseException]] = []

        def settle_one() -> None:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            i = inflight.pop(ready[0])
            try:
                ray.get(ready[0])
            except Exception as exc:
                if not lost(exc):
                    raise unwrap(exc) from exc
                failed.append((i, exc))
                return
            log.info("job %s: block %d checkpointed", self.ckpt.job_id, i)
            done.add(i)
            self._write_ready(done)

        for i in [i for i in range(self.L) if i not in done]:
            while len(inflight) >= len(self.pool):
                settle_one()
            xs = self.pool[0].fp_inputs.remote(i, self.calib)
            lead = self.pool[i % len(self.pool)]
            inflight[lead.run_block.remote(i, n_keep[i], cosines[i], self.pool, self.calib, xs)] = i
        while inflight:
            settle_one()
        return failed


def compress_model_ray(
    model_dir: Path,
    out_dir: Path,
    cfg: CompressionConfig,
    calib: torch.Tensor,
    *,
    settings: WorkerSettings,
    address: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    memory_per_worker: int | None = None,
    job_id: str | None = None,
    checkpoint_url: str | None = None,
    keep_checkpoint: bool = False,
    progress: ProgressFn | None = None,
) -> CompressReport:
    """`pipeline.compress_model` on Ray: the same artifact, byte for byte, with the job spread over `workers`
    and checkpointed after every block to `checkpoint_url/<job_id>/` (default: the cache directory).

    `job_id` defaults to a hash of the model, config and calibration data: the same job started again resumes.
    The checkpoints are removed once the artifact is written, unless `keep_checkpoint`. The S3 settings of an
    s3:// checkpoint_url (`settings.s3`) are handed to the workers as a dict."""
    t0 = time.perf_counter()
    progress = progress or (lambda stage, done, total: None)
    model_dir = Path(model_dir)
    bm = BlockModel(model_dir)  # a meta skeleton: checks the model before any worker starts
    init_ray(address)
    res = plan_resources(workers, gpus_per_worker, cpus_per_worker, memory_per_worker)
    if cfg.device.startswith("cuda") and res.device == "cpu":
        raise Pbs2pError(
            f"the config asks for {cfg.device} but the job's workers get no GPU (the cluster has "
            f"{ray.cluster_resources().get('GPU', 0):g}); use --device cpu, or a cluster with GPUs"
        )
    if cfg.device == "cpu" and res.device == "cuda":
        log.info("the job's workers run on %s (config said %s)", res.device, cfg.device)
        cfg = cfg.replace(device=res.device)
    parts = fingerprint(model_dir, cfg, calib)
    if job_id is None:
        job_id = "job-" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]
    check_job_id(job_id)
    url = checkpoint_url or settings.default_checkpoint_url
    ckpt = JobCheckpoint(storage_from_url(url, settings.s3), job_id)
    ckpt.open(parts)
    log.info("job %s: %d workers on %s, checkpoints in %s", job_id, res.workers, res.device, ckpt.where())
    tag = ray.get_runtime_context().get_job_id()  # this coordinator's Ray job: a restarted one never collides
    calib_ref = ray.put(calib.detach().cpu())
    pool: list[Any] = []
    writer = ArtifactWriter(out_dir, model_dir, cfg)
    try:
        for k in range(res.workers):
            opts: dict[str, Any] = dict(
                name=f"{job_id}/worker-{k}/{tag}",
                namespace=NAMESPACE,
                num_cpus=res.cpus_per_worker,
                num_gpus=res.gpus_per_worker,
                max_restarts=MAX_RESTARTS,
                max_task_retries=0,
            )
            if res.memory_per_worker:
                opts["memory"] = res.memory_per_worker
            worker = BlockWorker.options(**opts).remote(  # type: ignore[attr-defined]
                str(model_dir), cfg.to_dict(), url, job_id, res.threads, settings.s3.to_dict()
            )
            pool.append(worker)
        progress("capture", 1, 1)
        plan = ckpt.load_plan()
        if plan is None:
            plan = _call(f"job {job_id}: coarse stage", lambda: pool[0].plan.remote(calib_ref), pool)
            ckpt.save_plan(*plan)
        cosines, n_keep = plan
        progress("coarse", 1, 1)
        job = _Job(bm, cfg, ckpt, writer, pool, calib_ref, progress)
        finished = ckpt.finished(bm.num_blocks)
        if cfg.propagation == "sequential":
            job.sequential(n_keep, cosines, finished)
        else:
            job.independent(n_keep, cosines, finished)
        writer.write_rest(bm.rest_tensors())
        report = build_report(bm.config.model_type, cfg, [job.reports[i] for i in range(bm.num_blocks)], calib.numel())
        report.seconds = time.perf_counter() - t0
        writer.finish(report)
    except BaseException:
        writer.abort()
        raise
    finally:
        for worker in pool:
            ray.kill(worker)
    if not keep_checkpoint:
        ckpt.clear()
    log.info("job %s: done in %.1f s", job_id, report.seconds)
    return report
