"""`pbs2p` command line: compress, eval, inspect, export-dense, generate; serve, api, worker, keys, jobs (a client
of the service); demo.

Progress and summaries on stderr, results on stdout. Bad input is one line `pbs2p: error: ...`, exit 2.
Settings (`PBS2P_*`) are read once here and passed down. The service's commands import the service's
packages when they run (the `service` extra)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import huggingface_hub.utils
import transformers.utils.logging
from pydantic import ByteSize, TypeAdapter, ValidationError

from pbs2p.core.config import method_label
from pbs2p.core.errors import Pbs2pError, requires_extra
from pbs2p.core.format import export_dense, format_inspect, inspect_artifact
from pbs2p.core.format.export import DTYPES
from pbs2p.workers.evaluation import EvalSpec, check_tasks, evaluate_model, evaluate_tasks
from pbs2p.workers.job import JobSpec, RayOptions, run_job
from pbs2p.workers.model_refs import fetch_model, with_revision
from pbs2p.workers.settings import WorkerSettings

from .generate import run_generate
from .options import add_config_options, config_from_args
from .progress import Progress


def _summary(report: dict[str, Any]) -> str:
    bits = report.get("bits") or {}
    ns = [b["n_keep"] for b in report["blocks"]]
    cfg = report["config"]
    return (
        f"method {method_label(cfg)}  blocks {len(ns)}  N per block {ns}\n"
        f"mean layer error {report['mean_rel_error']:.4f}  paper bits {bits.get('paper_bits', 16):.3f}  "
        f"true bits {bits.get('true_bits', 16):.3f}  time {report.get('seconds', 0):.1f} s"
    )


def ray_options(a: argparse.Namespace) -> RayOptions | None:
    """The job's Ray options from `compress --ray ...`, None without --ray."""
    if a.ray is None:
        for flag, value in (("--workers", a.workers), ("--job-id", a.job_id), ("--checkpoint", a.checkpoint)):
            if value is not None:
                raise Pbs2pError(f"{flag} applies to Ray jobs; add --ray (a local cluster) or --ray ADDRESS")
        return None
    if a.worker_memory is not None and a.worker_memory <= 0:
        raise Pbs2pError(f"--worker-memory {a.worker_memory} must be a positive number of GiB, e.g. 16")
    return RayOptions(
        address=None if a.ray == "local" else a.ray,
        workers=a.workers,
        gpus_per_worker=a.gpus_per_worker,
        cpus_per_worker=a.cpus_per_worker,
        memory_per_worker=int(a.worker_memory * 2**30) if a.worker_memory else None,
        job_id=a.job_id,
        checkpoint_url=a.checkpoint,
        keep_checkpoint=a.keep_checkpoint,
    )


