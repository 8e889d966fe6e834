"""Quality benchmark: every method and ablation on the real model, same calibration, held-out perplexity.

Writes bench/results/quality.md (and .json; or --out DIR/NAME.md). Each compression runs in its own process,
so its wall time and peak memory (max RSS) are its own. `--dry-run` prints the `pbs2p` command lines, each
checked against the command line's parser and config, and runs nothing. Usage:
  python bench/quality.py [--calib-samples 32] [--only NAME ...] [--seeds 0 1 2] [--append] [--out DIR] [--dry-run]
  python bench/quality.py --name quality_curve --merge TABLE ... --seeds 0 1 2 --plot   (the curve, from tables)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_out_option, dry_run, machine, run_cli, write_table  # noqa: E402

MODEL = "smollm2-135m"

LEAN = ["--scale-layout", "lean", "--block-size", "512", "--salient-columns", "16"]
GPTQ = ["--method", "gptq", "--gptq-bits"]
# pbs2p rows as measured before block tuning became the default (2026-12-06): tuning off
PBS2P = ["--method", "pbs2p", "--block-tune-steps", "0"]
# block tuning with the defaults' values (24 steps, lr 1e-2), spelled out so the rows keep their meaning
TUNED = ["--method", "pbs2p", "--block-tune-steps", "24", "--block-tune-lr", "1e-2"]
CFS_ERROR = [*PBS2P, "--allocation", "cfs", "--cfs-score", "error"]
# optional variants of ALGORITHM.md, measured with `--variants` (not the default table)
VARIANTS: dict[str, list[str]] = {
    "pbs2p 6:8 (default)": [*PBS2P, "--pattern", "6:8"],
    "+ ARB-X (alpha, mu against r H_bb r^T)": [*PBS2P, "--arb-variant", "arb-x"],
    "+ true sequential (a pass per group of linears)": [*PBS2P, "--true-sequential"],
    "+ fixed split (an OBS prune set pruned in tau steps)": [*PBS2P, "--spbo-mode", "fixed"],
    "+ shared scales (salient columns share alpha, mu)": [*PBS2P, "--scale-layout", "shared"],
    "+ per-column feedback inside a block": [*PBS2P, "--column-feedback"],
}

# name -> extra CLI options; all share the calibration windows (same seed, samples, seqlen)
CONFIGS: dict[str, list[str]] = {
    "arb (dense 1-bit)": ["--method", "arb"],
    "prune-binarize 6:8": ["--method", "prune-binarize", "--pattern", "6:8"],
    "prune-binarize 4:8": ["--method", "prune-binarize", "--pattern", "4:8"],
    # the baselines as BiLLM / STBLLM do it: salient columns in every column block (the default spreads the
    # same budget over the linear)
    "arb, salient columns per block": ["--method", "arb", "--salient-allocation", "block"],
    "prune-binarize 6:8, salient columns per block": ["--method", "prune-binarize", "--salient-allocation", "block"],
    "pbs2p 6:8": [*PBS2P, "--pattern", "6:8"],
    "pbs2p 5:8": [*PBS2P, "--pattern", "5:8"],
    "pbs2p 4:8": [*PBS2P, "--pattern", "4:8"],
    "pbs2p 6:8, tau = 1 (ablation)": [*PBS2P, "--pattern", "6:8", "--spbo-steps", "1"],
    "pbs2p 6:8, no scale refit (ablation)": [*PBS2P, "--no-scale-refit"],
    "pbs2p 6:8, fixed split (ablation)": [*PBS2P, "--spbo-mode", "fixed"],
    "pbs2p 6:8, CFS 1/cos (the paper's coarse stage)": [*PBS2P, "--allocation", "cfs"],
    "pbs2p 6:8, CFS by block error": CFS_ERROR,
    "pbs2p 6:8, salient columns per block (ablation)": [*PBS2P, "--salient-allocation", "block"],
    "pbs2p 6:8, CFS by block error, salient columns per block": [*CFS_ERROR, "--salient-allocation", "block"],
    "pbs2p 6:8, 16 salient columns per 128": [*PBS2P, "--salient-columns", "16"],
    # block-wise reconstruction: each block's scales tuned to the FP block's outputs (workers/blocktune.py)
    "pbs2p 6:8, block tuning 24 steps": TUNED,
    "pbs2p 6:8, lean scales / 512 cols, block tuning 24 steps": [*TUNED, *LEAN],
    # the quality-against-bits curve at the default (tuned): other patterns and salient budgets
    "pbs2p 4:8, block tuning 24 steps": [*TUNED, "--pattern", "4:8"],
    "pbs2p 5:8, block tuning 24 steps": [*TUNED, "--pattern", "5:8"],
    "pbs2p 7:8, block tuning 24 steps": [*TUNED, "--pattern", "7:8"],
    "pbs2p 6:8, 8 salient columns per 128, block tuning 24 steps": [*TUNED, "--salient-columns", "8"],
    "pbs2p 4:8, lean scales / 512 cols, block tuning 24 steps": [*TUNED, "--pattern", "4:8", *LEAN],
    "pbs2p 6:8, 8 salient columns per 128 (previous default)": [*PBS2P, "--salient-columns", "8"],
    # cheaper scales: alpha, mu per row per 512 columns, salient residual alpha only
    "pbs2p 6:8, lean scales / 512 cols": [*PBS2P, "--pattern", "6:8", *LEAN],
    # the GPTQ baseline (integer codes, per-group min-max scales and zero points), the settings
    "gptq 4-bit g128": [*GPTQ, "4", "--gptq-group-size", "128", "--no-gptq-act-order"],
    "gptq 3-bit g128 act-order": [*GPTQ, "3", "--gptq-group-size", "128", "--gptq-act-order"],
    "gptq 3-bit g128": [*GPTQ, "3", "--gptq-group-size", "128", "--no-gptq-act-order"],
    "gptq 2-bit g128 act-order": [*GPTQ, "2", "--gptq-group-size", "128", "--gptq-act-order"],
    "gptq 2-bit g64 act-order": [*GPTQ, "2", "--gptq-group-size", "64", "--gptq-act-order"],
}


def compress_args(opts: list[str], out: str, common: list[str], seed: int) -> list[str]:
    return ["compress", MODEL, "-o", out, *opts, *common, "--seed", str(seed)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40, help="held-out evaluation windows")
    ap.add_argument("--only", nargs="*", help="substrings of config names to run ('=NAME': exactly that one)")
    ap.add_argument("--name", default="quality", help="results file name")
    ap.add_argument("--extra", type=shlex.split, default=[], help="extra CLI options for every compression, one string")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="calibration seeds: each row runs with each")
    ap.add_argument("--append", action="store_true", help="keep the other rows of an earlier run of this table")
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="NAME",
        help="run nothing: add these tables' rows (of --seeds and --only) to this one",
    )
    ap.add_argument("--variants", action="store_true", help="run the optional variants instead of the methods")
    ap.add_argument("--plot", action="store_true", help="also draw perplexity against true bits as NAME.png")
    ap.add_argument("--sweep-calib", nargs="*", type=int, help="instead: pbs2p 6:8 with these calibration sizes")
    add_out_option(ap)
    ap.add_argument("--dry-run", action="store_true", help="print and check the pbs2p command lines; run nothing")
    a = ap.parse_args()
    if a.sweep_calib:
        return sweep_calib(a)
    common = ["--calib-samples", str(a.calib_samples), "--seqlen", str(a.seqlen), *a.extra]
    ev = ["--seqlen", str(a.seqlen), "--windows", str(a.windows)]
    setting = dict(calib_samples=a.calib_samples, seqlen=a.seqlen, windows=a.windows, extra=a.extra)
    table = VARIANTS if a.variants else CONFIGS

    def wanted(name: str) -> bool:
        return not a.only or any(name == s[1:] if s.startswith("=") else s in name for s in a.only)

    runs = [(name, opts, seed) for name, opts in table.items() for seed in a.seeds if wanted(name)]
    if a.merge:
        runs = []  # run nothing: the rows are this table's and those of the tables merged in
    if a.dry_run:
        cmds = [["eval", MODEL, *ev]]
        for _, opts, seed in runs:
            cmds += [compress_args(opts, "OUT", common, seed), ["eval", "OUT", *ev], ["inspect", "OUT"]]
        dry_run(cmds)
        return
    fp, _, _ = run_cli(["eval", MODEL, *ev])
    records = earlier(a.out, a.name, setting, {(n, s) for n, _, s in runs}) if a.append or a.merge else []
    for other in a.merge or []:  # rows measured in another run (another worktree, in parallel) of this table
        have = {(r["name"], r["seed"]) for r in records}
        records += [
            r
            for r in earlier(a.out, other, setting, set())
            if (r["name"], r["seed"]) not in have and r["seed"] in a.seeds and wanted(r["name"])
        ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, opts, seed in runs:
            out = str(Path(tmp) / "out")
            rep, secs, rss = run_cli(compress_args(opts, out, common, seed))
            q, _, _ = run_cli(["eval", out, *ev])
            info, _, _ = run_cli(["inspect", out])
            bits = info["total"]  # counted from the bytes the artifact holds
            rec = dict(name=name, seed=seed, ppl=q["ppl"], fp_ppl=fp["ppl"], layer_error=rep["mean_rel_error"],
                       paper_bits=bits["paper_bits"], true_bits=bits["true_bits"], seconds=secs, peak_mib=rss,
                       n_per_block=[b["n_keep"] for b in rep["blocks"]], config=rep["config"],
                       measured=str(datetime.date.today()), **setting)  # fmt: skip
            records.append(rec)
            print(name, seed, f"ppl {q['ppl']:.1f} layer error {rep['mean_rel_error']:.4f}", flush=True)
    order = {name: i for i, name in enumerate(table)}
    records.sort(key=lambda r: (order.get(r["name"], len(order)), r["seed"]))
    assert all(math.isfinite(r["ppl"]) for r in records)
    seeds = sorted({r["seed"] for r in records})
    rows = [["fp32 baseline", f"{fp['ppl']:.2f}", "1.00", "0", "32", "32", "-", "-"]]
    for r in records:
        label = r["name"] if len(seeds) == 1 else f"{r['name']}, seed {r['seed']}"
        rows.append([label, f"{r['ppl']:.1f}", f"{r['ppl'] / fp['ppl']:.1f}", f"{r['layer_error']:.4f}",
                     f"{r['paper_bits']:.3f}", f"{r['true_bits']:.3f}", f"{r['seconds']:.0f}",
                     f"{r['peak_mib']:.0f}"])  # fmt: skip
    header = ["method", "wiki ppl", "ratio to FP", "layer error", "paper bits", "true bits", "time (s)", "peak MiB"]
    notes = [
        f"Model {MODEL} (fp32, dequantized Q4_1 = the full-precision baseline). Calibration: {a.calib_samples} "
        f"windows x {a.seqlen} tokens, seed {', '.join(map(str, seeds))}, Wikipedia calibration split. "
        f"Perplexity: first {a.windows} "
        f"held-out windows x {a.seqlen} tokens ({fp['tokens']} predicted tokens, no BOS).",
        "Layer error: mean over compressed linears of ||WX - W'X||^2 / ||WX||^2 on their calibration inputs.",
        "True bits: bytes of the compressed linears in the artifact x 8 / their weights (`pbs2p inspect`: signs, "
        "residual plane, N:M mask as rank code, scales, salient indices); paper bits: sign planes only. "
        "Time and peak memory: the compress process.",
        f"Measured {', '.join(sorted({r.get('measured', '?') for r in records}))} on {machine()}; written by "
        "bench/quality.py, not edited by hand.",
    ]
    if any(r["config"]["method"] == "gptq" for r in records):
        notes.insert(
            3,
            "GPTQ rows (`--method gptq`): b-bit codes, an fp16 scale and a b-bit zero point per row per group of "
            "input columns, with act-order each column's group index; paper bits = b.",
        )
    if len(seeds) > 1:
        notes.insert(0, seed_summary(records))
    write_table(a.name, "Quality on the real model", header, rows, notes, a.out)
    (a.out / f"{a.name}.json").write_text(json.dumps(records, indent=1))
    if a.plot:
        plot_curve(records, fp["ppl"], a.out / f"{a.name}.png")


def earlier(results: Path, name: str, setting: dict, redo: set[tuple[str, int]]) -> list[dict]:
    """--append: the rows of an earlier run of this table in `results` (same calibration and evaluation), minus
    those redone."""
    path = results / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else []
    for r in old:
        if any(r.get(k, setting[k]) != v for k, v in setting.items()):
            raise SystemExit(f"{path} was measured with other settings than {setting}; run without --append")
    return [{"seed": 0, **r} for r in old if (r["name"], r.get("seed", 0)) not in redo]


def seed_summary(records: list[dict]) -> str:
    """Per config measured at several seeds: geometric mean perplexity (and range), mean layer error."""
    parts = [
        f"{p['name']} ({p['seeds']} seeds): geometric mean ppl {p['ppl']:.0f} ({p['lo']:.0f}-{p['hi']:.0f}), "
        f"layer error {p['layer_error']:.4f}"
        for p in curve_points(records)
        if p["seeds"] >= 2
    ]
    return "Over calibration seeds: " + "; ".join(parts) + "."


def curve_points(records: list[dict]) -> list[dict]:
    """One point per config: mean true bits and layer error, geometric mean perplexity with its range over seeds,
    and whether it is on the frontier (no other point has both fewer bits and lower perplexity)."""
    points = []
    for name in dict.fromkeys(r["name"] for r in records):
        rs = [r for r in records if r["name"] == name]
        ppl = [r["ppl"] for r in rs]
        points.append(dict(
            name=name, method=rs[0]["config"]["method"], seeds=len(rs),
            bits=sum(r["true_bits"] for r in rs) / len(rs),
            layer_error=sum(r["layer_error"] for r in rs) / len(rs),
            ppl=math.exp(sum(map(math.log, ppl)) / len(ppl)), lo=min(ppl), hi=max(ppl),
        ))  # fmt: skip
    for p in points:
        p["frontier"] = not any(q["bits"] <= p["bits"] and q["ppl"] < p["ppl"] for q in points if q is not p)
    return points


def plot_curve(records: list[dict], fp_ppl: float, path: Path) -> None:
    """Perplexity (log) against true bits, a point per config (bars: the range over seeds), the frontier joined."""
    import matplotlib  # the dev extra; only for the picture

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = curve_points(records)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for method, marker in (("pbs2p", "o"), ("prune-binarize", "s"), ("arb", "^"), ("gptq", "D")):
        ps = [p for p in points if p["method"] == method]
        if not ps:
            continue
        err = [[p["ppl"] - p["lo"] for p in ps], [p["hi"] - p["ppl"] for p in ps]]
        ax.errorbar([p["bits"] for p in ps], [p["ppl"] for p in ps], yerr=err, fmt=marker, capsize=3, label=method)
    front = sorted((p for p in points if p["frontier"]), key=lambda p: p["bits"])
    ax.plot([p["bits"] for p in front], [p["ppl"] for p in front], "k--", lw=0.8, label="frontier")
    for p in front:
        ax.annotate(f"{p['name']} ({p['seeds']} seed{'s' if p['seeds'] > 1 else ''})", (p["bits"], p["ppl"]),
                    fontsize=6, xytext=(4, 4), textcoords="offset points")  # fmt: skip
    ax.axhline(fp_ppl, color="grey", lw=0.8, label=f"full precision ({fp_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("true bits per weight (counted from the artifact's bytes)")
    ax.set_ylabel("wiki perplexity (geometric mean over seeds)")
    ax.set_title(f"{MODEL}: quality against true bits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def sweep_calib(a: argparse.Namespace) -> None:
    """How perplexity falls with more calibration data (pbs2p 6:8, defaults otherwise)."""
    ev = ["--seqlen", str(a.seqlen), "--windows", str(a.windows)]

    def compress(n: int, out: str) -> list[str]:
        return ["compress", MODEL, "-o", out, "--calib-samples", str(n), "--seqlen", str(a.seqlen), *a.extra]

    if a.dry_run:
        cmds = [["eval", MODEL, *ev]]
        for n in a.sweep_calib:
            cmds += [compress(n, "OUT"), ["eval", "OUT", *ev]]
        dry_run(cmds)
        return
    fp, _, _ = run_cli(["eval", MODEL, *ev])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in a.sweep_calib:
            out = str(Path(tmp) / "out")
            rep, secs, _ = run_cli(compress(n, out))
            q, _, _ = run_cli(["eval", out, *ev])
            rows.append([str(n), str(n * a.seqlen), f"{q['ppl']:.1f}", f"{rep['mean_rel_error']:.4f}", f"{secs:.0f}"])
            print(rows[-1], flush=True)
    notes = [
        f"pbs2p 6:8 (defaults) on {MODEL}; FP perplexity {fp['ppl']:.2f} on the same {a.windows} held-out windows "
        f"x {a.seqlen} tokens. Layer error is measured on each run's own calibration inputs.",
        f"Measured {datetime.date.today()} on {machine()}; written by bench/quality.py --sweep-calib.",
    ]
    header = ["calibration windows", "tokens", "wiki ppl", "layer error", "time (s)"]
    write_table("quality_calib", "Perplexity against calibration data", header, rows, notes, a.out)


if __name__ == "__main__":
    main()
