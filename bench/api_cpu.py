"""API CPU per request (issue 20 item 2, the read path): the API process's own CPU seconds per GET, measured on one
keep-alive connection, so that a change to the read path shows up without the noise of a loaded, shared machine.

Starts `pbs2p api` (the real uvicorn on 127.0.0.1, no job driver; its access log goes to a file, as in production
it goes to a log) on a SQLite store filled by this script: `--jobs` jobs of the measured tenant (small queued
jobs as bench/service_load.py submits, one RUNNING job with progress, one SUCCEEDED job with a `--blocks`-block
report: 7 linears a block, metrics and timings, as a real job stores it) and as many of another tenant, and a few
dozen API keys. Then, for each kind of request, `--requests` sequential requests from one `http.client`
keep-alive connection (after a warm-up), and the server process's CPU time (user + system, /proc via psutil)
before and after: CPU ms per request. Kinds: GET one job (a queued one, the running one, the one with the full
report), the same with If-None-Match (its ETag when the service sends one: a 304; else the plain GET again),
GET /v1/jobs?limit=20, POST /v1/jobs (a new small job under a new Idempotency-Key, as bench/service_load.py
submits; last, as it adds jobs), and bench/service_load.py's mix (its GETs: half the running job, half a client's
own queued job; its lists; its POSTs), weighted as it sends them, with and without the POSTs.

With `--baseline REF` the service of commit REF (`git archive`, run with its package first on PYTHONPATH) is
measured too, alternating with this tree's, `--rounds` times each on the same store (a fresh server each round):
before and after side by side in one run. The store is filled by this tree's code (REF must have the same schema).

`--profile DIR` also samples this tree's server under py-spy (`py-spy record`, native stacks off) during one
more pass and writes DIR/api_cpu.speedscope.json and the top functions (self and total samples) to stdout.

`--clients C` sends from C connections at once (threads, each one request after the other), for the cost of
concurrency (more thread hops waiting for one another, the event loop's turns shared).

Writes bench/results/api_cpu.md and .json (api_cpu_C_clients.* with --clients C; or --out DIR). Usage:
  python bench/api_cpu.py [--requests 2000] [--rounds 3] [--jobs 300] [--blocks 30] [--clients 1]
                          [--baseline GIT_REF] [--profile DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, add_out_option, code_env, machine, write_table  # noqa: E402
from bench.service_load import code_version, export_tree, git  # noqa: E402
from pbs2p.core.bits import BitCount  # noqa: E402
from pbs2p.core.config import CompressionConfig  # noqa: E402
from pbs2p.service.cli.demo import start_service, stop_service  # noqa: E402
from pbs2p.service.jobrecords import JobState  # noqa: E402
from pbs2p.service.jobstore import JobStore  # noqa: E402
from pbs2p.service.settings import Settings  # noqa: E402
from pbs2p.testing.tiny import write_text  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GET_QUEUED, GET_RUNNING, GET_FULL = "GET one job (queued)", "GET one job (running)", "GET one job (full report)"
INM_RUNNING, INM_FULL = "GET running, If-None-Match", "GET full report, If-None-Match"
LIST, POST = "GET /v1/jobs?limit=20", "POST /v1/jobs (a new job)"
KINDS = (GET_QUEUED, GET_RUNNING, GET_FULL, INM_RUNNING, INM_FULL, LIST, POST)  # POST last: it adds jobs
# bench/service_load.py's mix: 79.5 % GET one job (half the running one, half a client's own queued one), 15 % list,
# 5.5 % POST (new jobs, replays, race pairs: counted here as new jobs)
READS = {GET_RUNNING: 0.3975, GET_QUEUED: 0.3975, LIST: 0.15}
MIXES = {"reads as service_load.py mixes them": READS, "all as service_load.py mixes them": {**READS, POST: 0.055}}


# -------------------------------------------------------------------------------------------- the store


def full_report(blocks: int) -> dict[str, Any]:
    """A finished job's report as the dispatcher stores it (workers/job.py: JobResult.summary), `blocks` blocks."""
    bits = BitCount(weights=4096 * 4096, sign_bits=12_582_912, residual_bits=262_144, mask_bits=6_291_456)
    bits.add(BitCount(scale_bits=524_288, index_bits=4096))
    per_linear = bits.to_dict()
    return {
        "source": {"model": "HuggingFaceTB/SmolLM2-135M", "revision": "main", "sha": "0" * 40},
        "metrics": {
            "mean_rel_error": 0.0812,
            "paper_bits": per_linear["paper_bits"],
            "true_bits": per_linear["true_bits"],
            "calib_tokens": 262_144,
            "ppl_before": 16.86,
            "ppl_after": 155.2,
        },
        "timings": {"prepare_s": 3.2, "capture_s": 11.5, "compress_s": 812.4, "evaluate_s": 60.1, "upload_s": 2.3},
        "model_type": "llama",
        "blocks": [
            {
                "index": b,
                "n_keep": 6,
                "cosine": 0.9731 - b * 1e-3,
                "seconds": 27.1,
                "linears": [
                    {
                        "name": f"model.layers.{b}.{'self_attn' if i < 4 else 'mlp'}.{name}",
                        "shape": [576, 576] if i < 4 else [1536, 576],
                        "rel_error": 0.07 + 1e-4 * (b * 7 + i),
                        "rel_error_oneshot": 0.11 + 1e-4 * (b * 7 + i),
                        "bits": per_linear,
                    }
                    for i, name in enumerate(LINEARS)
                ],
            }
            for b in range(blocks)
        ],
    }


