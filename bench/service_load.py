"""Service load benchmark (issue 5): while one job runs, many concurrent clients poll and submit over loopback.

Starts `pbs2p serve` (service/cli/demo.py: start_service; the API and its worker process) on a temporary data
directory with one worker CPU for Ray
(PBS2P_RAY_NUM_CPUS=1, one torch thread) and one running job at a time, submits one long job (a seeded tiny
Llama with many blocks) and waits until it compresses. Then, for each `--think` value, `--clients` asyncio
clients (aiohttp by default, one keep-alive connection each, spread over `--procs` processes) loop for
`--seconds`, each choosing at random (seeded): GET /v1/jobs/{id} (the running job or one it submitted),
GET /v1/jobs?limit=20, or POST /v1/jobs (a small job under a new Idempotency-Key; some POSTs replay an earlier
key and must get the same job back; a few send one new key twice at once and must get one 201 and one replay of
the same job). `--think` is a client's mean pause between requests (0: closed loop, the service's saturation).

Every response's status and latency is recorded per route; a non-2xx, an exception or a wrong body is an error.
Afterwards: no lost or duplicated job (every id of a 201 is listed exactly once, paging with the cursor, and
the list holds nothing else but the long job), replays returned their job; the long job's state; then the
queued jobs and the long one are cancelled and the service stops. Also reported: the service's own latency
histogram (/metrics, from its middleware), CPU used by the service process, the client processes and the whole
machine, and the clients' event-loop lag (a saturated client inflates the latencies it measures). The clients
use aiohttp because httpx.AsyncClient needs several times more CPU per request (`--client httpx` to compare).

With `--baseline REF` the same is measured first for the service of commit REF (its `pbs2p serve`, from
`git archive`, run with its package first on PYTHONPATH) and for this tree's `serve --one-process` (the job driven
in the API's process), each on a fresh store with its own long job, then for this tree's `serve`: before and after
side by side in one run, on one machine.

Writes bench/results/service_load.md, .json and .png (p99 per route and throughput; or --out DIR/NAME.*). Usage:
  python bench/service_load.py [--seconds 30] [--clients 200] [--think 0 1 5] [--procs 1] [--long-layers 160]
                               [--baseline GIT_REF] [--out DIR]

Only light modules are imported at the top: with --procs > 1 the client processes (spawned) import this module
again and must be up within the second before a phase starts; torch, the tiny models' builders and the
service's modules (seconds to import) are imported where the main process uses them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, add_out_option, code_env, machine, write_table  # noqa: E402

GET_JOB, LIST = "GET /v1/jobs/{id}", "GET /v1/jobs?limit=20"
POST_NEW, POST_REPLAY, POST_RACE = "POST /v1/jobs", "POST (replay)", "POST (race pair)"
ROUTES = (GET_JOB, LIST, POST_NEW, POST_REPLAY, POST_RACE)
SERVER_ROUTE = {GET_JOB: "/v1/jobs/{job_id}", LIST: "/v1/jobs"}  # middleware labels (POST shares /v1/jobs)
P_POST, P_REPLAY, P_RACE, P_LIST = 0.04, 0.01, 0.005, 0.15
P_GET = 1 - P_POST - P_REPLAY - P_RACE - P_LIST  # polls one job
AIM_MS = 50.0


# -------------------------------------------------------------------------------------------- set-up


def build_inputs(root: Path, long_layers: int) -> tuple[Path, Path, Path]:
    """(long model dir, small model dir, calibration text) under `root`, from the tests' seeded tiny builders."""
    import torch  # not at the top: see the module's docstring

    from pbs2p.testing.tiny import make_model, save_tokenizer, write_text

    torch.set_num_threads(1)
    long_dir, small_dir = root / "long", root / "small"
    make_model(long_dir, layers=long_layers, hidden=128)
    save_tokenizer(long_dir)
    make_model(small_dir, layers=1, hidden=64)
    save_tokenizer(small_dir)
    return long_dir, small_dir, write_text(root / "calib.txt", docs=40, words=100)


def job_body(model: Path, calib: Path, name: str, long: bool) -> dict[str, Any]:
    cfg: dict[str, Any] = {"pattern": "6:8", "calib": str(calib), "seed": 0}
    if long:
        cfg.update(calib_samples=8, seqlen=64, batch_size=8, block_size=32, salient_columns=2)
    else:
        cfg.update(calib_samples=4, seqlen=32, batch_size=4)
    return {"model": str(model), "config": cfg, "name": name}


