"""The one job path: resolve the model, prepare the calibration windows, compress (in this process or on Ray),
evaluate, and write or upload the artifact.

The command line (`pbs2p compress`), the service's dispatcher, the benchmarks and the tests all run a job
through `run_job`; they differ only in the `JobSpec` they give and in what they do with the `JobResult`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pbs2p.core.config import CompressionConfig
from pbs2p.core.errors import requires_extra
from pbs2p.core.format.manifest import read_manifest

from .evaluation import EvalSpec, check_device, check_tasks, evaluate_model, evaluate_tasks
from .hub import parse_hub_ref
from .local import compress_model
from .model_refs import fetch_model
from .report import CompressReport, ProgressFn
from .settings import WorkerSettings
from .storage import Storage
from .text import calibration_for


@dataclass(frozen=True)
class RayOptions:
    """Run the job on Ray: `address` None starts a local cluster on 127.0.0.1; else 'auto', HOST:PORT or
    ray://HOST:PORT. The job is checkpointed after every block under `checkpoint_url/<job_id>/` (default: the
    cache directory) and resumes when started again with the same `job_id`."""

    address: str | None = None
    workers: int | None = None  # default: the cluster's GPUs, else its CPUs / cpus_per_worker
    gpus_per_worker: float | None = None  # default 1 when the cluster has GPUs
    cpus_per_worker: float = 1.0
    memory_per_worker: int | None = None  # bytes reserved per worker
    job_id: str | None = None  # default: a hash of the model, config and calibration
    checkpoint_url: str | None = None
    keep_checkpoint: bool = False


@dataclass(frozen=True)
class JobSpec:
    model: str  # an alias, a hub id (org/name[@revision]), s3://BUCKET/PREFIX or a local directory (see model_refs)
    config: CompressionConfig = field(default_factory=CompressionConfig)
    evaluate: EvalSpec | None = None  # perplexity and task accuracy before/after, on the packed artifact
    ray: RayOptions | None = None  # None: compress in this process


@dataclass(frozen=True)
class Upload:
    """Where the artifact goes once written: under `prefix` of `storage`, manifest last."""

    storage: Storage
    prefix: str


@dataclass
class JobResult:
    artifact: Path
    report: CompressReport
    metrics: dict[str, Any]
    timings: dict[str, float]
    source: dict[str, Any] = field(default_factory=dict)  # the model as asked for, its commit, its files' sha256

    def summary(self) -> dict[str, Any]:
        """What the job store keeps of a finished job: the source model, metrics, timings and per block N, layer
        errors, bits."""
        bits = self.report.bits or {}
        return {
            "source": self.source,
            "metrics": {
                "mean_rel_error": self.report.mean_rel_error,
                "paper_bits": bits.get("paper_bits"),
                "true_bits": bits.get("true_bits"),
                "calib_tokens": self.report.calib_tokens,
                **self.metrics,
            },
            "timings": dict(self.timings),
            "model_type": self.report.model_type,
            "blocks": [
                {
                    "index": b.index,
                    "n_keep": b.n_keep,
                    "cosine": b.cosine,
                    "seconds": round(b.seconds, 2),
                    "linears": [
                        {
                            "name": lr.name,
                            "shape": list(lr.shape),
                            "rel_error": lr.rel_error,
                            "rel_error_oneshot": lr.rel_error_oneshot,
                            "bits": lr.bits,
                        }
                        for lr in b.linears
                    ],
                }
                for b in self.report.blocks
            ],
        }


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def run_job(
    spec: JobSpec,
    out: Path,
    settings: WorkerSettings,
    *,
    roots: list[Path] | None = None,
    progress: ProgressFn | None = None,
    upload: Upload | None = None,
) -> JobResult:
    """Run `spec` into the artifact directory `out`; `roots` confines local model and text paths (None: any).

    `progress(stage, done, total)` is called for every stage: prepare, downloading (bytes of a hub download),
    capture, coarse, compress, evaluate, upload; it may raise to stop the job (the dispatcher does so for a
    cancel)."""
    progress = progress or _no_progress
    cfg = spec.config
    t0 = time.perf_counter()
    progress("prepare", 0, 1)
    if spec.ray is None:
        check_device(cfg.device)  # on Ray, the workers' resources decide the device
    if spec.evaluate is not None:  # before the compression: a task without data here fails the job at once
        check_tasks(spec.evaluate.tasks, settings.tasks_dir)
    model_dir = fetch_model(
        spec.model, settings, roots, progress=lambda done, total: progress("downloading", done, total)
    )
    calib = calibration_for(model_dir, cfg)
    progress("prepare", 1, 1)
    timings = {"prepare_s": round(time.perf_counter() - t0, 2)}
    if spec.ray is None:
        report = compress_model(model_dir, out, cfg, calib, progress=progress)
    else:
        with requires_extra("ray", "--ray"):
            from .distributed import compress_model_ray  # extra: ray

        r = spec.ray
        report = compress_model_ray(
            model_dir,
            out,
            cfg,
            calib,
            settings=settings,
            address=r.address,
            workers=r.workers,
            gpus_per_worker=r.gpus_per_worker,
            cpus_per_worker=r.cpus_per_worker,
            memory_per_worker=r.memory_per_worker,
            job_id=r.job_id,
            checkpoint_url=r.checkpoint_url,
            keep_checkpoint=r.keep_checkpoint,
            progress=progress,
        )
    timings["compress_s"] = round(report.seconds, 2)
    metrics: dict[str, Any] = {}
    if spec.evaluate is not None:
        t1 = time.perf_counter()
        metrics = evaluate_pair(model_dir, out, spec.evaluate, progress, settings.tasks_dir)
        timings["evaluate_s"] = round(time.perf_counter() - t1, 2)
    if upload is not None:
        t1 = time.perf_counter()
        progress("upload", 0, 1)
        upload.storage.upload_dir(out, upload.prefix)
        progress("upload", 1, 1)
        timings["upload_s"] = round(time.perf_counter() - t1, 2)
    return JobResult(out, report, metrics, timings, job_source(spec.model, out))


def job_source(model: str, artifact: Path) -> dict[str, Any]:
    """The job's record of its model: the reference as given (with its revision) and the manifest's `source`
    (hub id and commit when fetched from a hub, every source file's sha256)."""
    source = dict(read_manifest(artifact).get("source") or {})
    hub = parse_hub_ref(model)
    return {
        "ref": model,
        **source,
        **({"revision": hub.rev} if hub is not None else {}),
    }


def evaluate_pair(
    model_dir: Path, artifact: Path, spec: EvalSpec, progress: ProgressFn, tasks_dir: Path | None = None
) -> dict[str, Any]:
    """Perplexity of the source model and of the packed artifact on the same windows; with `spec.tasks`, their
    zero-shot accuracy on the same examples (metrics["tasks"]: before, after, where the data came from)."""
    steps = 4 if spec.tasks else 2
    progress("evaluate", 0, steps)
    before = evaluate_model(model_dir, spec)
    progress("evaluate", 1, steps)
    after = evaluate_model(artifact, spec)
    progress("evaluate", 2, steps)
    metrics: dict[str, Any] = {
        "ppl_before": before["ppl"],
        "ppl_after": after["ppl"],
        "eval_tokens": after["tokens"],
        "eval_windows": after["windows"],
        "eval_seqlen": after["seqlen"],
        "eval_bos": after["bos"],
    }
    if spec.tasks:
        fp = evaluate_tasks(model_dir, spec.tasks, tasks_dir, spec.tasks_limit)
        progress("evaluate", 3, steps)
        packed = evaluate_tasks(artifact, spec.tasks, tasks_dir, spec.tasks_limit)
        progress("evaluate", 4, steps)
        metrics["tasks"] = {
            "before": fp["tasks"],
            "after": packed["tasks"],
            **{k: packed[k] for k in ("data", "lm_eval", "data_package", "limit")},
        }
    return metrics