def fill_store(data: Path, jobs: int, blocks: int) -> dict[str, Any]:
    """The store of the measurement in `data`, and what a POST submits (a model directory as the submit checks
    it: config.json and a safetensors file; the calibration text of bench/service_load.py's small jobs): returns
    the key, the job ids to read and the POST's body."""
    small = data / "small"
    small.mkdir(parents=True)
    (small / "config.json").write_text("{}")
    (small / "model.safetensors").write_bytes(b"")
    calib = write_text(data / "calib.txt", docs=40, words=100)
    store = JobStore(Settings(data_dir=data).db_url)
    try:
        for i in range(40):  # other tenants' keys, one revoked
            other = store.create_key(f"tenant{i}")
        store.revoke_key(other[:12])
        key = store.create_key("load")
        post = {"model": str(small), "config": {"pattern": "6:8", "calib": str(calib), "seed": 0, "calib_samples": 4,
                                                "seqlen": 32, "batch_size": 4}}  # fmt: skip
        cfg = CompressionConfig.model_validate(post["config"]).to_dict()
        full, _ = store.create_job("load", str(data / "long"), cfg, {"data": "wiki", "windows": 40}, "full")
        claimed = store.claim("bench")
        assert claimed is not None and claimed.id == full.id
        for st in (JobState.UPLOADING, JobState.SUCCEEDED):
            prev = JobState.RUNNING if st == JobState.UPLOADING else JobState.UPLOADING
            report = full_report(blocks) if st == JobState.SUCCEEDED else {}
            assert store.transition(full.id, [prev], st, owner="bench", report=report, artifact=f"jobs/{full.id}")
        running, _ = store.create_job("load", str(data / "long"), cfg, None, "long")
        assert (claimed := store.claim("bench")) is not None and claimed.id == running.id
        store.set_progress(
            running.id, "bench", {"stage": "compress", "block": 57, "blocks": 160, "percent": 35.6, "eta_seconds": 412}
        )
        queued = ""
        for i in range(jobs):
            for tenant in ("load", "other"):
                job, _ = store.create_job(tenant, str(small), cfg, None, f"small-{i}", f"k-{tenant}-{i}")
                queued = job.id if tenant == "load" else queued
        return {"key": key, GET_QUEUED: queued, GET_RUNNING: running.id, GET_FULL: full.id, "post": post}
    finally:
        store.close()


# -------------------------------------------------------------------------------------------- measuring


class Conn:
    """One keep-alive HTTP/1.1 connection with the key; each request's status, headers and body checked."""

    def __init__(self, url: str, key: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=30)
        self.auth = f"Bearer {key}"

    def get(self, path: str, etag: str | None = None) -> tuple[int, str | None, bytes]:
        headers = {"Authorization": self.auth}
        if etag is not None:
            headers["If-None-Match"] = etag
        self.conn.request("GET", path, headers=headers)
        resp = self.conn.getresponse()
        body = resp.read()
        return resp.status, resp.getheader("ETag"), body

    def post(self, path: str, body: str, idempotency_key: str) -> tuple[int, str | None, bytes]:
        headers = {"Authorization": self.auth, "Content-Type": "application/json", "Idempotency-Key": idempotency_key}
        self.conn.request("POST", path, body=body.encode(), headers=headers)
        resp = self.conn.getresponse()
        return resp.status, resp.getheader("ETag"), resp.read()

    def close(self) -> None:
        self.conn.close()