def wait_compressing(http: httpx.Client, job_id: str, timeout: float) -> dict[str, Any]:
    """The job once it is RUNNING and has compressed a block (Ray and its worker are up); raises otherwise."""
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["state"] != "QUEUED" and job["state"] != "RUNNING":
            raise SystemExit(f"the long job ended {job['state']} before the load: {job.get('error')}")
        p = job["progress"]
        if job["state"] == "RUNNING" and p.get("stage") == "compress" and (p.get("block") or 0) >= 1:
            return job
        time.sleep(0.5)
    raise SystemExit(f"the long job did not start compressing within {timeout:.0f} s (last: {job.get('progress')})")


# -------------------------------------------------------------------------------------------- the load


Sender = Callable[[str, str, dict[str, Any]], Awaitable[tuple[int, Mapping[str, str], bytes]]]


async def _client(idx: int, send: Sender, ctx: dict[str, Any], rec: dict[str, Any], start: float, end: float) -> None:
    rng = random.Random(ctx["seed"] * 1_000_003 + ctx["phase"] * 10_007 + idx)
    own: list[str] = []
    sent: list[tuple[str, dict[str, Any], str]] = []  # (idempotency key, body, job id) of this client's jobs
    think = ctx["think"]
    if think:  # spread the clients' first requests over one pause instead of a burst at `start`
        await asyncio.sleep(max(0.0, start - time.time()) + rng.uniform(0, think))
    else:
        await asyncio.sleep(max(0.0, start - time.time()))
    n = 0
    while time.time() < end:
        r = rng.random()
        want = ""
        if r < P_POST + P_REPLAY + P_RACE:
            if P_POST <= r < P_POST + P_REPLAY and sent:
                route = POST_REPLAY
                ikey, body, want = rng.choice(sent)
            else:
                route = POST_RACE if r >= P_POST + P_REPLAY else POST_NEW
                ikey = f"load-{ctx['phase']}-{idx}-{n}"
                body = job_body(Path(ctx["small"]), Path(ctx["calib"]), f"load {ikey}", long=False)
                n += 1
            method, path, kw = "POST", "/v1/jobs", {"json": body, "headers": {"Idempotency-Key": ikey}}
        elif r < P_POST + P_REPLAY + P_RACE + P_LIST:
            route, method, path, kw = LIST, "GET", "/v1/jobs", {"params": {"limit": "20"}}
        else:
            want = own[rng.randrange(len(own))] if own and rng.random() < 0.5 else ctx["long_id"]
            route, method, path, kw = GET_JOB, "GET", f"/v1/jobs/{want}", {}
        t = time.perf_counter()
        try:
            if route == POST_RACE:  # the same new key twice at once: one 201, one replay of the same job
                pair = await asyncio.gather(send(method, path, kw), send(method, path, kw))
                ms = (time.perf_counter() - t) * 1000
                problem, job_id = _check_race(pair)
            else:
                status, headers, raw = await send(method, path, kw)
                ms = (time.perf_counter() - t) * 1000
                problem, job_id = _check(route, status, headers, raw, want)
            if route in (POST_NEW, POST_RACE) and problem is None:
                own.append(job_id)
                sent.append((ikey, body, job_id))
                rec["created"].append((ikey, job_id))
            if route == POST_REPLAY:
                rec["replays"] += 1
        except Exception as exc:  # every failure is counted, never raised
            ms = (time.perf_counter() - t) * 1000
            problem = f"{type(exc).__name__}: {exc}"
        rec["lat"][route].append(ms)
        rec["last"] = max(rec["last"], time.time())
        if problem is not None:
            rec["errors"][route] += 1
            if problem.startswith("replay"):
                rec["replay_mismatch"] += 1
            if len(rec["samples"]) < 10:
                rec["samples"].append(f"{route}: {problem}")
        if think:
            await asyncio.sleep(think * rng.uniform(0.5, 1.5))


