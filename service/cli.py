"""`pbs2p` command line: compress, eval, inspect, export-dense, demo.

Progress and summaries on stderr, results on stdout."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch

from pbs2p_core.config import METHODS, CompressionConfig, NMPattern
from pbs2p_core.errors import Pbs2pError

log = logging.getLogger("pbs2p")


class _Progress:
    """A tqdm bar per stage, on stderr."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled, self.stage, self.bar = enabled, "", None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            unit = {"eval": "window", "capture": "step"}.get(stage, "block")
            self.bar = tqdm(total=total, desc=stage, unit=unit, file=sys.stderr)
        assert self.bar is not None
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Pbs2pError("CUDA is not available on this machine; use --device cpu")


def config_from_args(a: argparse.Namespace) -> CompressionConfig:
    return CompressionConfig(
        method=a.method,
        pattern=NMPattern.parse(a.pattern),
        spbo_steps=a.spbo_steps,
        spbo_mode=a.spbo_mode,
        allocation=a.allocation,
        cfs_score=a.cfs_score,
        mask_score=a.mask_score,
        arb_variant=a.arb_variant,
        salient_columns=a.salient_columns,
        column_feedback=a.column_feedback,
        scale_refit=not a.no_scale_refit,
        spbo_report=a.spbo_report,
        scale_layout=a.scale_layout,
        salient_allocation=a.salient_allocation,
        block_size=a.block_size,
        damping=a.damping,
        skip_modules=tuple(a.skip or ()),
        propagation=a.propagation,
        true_sequential=a.true_sequential,
        calib=a.calib,
        calib_samples=a.calib_samples,
        seqlen=a.seqlen,
        seed=a.seed,
        batch_size=a.batch_size,
        device=a.device,
    )


