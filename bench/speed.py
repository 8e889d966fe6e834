"""Speed benchmark: `arb` (dense 1-bit) vs `pbs2p` on the same model and calibration, side by side.

The runs alternate (arb, pbs2p, arb, pbs2p, ...) so that machine noise hits both alike; the ratio of the
medians is reported. Writes bench/results/speed.md (or --out DIR/speed.md). Usage:
  python bench/speed.py [--calib-samples 32] [--seqlen 512] [--repeats 2] [--out DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_out_option, dry_run, machine, run_cli, write_table  # noqa: E402

RUNS = {
    "arb": ["--method", "arb"],
    "pbs2p 6:8": ["--method", "pbs2p", "--pattern", "6:8"],
    "pbs2p 6:8, block tuning 24 steps": ["--method", "pbs2p", "--block-tune-steps", "24", "--block-tune-lr", "1e-2"],
}


def compress_args(model: str, opts: list[str], out: str, a: argparse.Namespace) -> list[str]:
    return ["compress", model, "-o", out, *opts, "--calib-samples", str(a.calib_samples), "--seqlen", str(a.seqlen)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    add_out_option(ap)
    ap.add_argument("--dry-run", action="store_true", help="print and check the pbs2p command lines; run nothing")
    a = ap.parse_args()
    if a.dry_run:
        dry_run([compress_args(a.model, opts, "OUT", a) for _ in range(a.repeats) for opts in RUNS.values()])
        return
    times: dict[str, list[float]] = {k: [] for k in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeats):
            for name, opts in RUNS.items():
                _, secs, _ = run_cli(compress_args(a.model, opts, f"{tmp}/out", a))
                times[name].append(secs)
                print(f"run {r + 1}: {name} {secs:.1f} s", flush=True)
    base = statistics.median(times["arb"])
    rows = [
        [
            name,
            " / ".join(f"{t:.0f}" for t in ts),
            f"{statistics.median(ts):.0f}",
            f"{statistics.median(ts) / base:.2f}",
        ]
        for name, ts in times.items()
    ]
    notes = [
        f"Model {a.model}, calibration {a.calib_samples} x {a.seqlen} tokens; whole `pbs2p compress` process "
        "(model resolution, calibration, all blocks, writing). Runs alternate so noise hits all alike.",
        "The paper reports PBS²P at about 2.5x the time of ARB-LLM; our target is at most 1.5x.",
        f"Measured {datetime.date.today()} on {machine()}; written by bench/speed.py, not edited by hand.",
    ]
    write_table(
        "speed", "Speed: pbs2p vs dense arb", ["method", "runs (s)", "median (s)", "ratio to arb"], rows, notes, a.out
    )


if __name__ == "__main__":
    main()