def _check(route: str, status: int, headers: Mapping[str, str], raw: bytes, want: str) -> tuple[str | None, str]:
    """(None when the response is what the route must answer, else what is wrong; the job id in the body)."""
    expected = {POST_NEW: 201, POST_REPLAY: 200}.get(route, 200)
    if status != expected:
        return f"HTTP {status} (expected {expected}): {raw[:200]!r}", ""
    body = json.loads(raw)
    if route == LIST:
        return (None if "jobs" in body else "no 'jobs' in the list"), ""
    got = body.get("id") or ""
    if route == POST_REPLAY:
        if headers.get("Idempotent-Replayed") != "true" or got != want:
            return f"replay returned {got} (replayed header {headers.get('Idempotent-Replayed')}), want {want}", got
    elif route == GET_JOB and got != want:
        return f"asked for {want}, got {got}", got
    return None, got


def _check_race(pair: list[tuple[int, Mapping[str, str], bytes]]) -> tuple[str | None, str]:
    """Two concurrent POSTs with one new key: exactly one 201, the other a replay (200) of the same job."""
    (s1, h1, b1), (s2, h2, b2) = sorted(pair, key=lambda x: x[0], reverse=True)
    if (s1, s2) != (201, 200):
        return f"HTTP {s1} and {s2} (expected 201 and 200): {b1[:120]!r} {b2[:120]!r}", ""
    first, again = json.loads(b1)["id"], json.loads(b2)["id"]
    if first != again or h2.get("Idempotent-Replayed") != "true":
        return f"replay in a race returned {again}, the 201 {first}", first
    return None, first


async def _lag_monitor(rec: dict[str, Any], end: float, step: float = 0.05) -> None:
    """How late this process's event loop wakes up: a saturated client adds this to every latency it measures."""
    while time.time() < end:
        t = time.perf_counter()
        await asyncio.sleep(step)
        rec["lag"].append((time.perf_counter() - t - step) * 1000)


async def _load(ctx: dict[str, Any], indices: list[int]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "lat": {r: [] for r in ROUTES},
        "errors": Counter(),
        "samples": [],
        "created": [],
        "replays": 0,
        "replay_mismatch": 0,
        "lag": [],
        "last": 0.0,
    }
    n = len(indices)
    headers = {"Authorization": f"Bearer {ctx['key']}"}
    start, end = ctx["start"], ctx["start"] + ctx["seconds"]
    cpu = time.process_time()
    if ctx["client"] == "httpx":  # one pool of n connections
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        async with httpx.AsyncClient(base_url=ctx["url"], headers=headers, limits=limits, timeout=30.0) as hx:

            async def send_httpx(method: str, path: str, kw: dict[str, Any]) -> tuple[int, Mapping[str, str], bytes]:
                resp = await hx.request(method, path, **kw)
                return resp.status_code, resp.headers, resp.content

            await asyncio.gather(
                _lag_monitor(rec, end), *[_client(i, send_httpx, ctx, rec, start, end) for i in indices]
            )
    else:
        conn = aiohttp.TCPConnector(limit=n, limit_per_host=n)
        timeout = aiohttp.ClientTimeout(total=30.0)
        async with aiohttp.ClientSession(ctx["url"], headers=headers, connector=conn, timeout=timeout) as ah:

            async def send_aiohttp(method: str, path: str, kw: dict[str, Any]) -> tuple[int, Mapping[str, str], bytes]:
                async with ah.request(method, path, **kw) as resp:
                    return resp.status, resp.headers, await resp.read()

            await asyncio.gather(
                _lag_monitor(rec, end), *[_client(i, send_aiohttp, ctx, rec, start, end) for i in indices]
            )
    rec["cpu_s"] = time.process_time() - cpu
    rec["errors"] = dict(rec["errors"])
    return rec


def run_clients(ctx: dict[str, Any], indices: list[int]) -> dict[str, Any]:
    """One process's share of the clients (the entry point of each client process)."""
    return asyncio.run(_load(ctx, indices))


