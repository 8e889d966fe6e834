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
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray._private import ray_constants
from ray.exceptions import (
    ActorUnavailableError,
    NodeDiedError,
    ObjectLostError,
    RayActorError,
    RayTaskError,
    WorkerCrashedError,
)

from pbs2p_core.config import CompressionConfig
from pbs2p_core.errors import Pbs2pError
from pbs2p_core.format import ArtifactWriter
from pbs2p_core.solver import LinearResult, compress_linear

from .pipeline import (
    BlockModel,
    BlockReport,
    CompressReport,
    LinearSolver,
    ProgressFn,
    _Capture,
    build_report,
    compress_block,
    plan_blocks,
    release_memory,
)
from .resume import JobCheckpoint, check_job_id, fingerprint
from .settings import WorkerSettings
from .storage import S3Settings, storage_from_url

log = logging.getLogger(__name__)

NAMESPACE = "pbs2p"
MAX_RESTARTS = 4  # a worker process killed more often than this fails the job
LINEAR_RETRIES = 3  # a linear (or FP step) whose worker died is retried on the restarted worker
BLOCK_ATTEMPTS = 3  # a block whose lead died is redone this many times at most
WORKER_WAIT_S = 600.0  # how long a restarting worker may take to come back
_LOST = (RayActorError, ObjectLostError, WorkerCrashedError, NodeDiedError)


# -------------------------------------------------------------------------------------------- cluster


def _token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return (
        bool(os.environ.get("RAY_AUTH_TOKEN"))
        or (Path(path).is_file() if path else False)
        or (Path.home() / ".ray" / "auth_token").is_file()
    )


def init_ray(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None) -> str:
    """Join the cluster at `address` ("auto", "host:port", "ray://host:port"), or start a local one on 127.0.0.1
    with `num_cpus` (default: every core). Returns the cluster's address, for other drivers to join.

    RAY_AUTH_MODE is always set before Ray starts (Ray 2.60 turns token auth on for a new cluster when it is
    unset): a local cluster listens on 127.0.0.1 only and runs without tokens; joining a cluster uses token
    auth when a token is available (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token). An explicit
    RAY_AUTH_MODE in the environment wins."""
    if ray.is_initialized():
        return str(ray.get_runtime_context().gcs_address)
    local = address in (None, "", "local")
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "disabled" if local or not _token_available() else "token"
    kw: dict[str, Any] = dict(namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=True)
    if local:
        # loopback only: Ray reads this switch when it is imported, so the constant is set too
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            object_store_memory=object_store_memory,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            **kw,
        )
    else:
        ray.init(address=address, **kw)
    gcs = str(ray.get_runtime_context().gcs_address)
    log.info("Ray cluster at %s (auth %s): %s", gcs, os.environ["RAY_AUTH_MODE"], ray.cluster_resources())
    return gcs


def shutdown_ray() -> None:
    """Disconnect this process from Ray (a local cluster it started stops with it)."""
    if ray.is_initialized():
        ray.shutdown()


@dataclass(frozen=True)
class Resources:
    """What each of a job's workers asks the cluster for, and the device its math runs on."""

    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    memory_per_worker: int | None  # bytes (Ray's `memory` resource), None: not reserved
    device: str

    @property
    def threads(self) -> int:
        return max(1, int(self.cpus_per_worker))


