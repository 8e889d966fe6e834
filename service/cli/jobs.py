"""`pbs2p jobs ...`: the command-line client of a running service."""

from __future__ import annotations

import argparse
import json
import sys

from pbs2p.core.config import CompressionConfig
from pbs2p.core.errors import Pbs2pError
from pbs2p.workers.model_refs import with_revision

from ..client import Client
from .progress import JobBar


def run_jobs_command(args: argparse.Namespace, cfg: CompressionConfig | None) -> None:
    client = Client(args.url, args.key)
    cmd = args.jobs_cmd
    if cmd == "submit":
        assert cfg is not None
        ev = None
        if args.evaluate or args.tasks:
            ev = {"data": args.eval_data, "seqlen": cfg.seqlen, "windows": args.eval_windows}
            if args.tasks:
                ev |= {"tasks": args.tasks, "tasks_limit": args.tasks_limit}
        model = with_revision(args.model, args.revision)
        job = client.submit(model, cfg.to_dict(), ev, args.name, args.idempotency_key, args.priority,
                            args.webhook_url)  # fmt: skip
        print(job["id"])
        if args.wait:
            job = client.wait(job["id"], JobBar())
            print(json.dumps(job, indent=1))
    elif cmd == "status":
        print(json.dumps(client.get(args.job_id), indent=1))
    elif cmd == "list":
        for job in client.list_jobs(tuple(args.state), None if args.all else args.limit):
            p = job["progress"]
            where = f"block {p['block']}/{p['blocks']}" if p.get("blocks") else (p.get("stage") or "")
            print(f"{job['id']}  {job['state']:<10} {job['model']}  {job['config']['method']} "
                  f"{job['config']['pattern']}  {where}")  # fmt: skip
    elif cmd == "wait":
        job = client.wait(args.job_id, JobBar())
        print(json.dumps(job, indent=1))
        if job["state"] != "SUCCEEDED":
            raise Pbs2pError(f"job {job['id']} ended {job['state']}: {job.get('error') or ''}")
    elif cmd == "download":
        files = client.download(args.job_id, args.out)
        print(f"{len(files) + 1} files, sha256 verified", file=sys.stderr)
        print(args.out)
    elif cmd == "cancel":
        print(json.dumps(client.cancel(args.job_id), indent=1))
    elif cmd == "delete":
        gone = client.delete(args.job_id)
        print(f"{args.job_id}: " + ("deleted" if gone else "cancelling; removed once it has stopped"))
