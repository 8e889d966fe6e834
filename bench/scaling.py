"""Scaling benchmark: the same job on Ray with 1 and 2 workers, sequential and independent propagation.

Starts one local Ray cluster (127.0.0.1, as many CPUs as the largest worker count) and runs every job as
`pbs2p compress --ray ADDRESS --workers N` in its own process; reports wall times, speedups, whether the
artifacts of different worker counts are identical, and the perplexity cost of independent propagation.
Then it times `compress_linear` alone for a few shapes (one thread, like one CPU worker), fits
t = a·(R·C² + C³) + b·R·C, and estimates 7B and 70B jobs from it (an estimate, not a measurement).
Writes bench/results/scaling.md (or --out DIR/NAME.md). `--dry-run` prints the `pbs2p` command lines, checked
against the command line's parser and config, and starts nothing. Usage:
  python bench/scaling.py [--calib-samples 32] [--seqlen 512] [--windows 40] [--workers 1 2] [--local] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_out_option, dry_run, machine, run_cli, write_table  # noqa: E402
from pbs2p.core.config import CompressionConfig  # noqa: E402
from pbs2p.core.solver import compress_linear  # noqa: E402
from pbs2p.testing.artifacts import file_hashes  # noqa: E402

# (blocks, [(out, in) of q, k, v, o, gate, up, down]): Llama-2-7B and Llama-3-70B (GQA: k, v are 1024 wide)
MODELS: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "7B": (32, [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]),
    "70B": (80, [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192), (28672, 8192), (8192, 28672)]),
}
MEASURED_SHAPES = [(192, 576), (576, 576), (1536, 576), (576, 1536), (1024, 1024), (2048, 1024), (1024, 2048)]
SMOLLM_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def linear_costs(shapes: list[tuple[int, int]], tokens: int = 4096) -> dict[tuple[int, int], float]:
    """Seconds of one compress_linear (default pbs2p 6:8) per (out, in) shape, one thread, random W and H."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    cfg = CompressionConfig()
    out = {}
    for R, C in shapes:
        X = torch.randn(tokens, C, generator=g)
        H = 2 * X.T @ X / tokens
        W = torch.randn(R, C, generator=g) * 0.02
        t = time.perf_counter()
        compress_linear(W, H, 6, cfg)
        out[(R, C)] = time.perf_counter() - t
        print(f"compress_linear {R}x{C}: {out[(R, C)]:.2f} s", flush=True)
    return out


def fit(costs: dict[tuple[int, int], float]) -> tuple[float, float]:
    """Least squares (a, b) of t = a·(R·C² + C³) + b·R·C (GEMM-like and elementwise parts)."""
    A = torch.tensor([[R * C * C + C**3, R * C] for R, C in costs], dtype=torch.float64)
    t = torch.tensor(list(costs.values()), dtype=torch.float64)
    scale = A.abs().max(0).values
    sol = torch.linalg.lstsq(A / scale, t[:, None]).solution[:, 0] / scale
    return float(sol[0].clamp_min(0)), float(sol[1].clamp_min(0))


def model_cost(a: float, b: float, R: int, C: int) -> float:
    return a * (R * C * C + C**3) + b * R * C


def makespan(times: list[float], workers: int) -> float:
    """Longest-first greedy schedule of independent tasks on `workers` identical workers."""
    loads = [0.0] * workers
    for t in sorted(times, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + t)
    return max(loads)


def estimate(a: float, b: float, overhead_per_param: float, workers: int) -> dict[str, tuple[float, float]]:
    """Hours (sequential, independent) per model: per block the forward/Hessian part (scaled by the block's
    parameters) plus the linears spread over the workers; independent: all linears of all blocks spread."""
    out = {}
    for name, (L, shapes) in MODELS.items():
        ts = [model_cost(a, b, R, C) for R, C in shapes]
        serial = overhead_per_param * sum(R * C for R, C in shapes)
        seq = L * (serial + makespan(ts, workers))
        ind = max(L * serial, makespan(ts * L, workers) + serial)
        out[name] = (seq / 3600, ind / 3600)
    return out


class Job(NamedTuple):
    mode: str  # propagation
    label: str
    workers: int | None  # None: local, no Ray
    out: Path
    args: list[str]  # of `pbs2p`


def jobs(a: argparse.Namespace, address: str, tmp: Path) -> list[Job]:
    """Every job, in the order they run: per propagation mode, (local,) then each worker count on Ray."""
    calib = ["--calib-samples", str(a.calib_samples), "--seqlen", str(a.seqlen)]
    out: list[Job] = []
    for mode in ("sequential", "independent"):
        counts: list[int | None] = [*([None] if a.local else []), *a.workers]
        for w in counts:
            k = len(out)
            path = tmp / f"{mode}-{k}"
            args = ["compress", a.model, "-o", str(path), "--propagation", mode, *calib]
            if w is not None:
                args += ["--ray", address, "--workers", str(w)]
                args += ["--job-id", f"bench-{mode}-{k}", "--checkpoint", f"{tmp}/ckpt"]
            out.append(Job(mode, "local (no Ray)" if w is None else f"ray, {w} worker(s)", w, path, args))
    return out