def plan_resources(
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float = 1.0,
    memory_per_worker: int | None = None,
) -> Resources:
    """Workers ask for GPUs when the cluster has some (one each by default), CPUs otherwise; by default there
    are as many workers as the cluster has GPUs (or CPUs / cpus_per_worker)."""
    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0.0)), float(total.get("CPU", 0.0))
    if gpus_per_worker is None:
        gpus_per_worker = 1.0 if gpus > 0 else 0.0
    if gpus_per_worker < 0 or cpus_per_worker <= 0:
        raise Pbs2pError("GPUs per worker must be >= 0 and CPUs per worker > 0, e.g. --gpus-per-worker 1")
    if gpus_per_worker > gpus:
        raise Pbs2pError(
            f"each worker asks for {gpus_per_worker:g} GPU(s) but the cluster has {gpus:g}; "
            f"use --gpus-per-worker 0 to run on CPUs"
        )
    if workers is None:
        workers = int(gpus // gpus_per_worker) if gpus_per_worker else int(cpus // cpus_per_worker)
        workers = max(1, workers)
    if workers < 1:
        raise Pbs2pError(f"--workers {workers}: a job needs at least 1 worker")
    if workers * cpus_per_worker > cpus or workers * gpus_per_worker > gpus + 1e-9 and gpus_per_worker:
        log.warning(
            "%d workers x (%g CPU, %g GPU) exceed the cluster's %g CPU, %g GPU: workers start as resources free up",
            workers,
            cpus_per_worker,
            gpus_per_worker,
            cpus,
            gpus,
        )
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    return Resources(workers, cpus_per_worker, gpus_per_worker, memory_per_worker, device)


def _lost(exc: BaseException) -> bool:
    """Did this fail because a worker, its process or its node went away (not because of the job's data)?"""
    while isinstance(exc, RayTaskError) and not isinstance(exc, _LOST):
        cause = getattr(exc, "cause", None)
        if cause is None or cause is exc:
            return False
        exc = cause
    return isinstance(exc, _LOST)


def _unwrap(exc: BaseException) -> BaseException:
    """The job's own error (a Pbs2pError raised in a worker) as the driver should show it."""
    cause: BaseException | None = exc
    while isinstance(cause, RayTaskError):
        cause = getattr(cause, "cause", None)
    if isinstance(cause, Pbs2pError):
        return Pbs2pError(str(cause.args[0]) if cause.args else str(cause))
    return exc


# --------------------------------------------------------------------------------------------- worker


def _to_cpu(res: LinearResult) -> LinearResult:
    """A result that can travel to another process (no CUDA tensors in the object store)."""
    for b in res.blocks:
        b.mask, b.sign, b.salient, b.sign2 = b.mask.cpu(), b.sign.cpu(), b.salient.cpu(), b.sign2.cpu()
        b.scales = {k: v.cpu() for k, v in b.scales.items()}
    res.weight = res.weight.cpu()
    return res


@ray.remote(concurrency_groups={"lead": 1, "linear": 1, "fp": 1, "control": 1})  # type: ignore[call-overload]
class BlockWorker:
    """One worker of one job. Constructed again with the same arguments when Ray restarts it."""

    def __init__(
        self, model_dir: str, cfg: dict[str, Any], checkpoint_url: str, job_id: str, threads: int, s3: dict[str, Any]
    ) -> None:
        torch.set_num_threads(threads)  # Ray also sets OMP_NUM_THREADS to the worker's CPUs
        self.model_dir = Path(model_dir)
        self.cfg = CompressionConfig.from_dict(cfg)
        # the coordinator's S3 settings, as a dict: this process reads no environment for them
        self.ckpt = JobCheckpoint(storage_from_url(checkpoint_url, S3Settings.from_dict(s3)), job_id)
        self._lock = threading.Lock()
        self._store: _Capture | None = None
        self._lead_bm: BlockModel | None = None
        self._fp_bm: BlockModel | None = None
        self._next: tuple[int, list[torch.Tensor] | None] = (-1, None)  # sequential: (block, its inputs)
        self._fp: tuple[int, list[torch.Tensor] | None] = (-1, None)  # FP pass: (block, its FP inputs)

    # ---------------------------------------------------------------------------------- shared state

    def _model(self, which: str) -> BlockModel:
        with self._lock:  # one skeleton per lane: lanes load and unload blocks independently
            if which == "lead":
                if self._lead_bm is None:
                    self._lead_bm = BlockModel(self.model_dir, self.cfg.device)
                return self._lead_bm
            if self._fp_bm is None:
                self._fp_bm = BlockModel(self.model_dir, self.cfg.device)
            return self._fp_bm

    def _capture(self, calib: torch.Tensor, fresh_inputs: bool = False) -> _Capture:
        """Block kwargs per calibration batch (and block-0 inputs), from the embedding pass, made once."""
        with self._lock:
            if self._store is None or (fresh_inputs and not self._store.inputs):
                bm = BlockModel(self.model_dir, self.cfg.device)
                self._store = bm.capture(calib, self.cfg.batch_size)
            return self._store

    def _block0_inputs(self, calib: torch.Tensor) -> list[torch.Tensor]:
        store = self._capture(calib, fresh_inputs=True)
        with self._lock:
            xs, store.inputs = store.inputs, []  # one owner at a time; a later caller captures again
        return xs

    # ------------------------------------------------------------------------------------------ lanes

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="lead")
    def plan(self, calib: torch.Tensor) -> tuple[list[float | None], list[int]]:
        return plan_blocks(self._model("lead"), self._capture(calib, fresh_inputs=True), self.cfg, lambda *a: None)

    @ray.method(concurrency_group="linear", max_task_retries=LINEAR_RETRIES)
    def compress(self, W: torch.Tensor, H: torch.Tensor, n_keep: int) -> LinearResult:
        release_memory()  # what the previous linear left in the heap
        dev = self.cfg.device
        return _to_cpu(compress_linear(W.to(dev), H.to(dev), n_keep, self.cfg))

    @ray.method(concurrency_group="fp", max_task_retries=LINEAR_RETRIES)
    def fp_inputs(self, index: int, calib: torch.Tensor) -> list[torch.Tensor]:
        """The full-precision inputs of block `index`; calls come in increasing order (else the pass restarts)."""
        nxt, xs = self._fp
        self._fp = (-1, None)
        if xs is None or nxt > index:
            nxt, xs = 0, self._block0_inputs(calib)
        bm, store = self._model("fp"), self._capture(calib)
        while nxt < index:
            ys = bm.run_block(nxt, bm.load_block(nxt), xs, store)
            bm.unload_block(nxt)
            release_memory()
            nxt, xs = nxt + 1, ys
        self._fp = (nxt, xs)
        return [x.cpu() for x in xs]

    @ray.method(concurrency_group="lead")
    def run_block(
        self,
        index: int,
        n_keep: int,
        cosine: float | None,
        pool: list[Any],
        calib: torch.Tensor,
        inputs: list[torch.Tensor] | None = None,
    ) -> int:
        """Compress block `index` and checkpoint it. Inputs: given (independent propagation), or this worker's
        outputs of the previous block, or (after a restart) the ones saved with the previous block."""
        cfg = self.cfg
        bm = self._model("lead")
        if inputs is not None:
            xs = [x.to(cfg.device) for x in inputs]
        else:
            nxt, held = self._next
            self._next = (-1, None)
            if nxt == index and held is not None:
                xs, held = held, None
            elif index == 0:
                xs = self._block0_inputs(calib)
            else:
                log.warning("block %d: inputs read from the checkpoint (this worker did not hold them)", index)
                xs = [x.to(cfg.device) for x in self.ckpt.load_inputs(index)]
        out = compress_block(bm, index, xs, self._capture(calib), cfg, n_keep, cosine, self._fan_out(pool))
        del xs
        sequential = cfg.propagation == "sequential"
        keep = sequential and index + 1 < bm.num_blocks
        self.ckpt.save_block(index, out.tensors, out.results, out.report, cfg, out.outputs if keep else None)
        if sequential:
            self._next = (index + 1, out.outputs)
        return index

    def _fan_out(self, pool: list[Any]) -> LinearSolver:
        """One `compress` call per linear, at most one in flight per worker; W and H go into the object store
        once each (the worker that runs the linear reads them from there)."""

        def solve(work: dict[str, tuple[torch.Tensor, torch.Tensor]], n_keep: int) -> dict[str, LinearResult]:
            names = list(work)
            free = list(range(len(pool)))
            pending: dict[Any, tuple[str, int]] = {}
            out: dict[str, LinearResult] = {}

            def collect_one() -> None:
                done, _ = ray.wait(list(pending), num_returns=1)
                name, k = pending.pop(done[0])
                out[name] = ray.get(done[0])
                free.append(k)

            for name in names:
                if not free:
                    collect_one()
                W, H = work.pop(name)
                k = free.pop(0)
                ref = pool[k].compress.remote(ray.put(W.detach().cpu()), ray.put(H.cpu()), n_keep)
                pending[ref] = (name, k)
            while pending:
                collect_one()
            return {name: out[name] for name in names}

        return solve


# ---------------------------------------------------------------------------------------- coordinator


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
            if not _lost(exc) or attempt == attempts:
                raise _unwrap(exc) from exc
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
                raise _unwrap(failed[0][1])
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
                if not _lost(exc):
                    raise _unwrap(exc) from exc
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