def run_compress(
    model: str, out: Path, cfg: CompressionConfig, progress: bool = True, ray: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Resolve the model and the calibration text, compress, return the report as a dict.

    `ray`: run the job on Ray with these keyword arguments of `compress_model_ray` (address, workers, job_id,
    checkpoint_url, ...); None runs it in this process."""
    from transformers import AutoTokenizer

    from workers.pipeline import compress_model
    from workers.sources import calibration_windows, load_documents, resolve_model

    if ray is None:
        _check_device(cfg.device)  # on Ray, the workers' resources decide the device
    model_dir = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    docs = load_documents(cfg.calib, "calib")
    calib = calibration_windows(tok, docs, cfg.calib_samples, cfg.seqlen, cfg.seed)
    bar = _Progress(progress)
    try:
        if ray is None:
            report = compress_model(model_dir, out, cfg, calib, progress=bar)
        else:
            from workers.distributed import compress_model_ray

            report = compress_model_ray(model_dir, out, cfg, calib, progress=bar, **ray)
    finally:
        bar.close()
    return report.to_dict()


def ray_options(a: argparse.Namespace) -> dict[str, Any] | None:
    """compress_model_ray's keyword arguments from `compress --ray ...`, None without --ray."""
    if a.ray is None:
        for flag, value in (("--workers", a.workers), ("--job-id", a.job_id), ("--checkpoint", a.checkpoint)):
            if value is not None:
                raise Pbs2pError(f"{flag} applies to Ray jobs; add --ray (a local cluster) or --ray ADDRESS")
        return None
    if a.worker_memory is not None and a.worker_memory <= 0:
        raise Pbs2pError(f"--worker-memory {a.worker_memory} must be a positive number of GiB, e.g. 16")
    return {
        "address": None if a.ray == "local" else a.ray,
        "workers": a.workers,
        "gpus_per_worker": a.gpus_per_worker,
        "cpus_per_worker": a.cpus_per_worker,
        "memory_per_worker": int(a.worker_memory * 2**30) if a.worker_memory else None,
        "job_id": a.job_id,
        "checkpoint_url": a.checkpoint,
        "keep_checkpoint": a.keep_checkpoint,
    }


def run_eval(
    model: str,
    data: str = "wiki",
    seqlen: int = 512,
    windows: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pbs2p_core.artifact import is_artifact, load_artifact
    from pbs2p_core.evaluate import perplexity
    from workers.sources import eval_windows, load_documents, resolve_model

    _check_device(device)
    model_dir = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, bos = eval_windows(tok, load_documents(data, "eval"), seqlen, windows)
    if is_artifact(model_dir):  # a pbs2p artifact: verified, packed linears decoded per forward
        lm: Any = load_artifact(model_dir, mode="packed", device=device)
    else:
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lm.to(device)
    bar = _Progress(progress)
    try:
        res = perplexity(lm, ids, bos, batch_size=batch_size, device=device, progress=lambda d, t: bar("eval", d, t))
    finally:
        bar.close()
    return {**res.to_dict(), "model": str(model), "data": data}


def _summary(report: dict[str, Any]) -> str:
    bits = report.get("bits") or {}
    ns = [b["n_keep"] for b in report["blocks"]]
    cfg = report["config"]
    return (
        f"method {cfg['method']} pattern {cfg['pattern']}  blocks {len(ns)}  N per block {ns}\n"
        f"mean layer error {report['mean_rel_error']:.4f}  paper bits {bits.get('paper_bits', 16):.3f}  "
        f"true bits {bits.get('true_bits', 16):.3f}  time {report.get('seconds', 0):.1f} s"
    )


def _add_compress_args(p: argparse.ArgumentParser) -> None:
    d = CompressionConfig()  # one place for the defaults: the config's
    p.add_argument("--method", choices=METHODS, default=d.method)
    p.add_argument(
        "--pattern", default=str(d.pattern), help=f"N:M, N weights kept per group of M (default {d.pattern})"
    )
    p.add_argument("--spbo-steps", type=int, default=None, help="SPBO steps tau (default M - N)")
    p.add_argument("--spbo-mode", choices=("aware", "fixed"), default=d.spbo_mode)
    p.add_argument(
        "--allocation", choices=("cfs", "uniform"), default=d.allocation, help=f"N per block (default {d.allocation})"
    )
    p.add_argument(
        "--cfs-score",
        choices=("cosine", "error"),
        default=d.cfs_score,
        help=f"CFS block importance (default {d.cfs_score})",
    )
    p.add_argument("--mask-score", choices=("obs", "wanda"), default=d.mask_score)
    p.add_argument("--arb-variant", choices=("arb", "arb-x", "arb-obs", "arb-rc"), default=d.arb_variant)
    p.add_argument(
        "--salient-columns",
        type=int,
        default=d.salient_columns,
        help=f"per column block, on average (default {d.salient_columns})",
    )
    p.add_argument("--column-feedback", action="store_true")
    p.add_argument(
        "--no-scale-refit", action="store_true", help="keep each block's ARB scales (ablation of the joint refit)"
    )
    p.add_argument("--spbo-report", action="store_true", help="also report each layer's error before SPBO")
    p.add_argument(
        "--salient-allocation", choices=("block", "linear"), default=None, help="default linear (block with a search)"
    )
    p.add_argument(
        "--scale-layout", choices=("full", "shared", "lean"), default=d.scale_layout, help="scales per row per block"
    )
    p.add_argument("--damping", type=float, default=d.damping, help="relative Hessian damping")
    p.add_argument(
        "--block-size", type=int, default=d.block_size, help="column block (scales per block), e.g. 128 or 256"
    )
    p.add_argument("--skip", action="append", metavar="GLOB", help="leave matching linears uncompressed")
    p.add_argument("--propagation", choices=("sequential", "independent"), default=d.propagation)
    p.add_argument("--true-sequential", action="store_true", help="one calibration pass per group of linears")
    p.add_argument("--calib", default=d.calib, help="'wiki' or a .txt/.jsonl file")
    p.add_argument("--calib-samples", type=int, default=d.calib_samples)
    p.add_argument("--seqlen", type=int, default=d.seqlen)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--device", default=d.device)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pbs2p", description="PBS²P: 1-bit weights on N:M sparsity for LLMs")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compress", help="compress a model (alias or local safetensors directory)")
    c.add_argument("model")
    c.add_argument("-o", "--out", required=True, type=Path)
    c.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")
    _add_compress_args(c)
    r = c.add_argument_group("Ray (a job spread over workers, checkpointed after every block)")
    r.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: no ADDRESS starts a local cluster on 127.0.0.1 with every core; "
        "'auto', HOST:PORT or ray://HOST:PORT joins one",
    )
    r.add_argument("--workers", type=int, default=None, help="workers of the job (default: GPUs, else CPUs)")
    r.add_argument("--gpus-per-worker", type=float, default=None, help="default 1 when the cluster has GPUs, else 0")
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--worker-memory", type=float, default=None, metavar="GIB", help="memory reserved per worker")
    r.add_argument("--job-id", default=None, help="the job's name; started again with it, a job resumes")
    r.add_argument(
        "--checkpoint", default=None, metavar="DIR_OR_S3_URL", help="checkpoint storage (default: the cache dir)"
    )
    r.add_argument("--keep-checkpoint", action="store_true", help="keep the checkpoints once the artifact is written")
    e = sub.add_parser("eval", help="perplexity of a model or a compressed output")
    e.add_argument("model")
    e.add_argument("--data", default="wiki", help="'wiki' (held-out split) or a .txt/.jsonl file")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=None, help="evaluate the first K windows (default all)")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    i = sub.add_parser("inspect", help="bit accounting of a compressed artifact, from the bytes written")
    i.add_argument("artifact", type=Path)
    i.add_argument("--json", action="store_true")
    x = sub.add_parser("export-dense", help="write a plain transformers checkpoint (safetensors) of an artifact")
    x.add_argument("artifact", type=Path)
    x.add_argument("-o", "--out", required=True, type=Path)
    d = sub.add_parser(
        "demo", help="the main job: start the service, submit the real model over HTTP, download and check the artifact"
    )
    d.add_argument("--out", type=Path, default=Path("out/demo"), help="service data and the downloaded artifact")
    d.add_argument("--windows", type=int, default=40, help="held-out windows for perplexity before/after")
    _add_compress_args(d)
    s = sub.add_parser("serve", help="run the API and the dispatcher (settings: PBS2P_* environment variables)")
    s.add_argument("--host", default=None, help="default PBS2P_HOST or 127.0.0.1")
    s.add_argument("--port", type=int, default=None, help="default PBS2P_PORT or 8000")
    s.add_argument("--data-dir", type=Path, default=None, help="default PBS2P_DATA_DIR or ./pbs2p-data")
    k = sub.add_parser("keys", help="API keys (in the service's database: PBS2P_DATABASE_URL / PBS2P_DATA_DIR)")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="create a key for a tenant; the key is printed once")
    kc.add_argument("--tenant", required=True)
    kr = ksub.add_parser("revoke", help="revoke a key by its prefix (the first 12 characters)")
    kr.add_argument("prefix")
    _add_jobs_parser(sub)
    _add_db_parser(sub)
    return ap