def run_phase(ctx: dict[str, Any], clients: int, procs: int) -> dict[str, Any]:
    """All clients for one phase, merged over the processes."""
    shares = [list(range(p, clients, procs)) for p in range(procs)]
    if procs == 1:
        parts = [run_clients(ctx, shares[0])]
    else:
        with ProcessPoolExecutor(procs, mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(run_clients, [ctx] * procs, shares))
    merged: dict[str, Any] = {"lat": {r: [] for r in ROUTES}, "errors": Counter(), "samples": [], "created": []}
    for p in parts:
        for r in ROUTES:
            merged["lat"][r] += p["lat"][r]
        merged["errors"].update(p["errors"])
        merged["samples"] += p["samples"]
        merged["created"] += p["created"]
    merged["replays"] = sum(p["replays"] for p in parts)
    merged["replay_mismatch"] = sum(p["replay_mismatch"] for p in parts)
    merged["lag"] = sorted(x for p in parts for x in p["lag"])
    merged["client_cpu_s"] = sum(p["cpu_s"] for p in parts)
    merged["elapsed"] = max(p["last"] for p in parts) - ctx["start"]
    return merged


# -------------------------------------------------------------------------------------------- numbers


def pct(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (nan when empty)."""
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def server_histogram(http: httpx.Client) -> dict[str, dict[float, float]]:
    """The service's own latency histogram: route -> {bucket upper bound (s): cumulative count}."""
    out: dict[str, dict[float, float]] = {}
    for fam in text_string_to_metric_families(http.get("/metrics").text):
        if fam.name == "pbs2p_http_request_seconds":
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    out.setdefault(s.labels["route"], {})[float(s.labels["le"])] = s.value
    return out


def server_quantiles(before: dict[str, dict[float, float]], after: dict[str, dict[float, float]], route: str) -> str:
    """'p50 <= X ms, p99 <= Y ms, Z% under 50 ms' of the requests between two scrapes (bucket upper bounds)."""
    a, b = after.get(route, {}), before.get(route, {})
    delta = {le: a[le] - b.get(le, 0.0) for le in sorted(a)}
    total = delta.get(float("inf"), 0.0)
    if not total:
        return "no requests"

    def bound(q: float) -> str:
        le = next(le for le, n in delta.items() if n >= q * total)
        return "> 10 s" if math.isinf(le) else f"<= {le * 1000:g} ms"

    under = delta.get(AIM_MS / 1000, float("nan")) / total * 100
    return f"p50 {bound(0.5)}, p99 {bound(0.99)}, {under:.1f}% under {AIM_MS:g} ms"


def cpu_snapshot(pid: int) -> tuple[float, float, float]:
    """(service process CPU s, its whole process tree's CPU s incl. Ray, machine busy CPU s)."""

    def used(p: psutil.Process) -> float:
        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return 0.0

    svc = psutil.Process(pid)
    tree = used(svc) + sum(used(c) for c in svc.children(recursive=True))
    m = psutil.cpu_times()
    return used(svc), tree, m.user + m.system + m.nice + getattr(m, "irq", 0.0) + getattr(m, "softirq", 0.0)


def cpu_rates(pid: int, work: Callable[[], Any]) -> tuple[list[float], float, Any]:
    """([service process, its tree, machine] in cores used on average while `work` ran, its seconds, what
    `work` returned)."""
    c0, t0 = cpu_snapshot(pid), time.perf_counter()
    out = work()
    c1, t1 = cpu_snapshot(pid), time.perf_counter()
    return [(y - x) / (t1 - t0) for x, y in zip(c0, c1, strict=True)], t1 - t0, out


# -------------------------------------------------------------------------------------------- checks


def all_jobs(http: httpx.Client, state: str | None = None) -> list[dict[str, Any]]:
    """Every job of the tenant, newest first, paging with the cursor."""
    jobs: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 200}
        if cursor:
            params["cursor"] = cursor
        if state:
            params["state"] = state
        page = http.get("/v1/jobs", params=params).raise_for_status().json()
        jobs += page["jobs"]
        cursor = page["next_cursor"]
        if not cursor:
            return jobs


def verify(http: httpx.Client, long_id: str, created: list[tuple[str, str]]) -> dict[str, int]:
    listed = [j["id"] for j in all_jobs(http)]
    counts = Counter(listed)
    ids = [job_id for _, job_id in created]
    made = set(ids)
    return {
        "created (201)": len(ids),
        "created ids given twice": len(ids) - len(made),
        "idempotency keys with two jobs": len(created) - len({k for k, _ in created}),
        "listed": len(listed),
        "lost (created, not listed)": len(made - set(listed)),
        "duplicated (listed twice)": sum(1 for n in counts.values() if n > 1),
        "unexpected (listed, never created)": len(set(listed) - made - {long_id}),
        "listed - (distinct created + 1)": len(listed) - (len(made) + 1),
    }