def requests_of(conn: Conn, ids: dict[str, str]) -> dict[str, Callable[[], None]]:
    """kind -> one request of that kind (raises on an unexpected answer)."""

    def get(kind: str) -> Callable[[], None]:
        path = f"/v1/jobs/{ids[kind]}"

        def one() -> None:
            status, _, body = conn.get(path)
            if status != 200 or not body.startswith(b'{"id":"job_'):
                raise SystemExit(f"GET {path}: HTTP {status} {body[:200]!r}")

        return one

    def conditional(kind: str) -> Callable[[], None]:
        path = f"/v1/jobs/{ids[kind]}"
        status, etag, _ = conn.get(path)
        want = 304 if etag else 200  # a service without ETags answers the plain GET

        def one() -> None:
            status, _, body = conn.get(path, etag or '"none"')
            if status != want:
                raise SystemExit(f"GET {path} If-None-Match {etag}: HTTP {status} {body[:200]!r}")

        return one

    def submit() -> None:
        key = uuid.uuid4().hex
        status, _, raw = conn.post("/v1/jobs", json.dumps(ids["post"] | {"name": f"posted-{key[:8]}"}), key)
        if status != 201 or not raw.startswith(b'{"id":"job_'):
            raise SystemExit(f"POST /v1/jobs: HTTP {status} {raw[:300]!r}")

    def page() -> None:
        status, _, body = conn.get("/v1/jobs?limit=20")
        if status != 200 or body.count(b'"id":"job_') != 20:
            raise SystemExit(f"GET /v1/jobs?limit=20: HTTP {status} {body[:200]!r}")

    return {
        GET_QUEUED: get(GET_QUEUED),
        GET_RUNNING: get(GET_RUNNING),
        GET_FULL: get(GET_FULL),
        INM_RUNNING: conditional(GET_RUNNING),
        INM_FULL: conditional(GET_FULL),
        LIST: page,
        POST: submit,
    }


