"""Scaling benchmark: one job on Ray with 1, 2, ... workers, sequential and independent propagation.

Starts one local Ray cluster (127.0.0.1, as many CPUs as the largest worker count) and runs every job as
`pbs2p compress --ray ADDRESS --workers N` in its own process, one CPU (one torch thread) per worker; reports wall
times, speedups, whether the artifacts of all worker counts are identical, the perplexity cost of independent
propagation, and per block the schedule's steps (forward, Hessian reduce, solve, transfer, checkpoint wait) with
the workers' busy and idle time, so the serial remainder is named.
Then it times the schedule's pieces alone (one thread: `solve_rows` on row chunks, the Hessian factorisation) and
estimates 7B and 70B jobs on 1, 2, 8 and 64 workers from them and from the measured forward cost (an estimate, not
a measurement). Writes bench/results/scaling.md and scaling.png (speedup against workers), or --out DIR/NAME.*.
`--dry-run` prints the `pbs2p` command lines, checked against the command line's parser and config; `--replot MD`
draws the plot again from a results table (after a run on a machine without matplotlib). Usage:
  python bench/scaling.py [--calib-samples 32] [--seqlen 512] [--windows 40] [--workers 1 2] [--modes sequential]
                          [--local] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import heapq
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_out_option, dry_run, machine, run_cli, write_table  # noqa: E402
from pbs2p.core.config import CompressionConfig  # noqa: E402
from pbs2p.core.hessian import inverse_cholesky  # noqa: E402
from pbs2p.core.solver import prepare_linear, solve_rows  # noqa: E402
from pbs2p.testing.artifacts import file_hashes  # noqa: E402

# (blocks, [(out, in) of q, k, v, o, gate, up, down]): Llama-2-7B and Llama-3-70B (GQA: k, v are 1024 wide)
MODELS: dict[str, tuple[int, list[tuple[int, int]]]] = {
    "7B": (32, [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]),
    "70B": (80, [(8192, 8192), (1024, 8192), (1024, 8192), (8192, 8192), (28672, 8192), (28672, 8192), (8192, 28672)]),
}
SMOLLM_BLOCK = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
CHUNK_WIDTHS = [576, 1024, 1536, 2048]  # in_features of the timed row chunks
FACTOR_WIDTHS = [576, 1024, 1536, 2048]  # of the timed Hessian factorisations
EST_WINDOWS, EST_SEQLEN = 128, 2048  # the estimate's calibration (the paper's)
PHASES = ("forward", "reduce", "solve", "transfer", "checkpoint", "busy", "idle")


def piece_costs(cfg: CompressionConfig) -> tuple[dict[int, float], dict[int, float]]:
    """Seconds, one thread, random W and H: one row chunk (`row_chunk` rows) of `solve_rows` per input width,
    and one `inverse_cholesky` + `prepare_linear` per width."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    chunks, factors = {}, {}
    for C in sorted(set(CHUNK_WIDTHS) | set(FACTOR_WIDTHS)):
        X = torch.randn(4096, C, generator=g)
        H = 2 * X.T @ X / 4096
        W = torch.randn(cfg.row_chunk, C, generator=g) * 0.02
        t = time.perf_counter()
        prep = prepare_linear(W, H, cfg, inverse_cholesky(H, cfg.damping))
        factors[C] = time.perf_counter() - t
        t = time.perf_counter()
        solve_rows(W, prep, 6, cfg)
        chunks[C] = time.perf_counter() - t
        print(f"width {C}: factor {factors[C]:.2f} s, chunk of {cfg.row_chunk} rows {chunks[C]:.2f} s", flush=True)
    return chunks, factors


def fit(xs: list[float], ys: list[float], powers: tuple[int, int]) -> tuple[float, float]:
    """Least squares (a, b) of y = a·x^p + b·x^q, both >= 0."""
    A = torch.tensor([[x ** powers[0], x ** powers[1]] for x in xs], dtype=torch.float64)
    t = torch.tensor(ys, dtype=torch.float64)
    scale = A.abs().max(0).values
    sol = torch.linalg.lstsq(A / scale, t[:, None]).solution[:, 0] / scale
    return float(sol[0].clamp_min(0)), float(sol[1].clamp_min(0))