def eval_args(out: Path, a: argparse.Namespace) -> list[str]:
    return ["eval", str(out), "--seqlen", str(a.seqlen), "--windows", str(a.windows)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows for perplexity")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--local", action="store_true", help="also run each job without Ray (one process)")
    ap.add_argument("--name", default="scaling", help="results file name (bench/results/NAME.md)")
    add_out_option(ap)
    ap.add_argument("--dry-run", action="store_true", help="print and check the pbs2p command lines; start nothing")
    a = ap.parse_args()
    if a.dry_run:
        planned = jobs(a, "127.0.0.1:6379", Path("TMP"))  # Ray's address is known once the cluster is up
        firsts: dict[str, Path] = {}  # each mode's first artifact is evaluated
        for j in planned:
            firsts.setdefault(j.mode, j.out)
        dry_run([j.args for j in planned] + [eval_args(out, a) for out in firsts.values()])
        return

    from pbs2p.workers.distributed import init_ray  # ray (an extra): not imported for --help or --dry-run

    address = init_ray(None, num_cpus=max(a.workers))
    rows: list[list[str]] = []
    block_secs: dict[str, float] = {}
    ppl: dict[str, float] = {}
    same: dict[str, set[frozenset[tuple[str, str]]]] = {}
    base: dict[str, float] = {}  # per mode: the wall time of its first Ray job
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs(a, address, Path(tmp)):
            report, wall, _ = run_cli(job.args)
            if job.workers is not None:
                base.setdefault(job.mode, wall)
            speed = f"{base[job.mode] / wall:.2f}" if job.workers is not None else ""
            same.setdefault(job.mode, set()).add(frozenset(file_hashes(job.out).items()))
            print(f"{job.mode} {job.label}: {wall:.1f} s", flush=True)
            if job.mode not in ppl:
                res, _, _ = run_cli(eval_args(job.out, a))
                ppl[job.mode] = res["ppl"]
            if job.workers == 1:  # per block, 1 worker: forward, Hessians, linears, checkpoint
                block_secs[job.mode] = sum(b["seconds"] for b in report["blocks"]) / len(report["blocks"])
            rows.append([job.label, job.mode, f"{wall:.0f}", f"{report['seconds']:.0f}", speed, f"{ppl[job.mode]:.2f}"])
    costs = linear_costs(MEASURED_SHAPES)
    ca, cb = fit(costs)
    # forward + Hessians + checkpoint per block = 1-worker block time minus its linears, per block parameter
    linears_135m = sum(model_cost(ca, cb, R, C) for R, C in SMOLLM_BLOCK)
    overhead = max(block_secs.get("sequential", 0.0) - linears_135m, 0.0) / sum(R * C for R, C in SMOLLM_BLOCK)
    est_rows = []
    for w in (1, 2, 8, 64):
        est = estimate(ca, cb, overhead, w)
        est_rows.append(f"| {w} | " + " | ".join(f"{s:.1f} / {i:.1f}" for s, i in est.values()) + " |")
    identical = ", ".join(f"{m}: {'yes' if len(h) == 1 else 'NO'}" for m, h in same.items())
    notes = [
        f"Model {a.model}, calibration {a.calib_samples} x {a.seqlen} tokens, pbs2p 6:8; one local Ray cluster "
        f"with {max(a.workers)} CPUs, one CPU (one torch thread) per worker. 'wall' is the whole `pbs2p compress` "
        "process (imports, calibration text, joining Ray, workers starting); 'job' is the report's time. "
        "'local' runs in one process with torch's default threads (every core).",
        f"Perplexity on held-out Wikipedia ({a.windows} windows of {a.seqlen}): the cost of independent "
        f"propagation is {ppl.get('independent', float('nan')) - ppl.get('sequential', float('nan')):+.2f}.",
        f"Artifacts identical across worker counts (and local): {identical}. Forward + Hessians + checkpoint "
        f"per block (1 worker, sequential): {block_secs.get('sequential', 0.0) - linears_135m:.2f} s of "
        f"{block_secs.get('sequential', 0.0):.2f} s.",
        "",
        "Per-linear cost, compress_linear alone, one thread: "
        + ", ".join(f"{R}x{C} {t:.2f} s" for (R, C), t in costs.items())
        + f"; fit t = {ca:.3g}·(R·C² + C³) + {cb:.3g}·R·C.",
        "",
        "Estimate (not measured): hours for a 7B (32 blocks) and a 70B (80 blocks) Llama with this per-linear "
        "cost (one CPU thread per worker), sequential / independent propagation, forward + Hessian part scaled "
        "by block parameters from the 1-worker run. GPU workers: use the costs of bench/gpu_check.py instead.",
        "",
        "| workers | 7B (seq / ind) | 70B (seq / ind) |",
        "|---|---|---|",
        *est_rows,
        "",
        f"Measured {datetime.date.today()} on {machine()}; written by bench/scaling.py, not edited by hand.",
    ]
    header = ["run", "propagation", "wall (s)", "job (s)", "speedup vs 1 worker", "ppl"]
    write_table(a.name, "Scaling: workers and propagation modes", header, rows, notes, a.out)


if __name__ == "__main__":
    main()