def cancel_all(http: httpx.Client, long_id: str, timeout: float = 120.0) -> tuple[int, str]:
    """Cancel the queued jobs, then the long one; (queued jobs cancelled, the long job's final state). A job that
    finished meanwhile (409: the long one, or a queued one the worker took and ran) is left as it is."""
    queued = [j["id"] for j in all_jobs(http, "QUEUED")]
    for job_id in [*queued, long_id]:
        resp = http.post(f"/v1/jobs/{job_id}/cancel")
        if resp.status_code != 409:
            resp.raise_for_status()
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = http.get(f"/v1/jobs/{long_id}").raise_for_status().json()["state"]
        if state in ("SUCCEEDED", "FAILED", "CANCELLED"):
            break
        time.sleep(0.5)
    return len(queued), state


# -------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=30.0, help="length of each load phase")
    ap.add_argument("--clients", type=int, default=200, help="concurrent clients")
    ap.add_argument(
        "--think",
        type=float,
        nargs="+",
        default=[0.0, 1.0, 5.0],
        help="mean pause (s) between a client's requests; one phase per value (0: closed loop)",
    )
    ap.add_argument("--procs", type=int, default=1, help="client processes the clients are spread over")
    ap.add_argument(
        "--client",
        choices=("aiohttp", "httpx"),
        default="aiohttp",
        help="HTTP client library of the load (httpx.AsyncClient costs far more CPU per request)",
    )
    ap.add_argument("--long-layers", type=int, default=160, help="blocks of the long job's model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--baseline",
        default=None,
        metavar="GIT_REF",
        help="also measure the service of this commit (its `pbs2p serve`, from `git archive`) and this tree's "
        "`serve --one-process` (the job driven in the API process), before this tree's `serve`, side by side",
    )
    ap.add_argument("--name", default="service_load", help="results file name (bench/results/NAME.md)")
    add_out_option(ap)
    a = ap.parse_args()

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pbs2p-load-") as tmp:
        root = Path(tmp)
        long_dir, small_dir, calib = build_inputs(root, a.long_layers)
        variants: list[tuple[str, Path | None, list[str]]] = []
        if a.baseline:
            tree = root / "baseline"
            export_tree(a.baseline, tree)
            short = git("rev-parse", "--short", a.baseline) or a.baseline
            name = f"commit {short}" if a.baseline.startswith(short) else f"{a.baseline} ({short})"
            variants.append((f"before: {name}, serve", tree, ["serve"]))
            variants.append(("this tree: serve --one-process", None, ["serve", "--one-process"]))
        variants.append(("this tree: serve (job in a worker process)", None, ["serve"]))
        runs = []
        for label, tree, command in variants:
            print(f"--- {label}", file=sys.stderr)
            runs.append((label, *measure(a, root, label, tree, command, long_dir, small_dir, calib)))
    report(a, runs, time.perf_counter() - t0)