def makespan(times: list[float], workers: int) -> float:
    """Longest-first greedy schedule of independent tasks on `workers` identical workers."""
    loads = [0.0] * workers
    for t in sorted(times, reverse=True):
        heapq.heappush(loads, heapq.heappop(loads) + t)
    return max(loads)


class Costs(NamedTuple):
    chunk: tuple[float, float]  # seconds of one row chunk: a·C² + b·C
    factor: tuple[float, float]  # seconds of one group's factorisation: a·C³ + b·C²
    forward: float  # seconds per (block parameter x calibration token), forward + Hessians, one worker
    transfer: float  # seconds per block parameter of joining results on every worker (and the rest)


def block_estimate(shapes: list[tuple[int, int]], c: Costs, workers: int, row_chunk: int, batch: int) -> float:
    """Seconds of one block on `workers` workers in the schedule of workers/distributed/coordinator.py: the
    forward over ceil(S / W) shards per worker, the factorisations (the widest one is what the solves wait for),
    every row chunk spread over the workers, and the join, which every worker does in full."""
    params = sum(R * C for R, C in shapes)
    shards = -(-EST_WINDOWS // batch)
    forward = c.forward * params * EST_WINDOWS * EST_SEQLEN * (-(-shards // workers) / shards)
    widths = sorted({C for _, C in shapes})  # one factorisation per distinct input (q/k/v, gate/up share one)
    factor = [c.factor[0] * C**3 + c.factor[1] * C**2 for C in widths]
    chunks = [c.chunk[0] * C**2 + c.chunk[1] * C for R, C in shapes for _ in range(-(-R // row_chunk))]
    solve = max(makespan(factor, workers), (sum(factor) + sum(chunks)) / workers, max(factor) + min(chunks))
    return forward + solve + c.transfer * params


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
    for mode in a.modes:
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


def breakdown(out: Path) -> dict[str, float]:
    """Mean seconds per block of each schedule step, from the artifact's timings file (Ray jobs only)."""
    t = json.loads((out / "timings.json").read_text())
    phases = [p for p in t.get("block_phases") or [] if p]
    if not phases:
        return {}
    mean = {k: sum(p.get(k, 0.0) for p in phases) / len(phases) for k in PHASES}
    mean["block"] = sum(t["block_seconds"]) / len(t["block_seconds"])
    return mean


def speedups_of_table(md: str) -> tuple[dict[str, dict[int, float]], dict[str, dict[int, float]]]:
    """(measured, estimated) speedups as `plot` takes them, read back from a results table this script wrote."""
    measured: dict[str, dict[int, float]] = {}
    est: dict[str, dict[int, float]] = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ray, ") and len(cells) == 6:  # | ray, W worker(s) | mode | wall | job | speedup | ppl |
            workers = int(cells[0].removeprefix("ray, ").split()[0])
            measured.setdefault(cells[1], {})[workers] = float(cells[4])
        if line.startswith("Estimated speedup over 1 worker: "):
            for part in line.removeprefix("Estimated speedup over 1 worker: ").rstrip(".").split("; "):
                name, _, pts = part.partition(": ")
                est[name] = {int(w): float(x.rstrip("x")) for w, x in (p.split(" -> ") for p in pts.split(", "))}
    if not measured:
        raise SystemExit("no measured rows ('| ray, N worker(s) | ...') in that table")
    return measured, est


def plot(path: Path, measured: dict[str, dict[int, float]], est: dict[str, dict[int, float]]) -> None:
    import matplotlib  # the dev extra; only for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, pts in measured.items():
        ws = sorted(pts)
        ax.plot(ws, [pts[w] for w in ws], "o-", label=f"measured, {mode} (SmolLM2-135M)")
    for name, pts in est.items():
        ws = sorted(pts)
        ax.plot(ws, [pts[w] for w in ws], "--", label=f"estimate, {name} sequential")
    top = max([max(p) for p in measured.values() if p] + [max(p) for p in est.values()] + [2])
    ax.plot([1, top], [1, top], ":", color="grey", label="linear")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("workers (one CPU thread each)")
    ax.set_ylabel("speedup over 1 worker")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="evaluation windows for perplexity")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["sequential", "independent"], choices=["sequential", "independent"])
    ap.add_argument("--local", action="store_true", help="also run each job without Ray (one process)")
    ap.add_argument("--no-eval", action="store_true", help="skip the perplexity of each mode")
    ap.add_argument("--name", default="scaling", help="results file name (bench/results/NAME.md)")
    add_out_option(ap)
    ap.add_argument("--dry-run", action="store_true", help="print and check the pbs2p command lines; start nothing")
    ap.add_argument("--replot", type=Path, metavar="MD", help="draw the plot again from a results table; run nothing")
    a = ap.parse_args()
    if a.replot is not None:
        plot(a.replot.with_suffix(".png"), *speedups_of_table(a.replot.read_text()))
        return
    if a.dry_run:
        planned = jobs(a, "127.0.0.1:6379", Path("TMP"))  # Ray's address is known once the cluster is up
        firsts: dict[str, Path] = {}  # each mode's first artifact is evaluated
        for j in planned:
            firsts.setdefault(j.mode, j.out)
        dry_run([j.args for j in planned] + ([] if a.no_eval else [eval_args(out, a) for out in firsts.values()]))
        return

    from pbs2p.workers.distributed import init_ray  # ray (an extra): not imported for --help or --dry-run

    address = init_ray(None, num_cpus=max(a.workers))
    cfg = CompressionConfig()
    rows: list[list[str]] = []
    phase_rows: list[list[str]] = []
    one: dict[str, dict[str, float]] = {}  # per mode: the 1-worker breakdown
    ppl: dict[str, float] = {}
    same: dict[str, set[frozenset[tuple[str, str]]]] = {}
    base: dict[str, float] = {}  # per mode: the job time of its first Ray job
    speedups: dict[str, dict[int, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs(a, address, Path(tmp)):
            report, wall, _ = run_cli(job.args)
            if job.workers is not None:
                base.setdefault(job.mode, report["seconds"])
                speedups.setdefault(job.mode, {})[job.workers] = base[job.mode] / report["seconds"]
            speed = f"{base[job.mode] / report['seconds']:.2f}" if job.workers is not None else ""
            same.setdefault(job.mode, set()).add(frozenset(file_hashes(job.out).items()))
            print(f"{job.mode} {job.label}: {wall:.1f} s", flush=True)
            if job.mode not in ppl and not a.no_eval:
                res, _, _ = run_cli(eval_args(job.out, a))
                ppl[job.mode] = res["ppl"]
            mean = breakdown(job.out) if job.workers is not None else {}
            if mean:
                if job.workers == 1:
                    one[job.mode] = mean
                cells = [f"{mean[k]:.2f}" for k in PHASES]
                phase_rows.append([job.label, job.mode, f"{mean['block']:.2f}", *cells])
            p = f"{ppl[job.mode]:.2f}" if job.mode in ppl else "-"
            rows.append([job.label, job.mode, f"{wall:.0f}", f"{report['seconds']:.0f}", speed, p])
    chunk_s, factor_s = piece_costs(cfg)
    ch = fit([float(c) for c in chunk_s], list(chunk_s.values()), (2, 1))
    fa = fit([float(c) for c in factor_s], list(factor_s.values()), (3, 2))
    params_135m = sum(R * C for R, C in SMOLLM_BLOCK)
    ref = one.get("sequential", {})
    tokens = a.calib_samples * a.seqlen
    fwd = ref.get("forward", 0.0) / (params_135m * tokens)
    transfer = (ref.get("transfer", 0.0) + ref.get("checkpoint", 0.0)) / params_135m
    costs = Costs(ch, fa, fwd, transfer)
    est_rows, est_speed = [], {}
    for w in (1, 2, 8, 64):
        hours = {}
        for name, (L, shapes) in MODELS.items():
            hours[name] = L * block_estimate(shapes, costs, w, cfg.row_chunk, cfg.batch_size) / 3600
            est_speed.setdefault(name, {})[w] = hours[name]
        est_rows.append(f"| {w} | " + " | ".join(f"{h:.1f}" for h in hours.values()) + " |")
    for name, pts in est_speed.items():
        est_speed[name] = {w: pts[1] / h for w, h in pts.items()}
    identical = ", ".join(f"{m}: {'yes' if len(h) == 1 else 'NO'}" for m, h in same.items())
    cost_ppl = ppl.get("independent", float("nan")) - ppl.get("sequential", float("nan"))
    notes = [
        f"Model {a.model}, calibration {a.calib_samples} x {a.seqlen} tokens (shards of {cfg.batch_size} windows), "
        f"pbs2p 6:8, row chunks of {cfg.row_chunk}; one local Ray cluster with {max(a.workers)} CPUs, one CPU (one "
        "torch thread) per worker. 'wall' is the whole `pbs2p compress` process (imports, calibration text, joining "
        "Ray, workers starting); 'job' is the report's time, and the speedup is of the job time. 'local' runs in one "
        "process with torch's default threads (every core).",
        f"Perplexity on held-out Wikipedia ({a.windows} windows of {a.seqlen}): the cost of independent "
        f"propagation is {cost_ppl:+.2f}."
        if ppl
        else "Perplexity not measured (--no-eval).",
        f"Artifacts identical across worker counts (and local): {identical}.",
        "",
        "Per block, mean seconds: wall time of each step as the coordinator sees it (forward: the block's FP pass "
        "with Hessian hooks and the compressed pass over the shards; reduce: until the last input group's H is "
        "summed and factorised, solves already running; solve: the remaining row chunks; transfer: every worker "
        "joining the chunks; checkpoint: waiting for the previous block's checkpoint, written alongside), and the "
        "workers' summed busy time and idle time (workers x block wall - busy).",
        "",
        "| run | propagation | block (s) | " + " | ".join(PHASES) + " |",
        "|---|---|---|" + "---|" * len(PHASES),
        *["| " + " | ".join(r) + " |" for r in phase_rows],
        "",
        "Pieces alone, one thread: row chunk of "
        + ", ".join(f"{cfg.row_chunk}x{C} {t:.2f} s" for C, t in chunk_s.items())
        + "; factorisation "
        + ", ".join(f"{C} {t:.2f} s" for C, t in factor_s.items())
        + f". Forward + Hessians {fwd:.3g} s per parameter-token (1 worker, sequential).",
        "",
        f"Estimate (not measured): hours for a 7B (32 blocks) and a 70B (80 blocks) Llama, {EST_WINDOWS} x "
        f"{EST_SEQLEN} calibration tokens, sequential propagation, these CPU costs (one thread per worker); the "
        "forward splits over shards (one shard per worker at most), the factorisations and the join do not. "
        "GPU workers: use the costs of bench/gpu_check.py instead.",
        "",
        "| workers | 7B (h) | 70B (h) |",
        "|---|---|---|",
        *est_rows,
        "",
        "Estimated speedup over 1 worker: "
        + "; ".join(f"{n}: " + ", ".join(f"{w} -> {s:.1f}x" for w, s in pts.items()) for n, pts in est_speed.items())
        + ".",
        "",
        f"Measured {datetime.date.today()} on {machine()}; written by bench/scaling.py, not edited by hand.",
    ]
    header = ["run", "propagation", "wall (s)", "job (s)", "speedup vs 1 worker", "ppl"]
    path = write_table(a.name, "Scaling: workers and propagation modes", header, rows, notes, a.out)
    plot(path.with_suffix(".png"), speedups, est_speed)


if __name__ == "__main__":
    main()
