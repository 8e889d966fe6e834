"""Scaling benchmark: the same job on Ray with 1 and 2 workers, sequential and independent propagation.

Starts one local Ray cluster (127.0.0.1, as many CPUs as the largest worker count) and runs every job as
`pbs2p compress --ray ADDRESS --workers N` in its own process; reports wall times, speedups, whether the
artifacts of different worker counts are identical, and the perplexity cost of independent propagation.
Then it times `compress_linear` alone for a few shapes (one thread, like one CPU worker), fits
t = a·(R·C² + C³) + b·R·C, and estimates 7B and 70B jobs from it (an estimate, not a measurement).
Writes bench/results/scaling.md. Usage:
  python bench/scaling.py [--calib-samples 32] [--seqlen 512] [--windows 40] [--workers 1 2] [--local]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import heapq
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, run_cli, write_table  # noqa: E402

# (blocks, [(out, in) of q, k, v, o, gate, up, down]): Llama-2-7B and Llama-3-70B (GQA: k, v are 1024 wide)
MODELS: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "7B": (32, [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]),
    "70B": (80, [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192), (28672, 8192), (8192, 28672)]),
}
MEASURED_SHAPES = [(192, 576), (576, 576), (1536, 576), (576, 1536), (1024, 1024), (2048, 1024), (1024, 2048)]
SMOLLM_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]


def file_hashes(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.iterdir()):
        if f.name != "timings.json":
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def linear_costs(shapes: list[tuple[int, int]], tokens: int = 4096) -> dict[tuple[int, int], float]:
    """Seconds of one compress_linear (default pbs2p 6:8) per (out, in) shape, one thread, random W and H."""
    import torch

    from pbs2p_core.config import CompressionConfig
    from pbs2p_core.solver import compress_linear

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
    import torch

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows for perplexity")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--local", action="store_true", help="also run each job without Ray (one process)")
    ap.add_argument("--name", default="scaling", help="results file name (bench/results/NAME.md)")
    a = ap.parse_args()

    from workers.distributed import init_ray

    address = init_ray(None, num_cpus=max(a.workers))
    calib = ["--calib-samples", str(a.calib_samples), "--seqlen", str(a.seqlen)]
    rows: list[list[str]] = []
    block_secs: dict[str, float] = {}
    ppl: dict[str, float] = {}
    same: dict[str, set[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("sequential", "independent"):
            base = None
            runs = [(f"ray, {w} worker(s)", ["--ray", address, "--workers", str(w)]) for w in a.workers]
            if a.local:
                runs.insert(0, ("local (no Ray)", []))
            for label, extra in runs:
                out = Path(tmp) / f"{mode}-{len(rows)}"
                args = ["compress", a.model, "-o", str(out), "--propagation", mode, *calib, *extra]
                if extra:
                    args += ["--job-id", f"bench-{mode}-{len(rows)}", "--checkpoint", f"{tmp}/ckpt"]
                report, wall, _ = run_cli(args)
                if extra and base is None:
                    base = wall
                speed = f"{base / wall:.2f}" if extra and base else ""
                same.setdefault(mode, set()).add(file_hashes(out))
                print(f"{mode} {label}: {wall:.1f} s", flush=True)
                if mode not in ppl:
                    res, _, _ = run_cli(["eval", str(out), "--seqlen", str(a.seqlen), "--windows", str(a.windows)])
                    ppl[mode] = res["ppl"]
                if extra and extra[-1] == "1":  # per block, 1 worker: forward, Hessians, linears, checkpoint
                    block_secs[mode] = sum(b["seconds"] for b in report["blocks"]) / len(report["blocks"])
                rows.append([label, mode, f"{wall:.0f}", f"{report['seconds']:.0f}", speed, f"{ppl[mode]:.2f}"])
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
    write_table(a.name, "Scaling: workers and propagation modes", header, rows, notes)


if __name__ == "__main__":
    main()
