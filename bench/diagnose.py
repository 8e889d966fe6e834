"""Where does a compressed model lose its quality? Swap tests and hidden-state drift against the FP model.

    python bench/diagnose.py ARTIFACT [--model smollm2-135m] [--windows 8] [--out bench/results/diagnose.md]

On the first K held-out windows (paired with the FP model, so small differences are not noise):
- NLL increase over FP with only one block's linears compressed (the others FP), for every block;
- NLL increase with only one kind of linear compressed (q_proj everywhere, ...);
- the fully compressed model's drift per block: ||h' - h||^2 / ||h||^2 of the block outputs, at the window's
  first position (where attention sinks and massive activations live) and over the rest, with the mean norm
  of h at both.
Prints a markdown report and writes it to --out.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pbs2p_core.artifact import dense_state_dict, read_manifest  # noqa: E402
from workers.sources import eval_windows, load_documents, resolve_model  # noqa: E402


@torch.no_grad()
def mean_nll(lm: torch.nn.Module, ids: torch.Tensor) -> float:
    total, count = 0.0, 0
    for w in ids.split(4):
        logits = lm(input_ids=w, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum")
        total += float(loss.double())
        count += w[:, 1:].numel()
    return total / count


@torch.no_grad()
def block_outputs(lm: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda mod, inp, out: outs.append(out[0] if isinstance(out, tuple) else out))
        for layer in lm.model.layers
    ]
    try:
        lm(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("artifact", type=Path)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    fp_dir = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(fp_dir)
    ids, _ = eval_windows(tok, load_documents("wiki", "eval"), 512, args.windows)
    lm = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    linears = sorted(read_manifest(args.artifact)["linears"])
    q = dense_state_dict(args.artifact)
    params = dict(lm.named_parameters())
    fp = {name: params[name].data.clone() for name in linears}

    def use(names: list[str]) -> None:
        for name in linears:
            params[name].data = (q if name in names else fp)[name].to(torch.float32)

    lines = [f"# Diagnosis of {args.artifact.name}", ""]
    use([])
    base = mean_nll(lm, ids)
    use(linears)
    full = mean_nll(lm, ids)
    lines += [
        f"{args.windows} held-out windows x 512. NLL (nats/token): FP {base:.4f}, compressed {full:.4f} "
        f"(+{full - base:.4f}).",
        "",
        "## One block compressed, the rest FP",
        "",
        "| block | NLL increase |",
        "|---|---|",
    ]
    blocks = sorted({int(n.split(".")[2]) for n in linears})
    for b in blocks:
        use([n for n in linears if int(n.split(".")[2]) == b])
        lines.append(f"| {b} | {mean_nll(lm, ids) - base:+.4f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    kinds = sorted({n.split(".")[-2] for n in linears})
    lines += ["", "## One kind of linear compressed everywhere", "", "| linear | NLL increase |", "|---|---|"]
    for k in kinds:
        use([n for n in linears if n.split(".")[-2] == k])
        lines.append(f"| {k} | {mean_nll(lm, ids) - base:+.4f} |")
        print(lines[-1], file=sys.stderr, flush=True)
    use([])
    h_fp = block_outputs(lm, ids)
    use(linears)
    h_q = block_outputs(lm, ids)
    lines += [
        "",
        "## Drift of the fully compressed model",
        "",
        "| block | rel. error, first position | rel. error, rest | mean norm first | mean norm rest |",
        "|---|---|---|---|---|",
    ]
    for b, (a, c) in enumerate(zip(h_q, h_fp, strict=True)):
        rel = (a - c).pow(2).sum(-1) / c.pow(2).sum(-1)
        norm = c.norm(dim=-1)
        lines.append(
            f"| {b} | {float(rel[:, 0].mean()):.4f} | {float(rel[:, 1:].mean()):.4f} | "
            f"{float(norm[:, 0].mean()):.1f} | {float(norm[:, 1:].mean()):.1f} |"
        )
    lines += ["", f"{time.perf_counter() - t0:.0f} s, bench/diagnose.py"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