def cpu_of(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def measure_server(url: str, pid: int, ids: dict[str, Any], n: int, clients: int = 1) -> dict[str, dict[str, float]]:
    """kind -> {cpu_ms, wall_ms} per request, over `n` requests after n // 10 of warm-up, sent by `clients`
    connections at once (threads, each its share in turn)."""
    conns = [Conn(url, ids["key"]) for _ in range(clients)]
    proc = psutil.Process(pid)
    out: dict[str, dict[str, float]] = {}
    senders = [requests_of(c, ids) for c in conns]
    per = max(n // clients, 1)

    def run(one: Callable[[], None], count: int) -> None:
        for _ in range(count):
            one()

    try:
        with ThreadPoolExecutor(clients) as pool:
            for kind in KINDS:
                list(pool.map(run, [s[kind] for s in senders], [max(per // 10, 20)] * clients))
                c0, t0 = cpu_of(proc), time.perf_counter()
                list(pool.map(run, [s[kind] for s in senders], [per] * clients))
                c1, t1 = cpu_of(proc), time.perf_counter()
                done = per * clients
                out[kind] = {"cpu_ms": (c1 - c0) / done * 1000, "wall_ms": (t1 - t0) / done * 1000}
    finally:
        for c in conns:
            c.close()
    for name, mix in MIXES.items():
        out[name] = {k: sum(out[kind][k] * w for kind, w in mix.items()) / sum(mix.values()) for k in out[GET_QUEUED]}
    return out


def run_service(data: Path, tree: Path | None) -> tuple[Any, str]:
    env = {"PBS2P_DISPATCHER": "false", "PBS2P_MODEL_ROOTS": str(data), "OMP_NUM_THREADS": "1"}
    env.update(code_env(tree))
    with contextlib.chdir(tree or ROOT):
        return start_service(data, env, 120.0, "api")


def profile(data: Path, ids: dict[str, Any], n: int, clients: int, out: Path) -> None:
    """This tree's server under `py-spy record` during one pass of every kind; the top functions to stdout."""
    proc, url = run_service(data, None)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / "api_cpu.collapsed.txt"
    spy_cmd = [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid)]
    spy = subprocess.Popen([*spy_cmd, "--gil", "--rate", "500", "--format", "raw", "-o", str(raw)])
    try:
        time.sleep(1.0)
        measure_server(url, proc.pid, ids, n, clients)
    finally:
        spy.send_signal(2)  # SIGINT: py-spy writes what it sampled
        spy.wait(60)
        stop_service(proc)
    self_, total = Counter[str](), Counter[str]()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not any("uvicorn" in f or "starlette" in f or "fastapi" in f for f in frames):
            continue  # idle threads and the event loop's wait
        c = int(count)
        samples += c
        self_[frames[-1]] += c
        for f in set(frames):
            total[f] += c
    print(f"py-spy: {samples} samples in request handling; top self / top total (share of those samples)")
    for (f, c), (g, d) in zip(self_.most_common(40), total.most_common(40), strict=False):
        print(f"{c / samples:6.1%} {f[:90]:90s} | {d / samples:6.1%} {g[:90]}")


# -------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000, help="requests per kind per round")
    ap.add_argument("--rounds", type=int, default=3, help="fresh servers per service, alternating")
    ap.add_argument("--jobs", type=int, default=300, help="queued jobs of the measured tenant (and of another)")
    ap.add_argument("--blocks", type=int, default=30, help="blocks of the finished job's report")
    ap.add_argument("--clients", type=int, default=1, help="connections sending at once (threads)")
    ap.add_argument("--baseline", metavar="GIT_REF", help="also measure that commit's service, alternating")
    ap.add_argument("--profile", type=Path, metavar="DIR", help="also sample this tree's server with py-spy")
    add_out_option(ap)
    a = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pbs2p-api-cpu-") as tmp:
        root = Path(tmp)
        data = root / "data"
        ids = fill_store(data, a.jobs, a.blocks)
        services: list[tuple[str, Path | None]] = []
        if a.baseline:
            export_tree(a.baseline, root / "baseline")
            services.append((f"before: commit {git('rev-parse', '--short', a.baseline)}", root / "baseline"))
        services.append(("this tree", None))
        results: dict[str, list[dict[str, dict[str, float]]]] = {label: [] for label, _ in services}
        for r in range(a.rounds):
            for label, tree in services:
                proc, url = run_service(data, tree)
                try:
                    res = measure_server(url, proc.pid, ids, a.requests, a.clients)
                finally:
                    stop_service(proc)
                results[label].append(res)
                summary = ", ".join(f"{k} {v['cpu_ms']:.3f}" for k, v in res.items())
                print(f"round {r + 1}, {label}: CPU ms per request: {summary}", file=sys.stderr)
        if a.profile is not None:
            profile(data, ids, a.requests, a.clients, a.profile)
    report(a, results, time.perf_counter() - t_start)


def report(a: argparse.Namespace, results: dict[str, list[dict[str, dict[str, float]]]], took: float) -> None:
    labels = list(results)
    kinds = [*KINDS, *MIXES]

    def med(label: str, kind: str, what: str) -> float:
        return statistics.median(r[kind][what] for r in results[label])

    header = ["request", *[f"{lb}: API CPU ms per request (min-max)" for lb in labels], "wall ms per request"]
    rows = []
    for kind in kinds:
        cells = []
        for lb in labels:
            vals = [r[kind]["cpu_ms"] for r in results[lb]]
            cells.append(f"{statistics.median(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})")
        walls = " / ".join(f"{med(lb, kind, 'wall_ms'):.2f}" for lb in labels)
        rows.append([f"**{kind}**" if kind in MIXES else kind, *cells, walls])
    notes = [
        f"`pbs2p api` (uvicorn, SQLite store: {a.jobs} queued jobs of the tenant and {a.jobs} of another, one "
        f"RUNNING job, one SUCCEEDED with a {a.blocks}-block report), {a.requests} requests per kind after a "
        f"warm-up, from {a.clients} keep-alive http.client connection(s) at once, each sending one request after "
        f"the other; CPU: the API process's user + system time, the median of {a.rounds} rounds (a fresh server "
        "each, the services alternating). Wall ms: the same medians, in column order (wall per request over all "
        "connections). "
        "The mixes weigh the kinds as bench/service_load.py sends them (its POSTs as new jobs).",
        "",
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}, {code_version()}; {took:.0f} s in all; written "
        "by bench/api_cpu.py, not edited by hand.",
    ]
    name = "api_cpu" if a.clients == 1 else f"api_cpu_{a.clients}_clients"
    title = f"API CPU per request, read path ({a.clients} connection{'s' if a.clients > 1 else ''} at once)"
    write_table(name, title, header, rows, notes, a.out)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"{name}.json").write_text(json.dumps({"args": vars(a), "results": results}, default=str))


if __name__ == "__main__":
    main()