def export_tree(ref: str, dest: Path) -> None:
    """The files of commit `ref` in `dest` (`git archive`: no checkout, nothing registered in the repository)."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)


def measure(
    a: argparse.Namespace,
    root: Path,
    label: str,
    tree: Path | None,
    command: list[str],
    long_dir: Path,
    small_dir: Path,
    calib: Path,
) -> tuple[list[dict[str, Any]], dict[str, int], dict[str, Any], int, str]:
    """One service (`command` of the code in `tree`, or this tree's) under every phase: (phases, checks, the long
    job after the load, queued jobs cancelled, the long job's final state)."""
    # not at the top: see the module's docstring
    from pbs2p.service.cli.demo import start_service, stop_service
    from pbs2p.service.jobstore import JobStore
    from pbs2p.service.settings import Settings

    data = root / f"service-{len(list(root.glob('service-*')))}"
    store = JobStore(Settings(data_dir=data).db_url)
    key = store.create_key("load")
    store.close()
    env = {
        "PBS2P_MODEL_ROOTS": str(root),
        "PBS2P_MAX_RUNNING_JOBS": "1",
        "PBS2P_RAY_NUM_CPUS": "1",
        "PBS2P_CACHE_DIR": str(root / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    env.update(code_env(tree))  # the other commit's package first on the path (this tree's stays installed)
    with contextlib.chdir(tree or ROOT):  # Ray's workers too start there
        proc, url = start_service(data, env, 120.0, *command)
    print(f"service up at {url} (log {data / 'service.log'})", file=sys.stderr)
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60.0)
    try:
        resp = http.post("/v1/jobs", json=job_body(long_dir, calib, "long", long=True))
        if resp.status_code != 201:
            raise SystemExit(f"the long job was refused: HTTP {resp.status_code} {resp.text}")
        long_id = resp.json()["id"]
        job = wait_compressing(http, long_id, timeout=300.0)
        print(f"long job {long_id} RUNNING, {job['progress']}", file=sys.stderr)
        idle = cpu_rates(proc.pid, functools.partial(time.sleep, 5.0))[0]  # the service, its job, no client
        phases = []
        for i, think in enumerate(a.think):
            ctx = {
                "url": url,
                "key": key,
                "long_id": long_id,
                "small": str(small_dir),
                "calib": str(calib),
                "seed": a.seed,
                "phase": i,
                "think": think,
                "seconds": a.seconds,
                "start": time.time() + 1.0,
                "client": a.client,
            }
            hist0 = server_histogram(http)
            cpu, wall, res = cpu_rates(proc.pid, functools.partial(run_phase, ctx, a.clients, a.procs))
            hist1 = server_histogram(http)
            res["cpu"], res["cpu_wall"], res["idle_cpu"] = cpu, wall, idle
            res["loadavg"] = os.getloadavg()[0]
            res["server"] = {r: server_quantiles(hist0, hist1, s) for r, s in SERVER_ROUTE.items()}
            res["think"] = think
            res["long_job"] = http.get(f"/v1/jobs/{long_id}").json()
            phases.append(res)
            p = res["long_job"]["progress"]
            print(
                f"{label}, phase think={think:g}: {sum(len(v) for v in res['lat'].values())} requests in "
                f"{res['elapsed']:.1f} s, long job {res['long_job']['state']} block {p.get('block')}/"
                f"{p.get('blocks')}",
                file=sys.stderr,
            )
        created = [c for ph in phases for c in ph["created"]]
        checks = verify(http, long_id, created)
        long_after = phases[-1]["long_job"]
        cancelled, long_final = cancel_all(http, long_id)
    finally:
        http.close()
        stop_service(proc)
    return phases, checks, long_after, cancelled, long_final


def git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.rstrip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def code_version() -> str:
    """The commit measured, and the service's files changed since it (the working tree is what ran)."""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = [line[3:] for line in git("status", "--porcelain", "--", "service", "workers", "pbs2p_core").splitlines()]
    return f"commit {head}" + (f" with uncommitted changes in {', '.join(changed)}" if changed else "")


def ms(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.1f}"


def label_of(think: float) -> str:
    return "closed loop" if not think else f"think {think:g} s"


def report(a: argparse.Namespace, runs: list[tuple[Any, ...]], took: float) -> None:
    rows: list[list[str]] = []
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    cpu_rows: list[str] = []
    summary: list[dict[str, Any]] = []
    all_ok = True
    for label, phases, checks, long_after, cancelled, long_final in runs:
        for ph in phases:
            phase = label_of(ph["think"])
            for route in ROUTES:
                lat = sorted(ph["lat"][route])
                errs = ph["errors"].get(route, 0)
                q = {k: pct(lat, v) for k, v in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))}
                mx = lat[-1] if lat else float("nan")
                rate = len(lat) / ph["elapsed"]
                rows.append(
                    [label, phase, route, str(len(lat)), str(errs)]
                    + [ms(q[k]) for k in ("p50", "p95", "p99")]
                    + [ms(mx), f"{rate:.1f}"]
                )
                records.append(
                    dict(
                        service=label,
                        phase=phase,
                        think_s=ph["think"],
                        route=route,
                        requests=len(lat),
                        errors=errs,
                        max_ms=mx,
                        req_per_s=rate,
                        **{f"{k}_ms": v for k, v in q.items()},
                    )
                )
            total = sum(len(v) for v in ph["lat"].values())
            rows.append([label, phase, "all", str(total), str(sum(ph["errors"].values())), "", "", "", "",
                         f"{total / ph['elapsed']:.1f}"])  # fmt: skip
            svc, tree, mach = ph["cpu"]
            per_request = (svc - ph["idle_cpu"][0]) * ph["cpu_wall"] / total * 1000  # above the idle service's own
            lag = ph["lag"]
            cpu_rows.append(
                f"| {label} | {phase} | {ph['server'][GET_JOB]} | {ph['server'][LIST]} | "
                f"{svc:.2f}; {per_request:.2f} ms | {tree:.2f} cores | "
                f"{ph['client_cpu_s'] / ph['elapsed']:.2f}; {ph['client_cpu_s'] / total * 1000:.1f} ms | "
                f"{mach:.2f} of {os.cpu_count()} cores ({ph['loadavg']:.1f}) | "
                f"{pct(lag, 0.99):.0f} / {lag[-1] if lag else float('nan'):.0f} ms |"
            )
            summary.append(dict(service=label, think=ph["think"], req_per_s=total / ph["elapsed"],
                                cpu_ms=per_request, p99_get=pct(sorted(ph["lat"][GET_JOB]), 0.99),
                                p99_list=pct(sorted(ph["lat"][LIST]), 0.99)))  # fmt: skip
        errors = sum(sum(ph["errors"].values()) for ph in phases)
        mismatched = sum(ph["replay_mismatch"] for ph in phases)
        replays = sum(ph["replays"] for ph in phases)
        ok = (
            errors == 0
            and mismatched == 0
            and all(checks[k] == 0 for k in checks if k not in ("created (201)", "listed"))
            and long_after["state"] == "RUNNING"
        )
        all_ok = all_ok and ok
        prog = long_after["progress"]
        notes.append(
            f"**{label}: checks {'PASS' if ok else 'FAIL'}** — errors {errors}, lost "
            f"{checks['lost (created, not listed)']}, duplicated {checks['duplicated (listed twice)']}, replays "
            f"{replays} of which returned another job {mismatched}; created {checks['created (201)']}, listed "
            f"{checks['listed']}. Long job ({a.long_layers} blocks, one Ray worker CPU) after the load: "
            f"{long_after['state']}, block {prog.get('block')}/{prog.get('blocks')}; then {cancelled} queued jobs "
            f"and it were cancelled (its final state: {long_final})."
        )
        samples = [x for ph in phases for x in ph["samples"]][:5]
        if samples:
            notes.append(f"First errors ({label}): " + "; ".join(samples))
    notes += [
        "",
        "Aims (issue 20) at 200 clients: p99 of GET one job < 50 ms and of the list < 100 ms at 1 s think time, "
        "closed-loop throughput >= 3x 183 req/s, service CPU <= 1.5 ms per request:",
        "",
        "| service | phase | req/s | p99 GET one job | p99 list | service CPU per request |",
        "|---|---|---|---|---|---|",
        *[
            f"| {x['service']} | {label_of(x['think'])} | {x['req_per_s']:.0f} | {ms(x['p99_get'])} ms | "
            f"{ms(x['p99_list'])} ms | {x['cpu_ms']:.2f} ms |"
            for x in summary
        ],
        "",
        f"{a.clients} clients for {a.seconds:g} s per phase in {a.procs} client process(es), one keep-alive "
        f"connection each over loopback ({a.client}); mix per request: {P_GET:.1%} GET one job (half the running "
        f"one, half one of the client's), {P_LIST:.0%} list 20, {P_POST:.0%} submit a new job, {P_REPLAY:.0%} "
        f"replay an earlier Idempotency-Key, {P_RACE:.1%} submit a new job twice at once under one key (a race "
        "pair: one 201 and one replay of the same job expected). Latency: client side, send to body read, ms (a "
        "race pair: both answers). Each service in turn on a fresh SQLite (WAL) store, uvicorn, one API process, "
        "PBS2P_MAX_RUNNING_JOBS=1, PBS2P_RAY_NUM_CPUS=1, OMP_NUM_THREADS=1, with its own long job running.",
        "",
        "| service | phase | service's own latency, GET one job | service's own latency, list | CPU: API process "
        "(cores; ms per request above idle) | CPU: API + worker + Ray | CPU: clients (cores; ms per request) "
        "| CPU: machine (load average) | client loop lag p99 / max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, phases, *_ in runs:
        idle = phases[0]["idle_cpu"]
        notes.append(f"| {label} | idle (the job, no client) | | | {idle[0]:.2f} | {idle[1]:.2f} cores | | "
                     f"{idle[2]:.2f} of {os.cpu_count()} cores | |")  # fmt: skip
    notes += cpu_rows
    notes += [
        "",
        "The service's own latency comes from its Prometheus histogram (middleware, request in to response "
        "out; upper bucket bounds), so it leaves out the HTTP parsing and the wait for the event loop. CPU is "
        "cores used on average during the phase; the machine is shared with other work. Plot: "
        f"{a.name}.png (p99 per route and throughput, per service and phase).",
        "",
        f"Measured {datetime.date.today()} on {machine()}, {code_version()}; {took:.0f} s in all; written by "
        "bench/service_load.py, not edited by hand.",
    ]
    header = ["service", "phase", "route", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "max ms", "req/s"]
    title = f"Service under load: {a.clients} clients polling and submitting while a job runs"
    write_table(a.name, title, header, rows, notes, a.out)
    plot(a.out / f"{a.name}.png", records, summary)
    out = {
        "date": str(datetime.date.today()),
        "machine": machine(),
        "code": code_version(),
        "args": {k: v for k, v in vars(a).items() if k != "out"},  # what was measured, not where it was written
        "routes": records,
        "summary": summary,
        "pass": all_ok,
        "services": [
            {
                "service": label,
                "checks": checks,
                "long_job": {
                    "after_load": long_after["state"],
                    "progress": long_after["progress"],
                    "final": long_final,
                },  # fmt: skip
                "phases": [
                    {
                        "think_s": ph["think"],
                        "elapsed_s": ph["elapsed"],
                        "server": ph["server"],
                        "errors": ph["errors"],
                        "cpu_cores": dict(zip(("service", "service_and_ray", "machine"), ph["cpu"], strict=True)),
                        "idle_cpu_cores": dict(
                            zip(("service", "service_and_ray", "machine"), ph["idle_cpu"], strict=True)
                        ),
                        "loadavg_1min": ph["loadavg"],
                        "client_cpu_cores": ph["client_cpu_s"] / ph["elapsed"],
                        "client_lag_ms": {
                            "p50": pct(ph["lag"], 0.5),
                            "p99": pct(ph["lag"], 0.99),
                            "max": ph["lag"][-1] if ph["lag"] else None,
                        },
                        "error_samples": ph["samples"],
                    }
                    for ph in phases
                ],
            }
            for label, phases, checks, long_after, _, long_final in runs
        ],
    }
    (a.out / f"{a.name}.json").write_text(json.dumps(out, indent=1))


def plot(path: Path, records: list[dict[str, Any]], summary: list[dict[str, Any]]) -> None:
    """p99 of GET one job and of the list (log scale, the aims dashed), and throughput, per service and phase."""
    import matplotlib  # the dev extra; only for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    services = list(dict.fromkeys(x["service"] for x in summary))
    phases = list(dict.fromkeys(x["think"] for x in summary))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / max(1, len(services))
    for k, (ax, route, aim) in enumerate(((axes[0], GET_JOB, AIM_MS), (axes[1], LIST, 100.0), (axes[2], "", 0.0))):
        for i, svc in enumerate(services):
            if route:
                ys = [next((r["p99_ms"] for r in records if r["service"] == svc and r["think_s"] == t
                            and r["route"] == route), float("nan")) for t in phases]  # fmt: skip
            else:
                ys = [next(x["req_per_s"] for x in summary if x["service"] == svc and x["think"] == t) for t in phases]
            ax.bar([j + i * width for j in range(len(phases))], ys, width, label=svc)
        ax.set_xticks([j + width * (len(services) - 1) / 2 for j in range(len(phases))], [label_of(t) for t in phases])
        if route:
            ax.set_yscale("log")
            ax.axhline(aim, color="k", linestyle="--", linewidth=1)
            ax.set_ylabel("p99 latency, ms (client side)")
            ax.set_title(f"p99 of {route} (aim {aim:g} ms dashed)")
        else:
            ax.set_ylabel("requests per second (all routes)")
            ax.set_title("throughput")
        if k == 2:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