def _add_jobs_parser(sub: Any) -> None:
    j = sub.add_parser("jobs", help="client of a running service: submit, status, list, wait, download, cancel")
    j.add_argument("--url", default=os.environ.get("PBS2P_URL", "http://127.0.0.1:8000"), help="default $PBS2P_URL")
    j.add_argument("--key", default=os.environ.get("PBS2P_API_KEY", ""), help="default $PBS2P_API_KEY")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    js = jsub.add_parser("submit", help="queue a compression job; prints its id")
    js.add_argument("model", help="alias, Hugging Face id, s3://BUCKET/PREFIX or a path under the service's roots")
    js.add_argument("--name", default=None)
    js.add_argument("--idempotency-key", default=None, help="resubmitting with the same key returns the same job")
    js.add_argument("--evaluate", action="store_true", help="measure perplexity before/after in the job")
    js.add_argument("--eval-data", default="wiki")
    js.add_argument("--eval-windows", type=int, default=40)
    js.add_argument("--wait", action="store_true", help="follow the job until it is final")
    _add_compress_args(js)
    for name, text in (("status", "one job as JSON"), ("wait", "follow a job's progress until it is final"),
                       ("cancel", "cancel a job")):  # fmt: skip
        jsub.add_parser(name, help=text).add_argument("job_id")
    jl = jsub.add_parser("list", help="your jobs, newest first")
    jl.add_argument("--state", action="append", default=[])
    jd = jsub.add_parser("download", help="download an artifact, verifying every file's sha256")
    jd.add_argument("job_id")
    jd.add_argument("-o", "--out", type=Path, required=True)


