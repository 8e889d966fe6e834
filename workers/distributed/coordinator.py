"""A compression job on a Ray cluster: data-parallel calibration and row-chunked solves, the same bits at any
number of workers.

What runs where:
- The driver (`compress_model_ray`, the job coordinator) orders the work, keeps the checkpoint bookkeeping and
  writes the artifact from the checkpoints (packed codes). No activation and no Hessian passes through it.
- Each job has `workers` BlockWorker actors (one GPU each when the cluster has GPUs, else CPUs). The calibration
  windows are cut into S shards of `batch_size` windows; worker k holds shards [k·S/W, (k+1)·S/W) (their
  activations stay on it from block to block: activation memory per worker falls as 1/W). Per block (`_Job._block`):

      begin     every worker: block forward on its shards -> Σ x xᵀ per input group, summed over the subtrees
                of a fixed binary tree of shard indices that it holds whole (object store)
      prepare   per input group, on the least loaded worker: the rest of the tree summed, H factorised once
      solve     every row chunk of every linear of the pass, largest first, over all workers
      apply     every worker: chunks joined in row order, compressed weights set in its copy of the block
      tune      (block_tune_steps) worker 0: the block's scales tuned on every shard's inputs and FP outputs,
                gathered there (activation memory of the whole calibration set on worker 0), set on every worker
      advance   every worker: its shards through the compressed block (the next block's inputs)
      save      io lanes, while the next block computes: shard inputs, then the block on worker 0

  Sums run in fixed orders (the shard tree, row chunks), which is why 1, 2 or 64 workers give the same bytes as
  the local path (`workers.local`, the same steps in one process). Each worker reads the next block's weights
  while the current block computes.
Failures: a dead worker is restarted by Ray (`max_restarts`); the block is redone: workers that lost their
shards read them from the checkpoint (the previous block's outputs, saved per shard). A killed coordinator
started again with the same job id resumes after the last checkpointed block.
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
from pbs2p.core.hessian import Span
from pbs2p.core.solver import row_chunks

from ..block import Group, block_linears, block_passes
from ..checkpoints import JobCheckpoint, check_job_id, fingerprint
from ..model_stream import BlockModel, Capture
from ..plan import needs_coarse_stage, plan_blocks
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
    """The block-by-block schedule of one job over its workers (see the module doc)."""

    def __init__(
        self, bm: BlockModel, cfg: CompressionConfig, ckpt: JobCheckpoint, writer: ArtifactWriter, pool: list[Any],
        progress: ProgressFn,
    ) -> None:  # fmt: skip
        self.bm, self.cfg, self.ckpt, self.writer, self.pool, self.progress = bm, cfg, ckpt, writer, pool, progress
        self.L = bm.num_blocks
        self.reports: dict[int, BlockReport] = {}
        self.phases: dict[int, dict[str, float]] = {}
        self.written = 0  # blocks 0..written-1 are in the artifact
        self.saving: tuple[int, Any] | None = None  # the block whose checkpoint is being written, its call
        self.attempts = 0

    def _write_ready(self, done: set[int]) -> None:
        """Write finished blocks into the artifact in index order (the manifest lists them in that order)."""
        while self.written in done:
            plain, packed, report = self.ckpt.load_packed(self.written)  # packed as the artifact packs them
            self.writer.write_packed_block(self.written, plain, packed)
            report.phases = self.phases.get(self.written, {})
            self.reports[self.written] = report
            self.written += 1
            self.progress("compress", self.written, self.L)

    def _first_unfinished(self) -> int:
        finished = set(self.ckpt.finished(self.L))
        start = 0
        while start in finished:
            start += 1
        return start

    def run(self, n_keep: list[int], cosines: list[float | None]) -> None:
        i = self._first_unfinished()
        if i:
            log.info("resuming job %s after block %d", self.ckpt.job_id, i - 1)
        self._write_ready(set(range(i)))
        failures = 0
        while i <= self.L:
            try:
                if i < self.L:
                    self._block(i, n_keep[i], cosines[i])
                else:
                    self._drain_save()
                i += 1
                failures = 0
            except Exception as exc:
                if not lost(exc) or failures + 1 >= BLOCK_ATTEMPTS:
                    raise unwrap(exc) from exc
                failures += 1
                self.saving = None
                i = min(i, self._first_unfinished())
                log.warning(
                    "job %s: block %d: a worker died (%s); doing it again (attempt %d)",
                    self.ckpt.job_id, i, type(exc).__name__, failures + 1,
                )  # fmt: skip
                wait_for_workers(self.pool)

    def _drain_save(self) -> float:
        """Wait for the checkpoint being written, then put its block into the artifact: the seconds waited."""
        if self.saving is None:
            return 0.0
        t0 = time.perf_counter()
        index, ref = self.saving
        ray.get(ref)
        self.saving = None
        log.info("job %s: block %d checkpointed", self.ckpt.job_id, index)
        self._write_ready(set(range(self.written, index + 1)))
        return time.perf_counter() - t0

    def _block(self, i: int, n_keep: int, cosine: float | None) -> None:
        """Block i over the workers: forward + Hessians per shard, reduce and factor per input group, row chunks
        solved, results joined on every worker, shards advanced, checkpoint written while the next block runs."""
        cfg, pool = self.cfg, self.pool
        self.attempts += 1
        attempt = f"block {i} attempt {self.attempts}"
        tb = time.perf_counter()
        busy = sum(ray.get([w.busy_seconds.remote() for w in pool]))
        phases = dict.fromkeys(("forward", "reduce", "solve", "transfer", "checkpoint"), 0.0)
        linears = block_linears(self.bm, i, self.bm.blocks[i], cfg)  # the meta skeleton: names and shapes
        shapes = {name: tuple(lin.weight.shape) for name, lin in linears.items()}
        report = BlockReport(i, n_keep if cfg.prunes else cfg.pattern.m, cosine, 0.0)
        for p, groups in enumerate(block_passes(self.bm, linears, cfg.ablations.true_sequential) or [[]]):
            t0 = time.perf_counter()
            parts = ray.get([w.begin.remote(i, attempt, p == 0, groups) for w in pool])
            by_node = {span: sums for part in parts for span, sums in part.items()}
            t1 = time.perf_counter()
            preps, chunks, t2 = self._reduce_and_solve(attempt, groups, by_node, shapes, n_keep)
            t3 = time.perf_counter()
            by_name = {name: [preps[g]] for g in groups for name in g}
            ray.get([w.apply.remote(attempt, chunks, by_name, n_keep) for w in pool])
            t4 = time.perf_counter()
            for k, dt in zip(
                ("forward", "reduce", "solve", "transfer"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True
            ):
                phases[k] += dt
        if cfg.tune_steps and linears:  # on worker 0, on every shard gathered there (module doc)
            t0 = time.perf_counter()
            data = ray.get([w.tune_data.remote(attempt) for w in pool])
            tuned = ray.get(pool[0].tune.remote(attempt, data))
            ray.get([w.set_tuned.remote(attempt, tuned) for w in pool[1:]])
            phases["tune"] = time.perf_counter() - t0
        phases["checkpoint"] = self._drain_save()  # the previous block's, written during this block's compute
        t5 = time.perf_counter()
        last = i + 1 == self.L
        reports = ray.get([w.advance.remote(i, attempt, report if k == 0 else None) for k, w in enumerate(pool)])
        phases["forward"] += time.perf_counter() - t5
        inputs = [] if last else [w.save_inputs.remote(i + 1) for w in pool]
        report = reports[0]
        report.seconds = time.perf_counter() - tb
        self.saving = (i, pool[0].save_block.remote(i, report, *inputs))
        busy = sum(ray.get([w.busy_seconds.remote() for w in pool])) - busy
        phases["busy"] = busy
        phases["idle"] = max(0.0, len(pool) * report.seconds - busy)
        self.phases[i] = phases

    def _reduce_and_solve(
        self, attempt: str, groups: list[Group], by_node: dict[Span, dict[Group, Any]],
        shapes: dict[str, tuple[int, ...]], n_keep: int,
    ) -> tuple[dict[Group, Any], dict[str, list[Any]], float]:  # fmt: skip
        """Each input group's H reduced and factorised on one worker (largest first, on the least loaded), and as
        soon as a group's state is ready, its linears' row chunks solved over all workers, largest first, at most
        two calls in flight per worker. Which worker runs what does not change a bit.
        Returns (state refs by group, {linear: its chunks' result refs in row order}, when the last state was
        ready)."""
        W = len(self.pool)
        load = [0.0] * W
        slots = [k for _ in range(2) for k in range(W)]  # two calls in flight per worker
        calls: dict[Any, tuple[str, Any]] = {}  # in flight: ref -> (what, key), and its worker below
        worker_of: dict[Any, int | None] = {}  # the worker whose slot the call holds (None: it holds none)
        for g in sorted(groups, key=lambda g: -shapes[g[0]][1]):  # the widest input first: its Cholesky is C³
            k = min(range(W), key=lambda k: load[k])
            load[k] += float(shapes[g[0]][1]) ** 3
            ref = self.pool[k].prepare.remote(attempt, g, {span: sums[g] for span, sums in by_node.items()})
            calls[ref], worker_of[ref] = ("prep", g), k if k in slots else None
            if k in slots:
                slots.remove(k)
        preps: dict[Group, Any] = {}
        queue: list[tuple[str, int, int, Group]] = []
        out: dict[tuple[str, int], Any] = {}
        ready_at = time.perf_counter()
        while calls or queue:
            while queue and slots:
                name, r0, r1, g = queue.pop(0)
                k = slots.pop(0)
                ref = self.pool[k].solve.remote(attempt, name, r0, r1, [preps[g]], n_keep)
                calls[ref], worker_of[ref] = ("solve", (name, r0)), k
            done, _ = ray.wait(list(calls), num_returns=1)
            what, key = calls.pop(done[0])
            holder = worker_of.pop(done[0])
            if holder is not None:
                slots.append(holder)
            result = ray.get(done[0])[0]  # a ref in a list: errors show here, the data stays in the object store
            if what == "solve":
                out[key] = result
                continue
            preps[key] = result
            ready_at = time.perf_counter()
            queue += [(name, r0, r1, key) for name in key for r0, r1 in row_chunks(shapes[name][0], self.cfg)]
            queue.sort(key=lambda t: -(t[2] - t[1]) * shapes[t[0]][1])  # stable: ties keep their order
        names = [name for g in groups for name in g]
        chunks = {name: [out[(name, r0)] for r0, _ in row_chunks(shapes[name][0], self.cfg)] for name in names}
        return preps, chunks, ready_at


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
    calib_ref = ray.put(calib.detach().cpu())  # each worker embeds its own shards of it
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
                str(model_dir),
                cfg.to_dict(),
                url,
                job_id,
                res.threads,
                settings.s3.to_dict(),
                k,
                res.workers,
                calib_ref,
            )
            pool.append(worker)
        progress("capture", 1, 1)
        plan = ckpt.load_plan()
        if plan is None:
            if needs_coarse_stage(cfg):
                plan = _call(f"job {job_id}: coarse stage", lambda: pool[0].plan.remote(), pool)
            else:
                plan = plan_blocks(bm, Capture(), cfg, progress)
            ckpt.save_plan(*plan)
        cosines, n_keep = plan
        progress("coarse", 1, 1)
        job = _Job(bm, cfg, ckpt, writer, pool, progress)
        job.run(n_keep, cosines)
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