def byte_size(text: str) -> int:
    """A size as `--max-shard-size` takes it: bytes, or with a unit (5GB, 500MB, 64MiB)."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{text!r} is no size; give bytes or e.g. 5GB, 500MB") from None


def task_list(text: str) -> list[str]:
    """`--tasks a,b`: the names, checked as the API's evaluate.tasks is."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    try:
        return EvalSpec(tasks=names).tasks
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.errors()[0]['msg']}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pbs2p", description="PBS²P: 1-bit weights on N:M sparsity for LLMs")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("compress", help="compress a model (alias, local safetensors directory, s3://, hub id)")
    c.add_argument("model", help="alias, local directory, s3://BUCKET/PREFIX or Hugging Face id (org/name[@revision])")
    c.add_argument("--revision", default=None, help="of a Hugging Face id: branch, tag or commit (= ID@REVISION)")
    c.add_argument("-o", "--out", required=True, type=Path)
    c.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")
    add_config_options(c)
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
    e = sub.add_parser("eval", help="perplexity, or zero-shot task accuracy (--tasks), of a model or an artifact")
    e.add_argument("model")
    e.add_argument("--revision", default=None, help="of a Hugging Face id: branch, tag or commit (= ID@REVISION)")
    e.add_argument("--data", default="wiki", help="'wiki' (held-out split) or a .txt/.jsonl file")
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--windows", type=int, default=None, help="evaluate the first K windows (default all)")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--device", default="cpu")
    e.add_argument("--json", action="store_true")
    t = e.add_argument_group("zero-shot tasks (lm-evaluation-harness, the 'tasks' extra) instead of perplexity")
    t.add_argument("--tasks", type=task_list, default=None, metavar="T1,T2", help="e.g. arc_easy,hellaswag,piqa")
    t.add_argument("--tasks-dir", type=Path, default=None, metavar="DIR",
                   help="your lm-eval task YAMLs and task data (default $PBS2P_TASKS_DIR)")  # fmt: skip
    t.add_argument("--limit", type=int, default=None, help="the first N examples of each task (default all)")
    i = sub.add_parser("inspect", help="bit accounting of a compressed artifact, from the bytes written")
    i.add_argument("artifact", type=Path)
    i.add_argument("--json", action="store_true")
    x = sub.add_parser("export-dense", help="write a plain transformers checkpoint (safetensors) of an artifact")
    x.add_argument("artifact", type=Path)
    x.add_argument("-o", "--out", required=True, type=Path)
    x.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: the source model's (config.json)")
    x.add_argument(
        "--max-shard-size", type=byte_size, default=None, metavar="SIZE",
        help="e.g. 5GB or 500MB (default: the source model's largest weights file, else 5GB)",
    )  # fmt: skip
    g = sub.add_parser("generate", help="text from an artifact (packed), streamed: --prompt TEXT, or --chat on stdin")
    g.add_argument("artifact", type=Path)
    g.add_argument("--prompt", default=None, help="text to continue (with --chat: the first user turn)")
    g.add_argument("--chat", action="store_true", help="a conversation: one user turn per stdin line, chat template")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--greedy", action="store_true", help="no sampling, whatever generation_config.json says")
    g.add_argument("--seed", type=int, default=0, help="of the sampling")
    g.add_argument("--dense", action="store_true", help="decode the linears once instead of keeping them packed")
    g.add_argument("--device", default="cpu")
    d = sub.add_parser(
        "demo", help="the main job: start the service, submit the real model over HTTP, download and check the artifact"
    )
    d.add_argument("--out", type=Path, default=Path("out/demo"), help="service data and the downloaded artifact")
    d.add_argument("--windows", type=int, default=40, help="held-out windows for perplexity before/after")
    add_config_options(d)
    s = sub.add_parser(
        "serve", help="run the API and a worker process it supervises (settings: PBS2P_* environment variables)"
    )
    a = sub.add_parser("api", help="run the API only (HTTP; jobs are driven by `pbs2p worker` processes)")
    for p in (s, a):
        p.add_argument("--host", default=None, help="default PBS2P_HOST or 127.0.0.1")
        p.add_argument("--port", type=int, default=None, help="default PBS2P_PORT or 8000")
        p.add_argument("--data-dir", type=Path, default=None, help="default PBS2P_DATA_DIR or ./pbs2p-data")
    s.add_argument(
        "--one-process", action="store_true", help="drive the jobs in the API's process instead of a worker process"
    )
    w = sub.add_parser("worker", help="drive jobs: claim them from the job store, run, evaluate, upload (no HTTP)")
    w.add_argument("--data-dir", type=Path, default=None, help="default PBS2P_DATA_DIR or ./pbs2p-data")
    w.add_argument("--supervisor", type=int, default=None, help=argparse.SUPPRESS)  # the pid of `serve`
    k = sub.add_parser("keys", help="API keys (in the service's database: PBS2P_DATABASE_URL / PBS2P_DATA_DIR)")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    kc = ksub.add_parser("create", help="create a key for a tenant; the key is printed once")
    kc.add_argument("--tenant", required=True)
    kr = ksub.add_parser("revoke", help="revoke a key by its prefix (the first 12 characters)")
    kr.add_argument("prefix")
    _add_jobs_parser(sub)
    db = sub.add_parser("db", help="the job store's schema (in PBS2P_DATABASE_URL / PBS2P_DATA_DIR; serve upgrades it)")
    dsub = db.add_subparsers(dest="db_cmd", required=True)
    dsub.add_parser("upgrade", help="migrate the database to the newest schema revision (safe to run any time)")
    dsub.add_parser("current", help="the database's schema revision; changes nothing")
    dd = dsub.add_parser("downgrade", help="take the database back to REVISION (before running an older pbs2p)")
    dd.add_argument("revision", help="e.g. 0001; `pbs2p db current` says where it is")
    return ap