def _add_db_parser(sub: Any) -> None:
    db = sub.add_parser("db", help="the job store's schema (in PBS2P_DATABASE_URL / PBS2P_DATA_DIR; serve upgrades it)")
    dsub = db.add_subparsers(dest="db_cmd", required=True)
    dsub.add_parser("upgrade", help="migrate the database to the newest schema revision (safe to run any time)")
    dsub.add_parser("current", help="the database's schema revision; changes nothing")
    dd = dsub.add_parser("downgrade", help="take the database back to REVISION (before running an older pbs2p)")
    dd.add_argument("revision", help="e.g. 0001; `pbs2p db current` says where it is")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    try:
        if args.cmd == "compress":
            ray = ray_options(args)
            if ray is not None:  # the job's own lines (resume, checkpointed blocks) are shown
                logging.getLogger("workers.distributed").setLevel(logging.INFO)
            report = run_compress(args.model, args.out, config_from_args(args), ray=ray)
            print(_summary(report), file=sys.stderr)
            print(json.dumps(report, indent=1) if args.json else args.out)
        elif args.cmd == "eval":
            if args.windows is not None and args.windows < 1:
                raise Pbs2pError("--windows must be >= 1")
            r = run_eval(args.model, args.data, args.seqlen, args.windows, args.batch_size, args.device)
            bos = "each window starts with BOS" if r["bos"] else "no BOS (the tokenizer adds none)"
            print(f"{r['windows']} windows x {r['seqlen']} tokens, {bos}", file=sys.stderr)
            print(json.dumps(r) if args.json else f"perplexity {r['ppl']:.3f} over {r['tokens']} tokens")
        elif args.cmd == "inspect":
            from pbs2p_core.artifact import format_inspect, inspect_artifact

            info = inspect_artifact(args.artifact)
            print(json.dumps(info, indent=1) if args.json else format_inspect(info))
        elif args.cmd == "export-dense":
            from pbs2p_core.artifact import export_dense

            print(export_dense(args.artifact, args.out))
        elif args.cmd == "demo":
            return _demo(args)
        elif args.cmd == "serve":
            _serve(args)
        elif args.cmd == "keys":
            _keys(args)
        elif args.cmd == "jobs":
            _jobs(args)
        elif args.cmd == "db":
            _db(args)
    except Pbs2pError as exc:
        print(f"pbs2p: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve(args: argparse.Namespace) -> None:
    from .server import serve
    from .settings import Settings

    overrides = {
        k: v for k, v in (("host", args.host), ("port", args.port), ("data_dir", args.data_dir)) if v is not None
    }
    serve(Settings(**overrides))


def _keys(args: argparse.Namespace) -> None:
    from .settings import Settings
    from .store import Store

    store = Store(Settings().db_url)
    if args.keys_cmd == "create":
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,63}", args.tenant):
            raise Pbs2pError(
                f"tenant {args.tenant!r}: use 1-64 of a-z, 0-9, '_' and '-', starting with a letter or digit"
            )
        print(store.create_key(args.tenant))
        print(f"key for tenant {args.tenant!r}: shown once, only its hash is stored", file=sys.stderr)
    else:
        n = store.revoke_key(args.prefix)
        print(f"revoked {n} key(s)", file=sys.stderr)


def _db(args: argparse.Namespace) -> None:
    from . import migrations
    from .settings import Settings
    from .store import make_engine

    engine = make_engine(Settings().db_url)
    try:
        if args.db_cmd == "current":
            print(migrations.current(engine).describe())
            return
        if args.db_cmd == "downgrade":
            migrations.downgrade(engine, args.revision)
            print(migrations.current(engine).describe())
            return
        found, now = migrations.upgrade(engine)
        print(f"already at {found.describe()}" if found.revision == now else f"upgraded {found.short} -> {now}")
    finally:
        engine.dispose()


class _JobBar:
    """The progress of a job followed over HTTP, on stderr."""

    def __init__(self) -> None:
        self.bar = _Progress()
        self.state = ""

    def __call__(self, job: dict[str, Any]) -> None:
        p = job.get("progress") or {}
        if job["state"] != self.state:
            self.bar.close()
            self.state = job["state"]
            print(f"job {job['id']}: {self.state}", file=sys.stderr)
        if p.get("stage") == "compress" and p.get("blocks"):
            self.bar("compress", p["block"], p["blocks"])


def _jobs(args: argparse.Namespace) -> None:
    from .client import Client

    client = Client(args.url, args.key)
    cmd = args.jobs_cmd
    if cmd == "submit":
        ev = {"data": args.eval_data, "seqlen": args.seqlen, "windows": args.eval_windows} if args.evaluate else None
        job = client.submit(args.model, config_from_args(args).to_dict(), ev, args.name, args.idempotency_key)
        print(job["id"])
        if args.wait:
            job = client.wait(job["id"], _JobBar())
            print(json.dumps(job, indent=1))
    elif cmd == "status":
        print(json.dumps(client.get(args.job_id), indent=1))
    elif cmd == "list":
        for job in client.list_jobs(tuple(args.state)):
            p = job["progress"]
            where = f"block {p['block']}/{p['blocks']}" if p.get("blocks") else (p.get("stage") or "")
            print(f"{job['id']}  {job['state']:<10} {job['model']}  {job['config']['method']} "
                  f"{job['config']['pattern']}  {where}")  # fmt: skip
    elif cmd == "wait":
        job = client.wait(args.job_id, _JobBar())
        print(json.dumps(job, indent=1))
        if job["state"] != "SUCCEEDED":
            raise Pbs2pError(f"job {job['id']} ended {job['state']}: {job.get('error') or ''}")
    elif cmd == "download":
        files = client.download(args.job_id, args.out)
        print(f"{len(files) + 1} files, sha256 verified", file=sys.stderr)
        print(args.out)
    elif cmd == "cancel":
        print(json.dumps(client.cancel(args.job_id), indent=1))


def _demo(args: argparse.Namespace) -> int:
    """The main job end to end: `pbs2p serve` in a child process, the packaged SmolLM2-135M submitted over HTTP,
    progress followed, the artifact downloaded and verified, perplexity before/after printed."""
    from .demo import run_demo

    return run_demo(config_from_args(args), args.out, args.windows)


if __name__ == "__main__":
    sys.exit(main())