def _add_jobs_parser(sub: Any) -> None:
    j = sub.add_parser("jobs", help="client of a running service: submit, status, list, wait, download, cancel, delete")
    j.add_argument("--url", default=os.environ.get("PBS2P_URL", "http://127.0.0.1:8000"), help="default $PBS2P_URL")
    j.add_argument("--key", default=os.environ.get("PBS2P_API_KEY", ""), help="default $PBS2P_API_KEY")
    jsub = j.add_subparsers(dest="jobs_cmd", required=True)
    js = jsub.add_parser("submit", help="queue a compression job; prints its id")
    js.add_argument("model", help="alias, Hugging Face id, s3://BUCKET/PREFIX or a path under the service's roots")
    js.add_argument("--revision", default=None, help="of a Hugging Face id: branch, tag or commit (= ID@REVISION)")
    js.add_argument("--name", default=None)
    js.add_argument("--idempotency-key", default=None, help="resubmitting with the same key returns the same job")
    js.add_argument("--priority", type=int, default=0, help="-100..100: higher starts first among your jobs")
    js.add_argument("--webhook-url", default=None, help="POSTed a signed event at each state change of the job")
    js.add_argument("--evaluate", action="store_true", help="measure perplexity before/after in the job")
    js.add_argument("--eval-data", default="wiki")
    js.add_argument("--eval-windows", type=int, default=40)
    js.add_argument(
        "--tasks", type=task_list, default=None, metavar="T1,T2",
        help="zero-shot task accuracy before/after too (implies --evaluate): e.g. arc_easy,piqa",
    )  # fmt: skip
    js.add_argument("--tasks-limit", type=int, default=None, help="the first N examples of each task (default all)")
    js.add_argument("--wait", action="store_true", help="follow the job until it is final")
    add_config_options(js)
    for name, text in (("status", "one job as JSON"), ("wait", "follow a job's progress until it is final"),
                       ("cancel", "cancel a job"),
                       ("delete", "delete a job, its artifact and checkpoints (cancelling it first)")):  # fmt: skip
        jsub.add_parser(name, help=text).add_argument("job_id")
    jl = jsub.add_parser("list", help="your jobs, newest first")
    jl.add_argument("--state", action="append", default=[])
    jl.add_argument("--limit", type=int, default=50, help="the newest this many (default 50)")
    jl.add_argument("--all", action="store_true", help="every job, page after page")
    jd = jsub.add_parser("download", help="download an artifact, verifying every file's sha256")
    jd.add_argument("job_id")
    jd.add_argument("-o", "--out", type=Path, required=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    # one bar per stage, this command's own: transformers' and huggingface_hub's bars (loading weights, writing
    # shards, downloads) would be a second bar for the same work
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
    try:
        if args.cmd == "compress":
            _compress(args)
        elif args.cmd == "eval":
            _eval(args)
        elif args.cmd == "inspect":
            info = inspect_artifact(args.artifact)
            print(json.dumps(info, indent=1) if args.json else format_inspect(info))
        elif args.cmd == "export-dense":
            print(export_dense(args.artifact, args.out, args.dtype, args.max_shard_size))
        elif args.cmd == "generate":
            run_generate(args.artifact, args.prompt, args.chat, args.max_new_tokens, args.greedy, args.seed,
                         args.dense, args.device)  # fmt: skip
        elif args.cmd == "demo":
            with requires_extra("service", "pbs2p demo"):
                from .demo import run_demo  # extra: service

            return run_demo(config_from_args(args), args.out, args.windows)
        elif args.cmd in ("serve", "api"):
            _serve(args)
        elif args.cmd == "worker":
            return _worker(args)
        elif args.cmd == "keys":
            _keys(args)
        elif args.cmd == "jobs":
            with requires_extra("service", "pbs2p jobs"):
                from .jobs import run_jobs_command  # extra: service

            run_jobs_command(args, config_from_args(args) if args.jobs_cmd == "submit" else None)
        elif args.cmd == "db":
            _db(args)
    except Pbs2pError as exc:
        print(f"pbs2p: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _compress(args: argparse.Namespace) -> None:
    ray = ray_options(args)
    if ray is not None:  # the job's own lines (resume, checkpointed blocks) are shown
        logging.getLogger("pbs2p.workers.distributed").setLevel(logging.INFO)
    spec = JobSpec(with_revision(args.model, args.revision), config_from_args(args), ray=ray)
    bar = Progress()
    try:
        result = run_job(spec, args.out, WorkerSettings(), progress=bar)
    finally:
        bar.close()
    report = result.report.to_dict()
    print(_summary(report), file=sys.stderr)
    print(json.dumps(report, indent=1) if args.json else args.out)


def _eval(args: argparse.Namespace) -> None:
    if args.tasks is not None:
        _eval_tasks(args)
        return
    if args.tasks_dir is not None or args.limit is not None:
        raise Pbs2pError("--tasks-dir and --limit apply to zero-shot tasks; add --tasks T1,T2")
    if args.windows is not None and args.windows < 1:
        raise Pbs2pError("--windows must be >= 1")
    bar = Progress()
    try:
        model_dir = fetch_model(with_revision(args.model, args.revision), WorkerSettings(),
                                progress=lambda done, total: bar("downloading", done, total))  # fmt: skip
        r = evaluate_model(
            model_dir,
            EvalSpec(data=args.data, seqlen=args.seqlen, windows=args.windows),
            batch_size=args.batch_size,
            device=args.device,
            progress=lambda done, total: bar("eval", done, total),
        )
    finally:
        bar.close()
    r["model"] = args.model
    bos = "each window starts with BOS" if r["bos"] else "no BOS (the tokenizer adds none)"
    print(f"{r['windows']} windows x {r['seqlen']} tokens, {bos}", file=sys.stderr)
    print(json.dumps(r) if args.json else f"perplexity {r['ppl']:.3f} over {r['tokens']} tokens")


def _eval_tasks(args: argparse.Namespace) -> None:
    if not args.tasks:
        raise Pbs2pError("--tasks names no task; give e.g. --tasks arc_easy,piqa")
    if args.limit is not None and args.limit < 1:
        raise Pbs2pError("--limit must be >= 1")
    settings = WorkerSettings()
    tasks_dir = args.tasks_dir or settings.tasks_dir
    check_tasks(args.tasks, tasks_dir)  # before a download
    bar = Progress()
    try:
        model_dir = fetch_model(with_revision(args.model, args.revision), settings,
                                progress=lambda done, total: bar("downloading", done, total))  # fmt: skip
        r = evaluate_tasks(model_dir, args.tasks, tasks_dir, args.limit, args.batch_size, args.device,
                           progress=lambda done, total: bar("tasks", done, total))  # fmt: skip
    finally:
        bar.close()
    r["model"] = args.model
    if args.json:
        print(json.dumps(r))
        return
    for task, m in r["tasks"].items():
        scores = "  ".join(f"{k} {v:.4f} ± {m[k + '_stderr']:.4f}" for k, v in m.items() if f"{k}_stderr" in m)
        print(f"{task:<16} {scores}  ({m.get('examples', '?')} examples)")


def _serve(args: argparse.Namespace) -> None:
    with requires_extra("service", "pbs2p serve"):
        from pbs2p.service.server import serve  # extra: service
        from pbs2p.service.settings import Settings  # extra: service

    overrides = {
        k: v for k, v in (("host", args.host), ("port", args.port), ("data_dir", args.data_dir)) if v is not None
    }
    mode = "api" if args.cmd == "api" else "one-process" if args.one_process else "serve"
    serve(Settings(**overrides), mode)


def _worker(args: argparse.Namespace) -> int:
    with requires_extra("service", "pbs2p worker"):
        from pbs2p.service.server import configure_logging  # extra: service
        from pbs2p.service.settings import Settings  # extra: service
        from pbs2p.service.worker import run_worker  # extra: service

    settings = Settings(**({"data_dir": args.data_dir} if args.data_dir is not None else {}))
    configure_logging(settings)
    return run_worker(settings, args.supervisor)


def _keys(args: argparse.Namespace) -> None:
    with requires_extra("service", "pbs2p keys"):
        from pbs2p.service.jobstore import JobStore  # extra: service
        from pbs2p.service.settings import Settings  # extra: service

    store = JobStore(Settings().db_url)
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
    with requires_extra("service", "pbs2p db"):
        from pbs2p.service import migrations  # extra: service
        from pbs2p.service.jobstore import make_engine  # extra: service
        from pbs2p.service.settings import Settings  # extra: service

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


if __name__ == "__main__":
    sys.exit(main())
