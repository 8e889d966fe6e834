"""Packing benchmark: pack and unpack every compressed linear of the real model, the packed model's resident
memory for its compressed linears against their fp16 size, and packed inference on the CPU against the dense
model in fp32 and bf16 (prefill 1 x 512 and 8 x 512 tokens, decode one token at a time with the KV cache).

The codes are synthetic but real-shaped and real-valued: every linear of SmolLM2-135M gets, per column block
of 128, a 6:8 mask (largest |w| per group), the 8 columns of largest norm as salient columns, and an ARB fit
through `binarize_block` (2 iterations) with fp16 scales: the same tensors a compression job produces, at a
fraction of its cost (packing time depends on shapes, not on how the code was found). The inference rows
alternate the models run by run (`--reps` each, the median is reported) so that a busy machine slows them alike.
Writes bench/results/packing.md and packing_inference.md (or under --out DIR); --inference-only writes only the
second (the artifact is still built; the packing table is not written).
Usage: python bench/packing.py [--threads 2] [--reps 3] [--decode-tokens 32] [--inference-only] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_out_option, machine, write_table  # noqa: E402
from pbs2p.core.binarize import binarize_block  # noqa: E402
from pbs2p.core.config import CompressionConfig  # noqa: E402
from pbs2p.core.format import (  # noqa: E402
    ArtifactWriter,
    PackedLinear,
    decode_linear,
    inspect_artifact,
    load_artifact,
    pack_linear,
    unpack_linear,
    verify_artifact,
)
from pbs2p.core.format.kernel import library, use_kernel  # noqa: E402
from pbs2p.core.solver import LinearResult, nm_mask  # noqa: E402
from pbs2p.testing.real import real_model_dir  # noqa: E402
from pbs2p.workers.weights import WeightReader  # noqa: E402

MODEL = "smollm2-135m"


def synthetic_code(W: torch.Tensor, cfg: CompressionConfig) -> LinearResult:
    blocks = []
    for s in range(0, W.shape[1], cfg.block_size):
        Wb = W[:, s : s + cfg.block_size]
        K = nm_mask(Wb.abs(), cfg.pattern.n, cfg.pattern.m)
        k = min(cfg.salient_columns, Wb.shape[1] // 2)
        sal = Wb.norm(dim=0).topk(k).indices.sort().values
        blocks.append(binarize_block(Wb, K, sal, 2, "arb", cfg.ablations.scale_dtype)[0])
    return LinearResult(torch.cat([b.dense() for b in blocks], 1), blocks, cfg.pattern.n, 0.0, cfg.damping, 0)


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def prefill(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], object]:
    return lambda: model(input_ids=ids, use_cache=False)


def decode(model: torch.nn.Module, prompt: torch.Tensor, steps: int) -> Callable[[], float]:
    """Greedy decoding of `steps` tokens after `prompt` with the KV cache; returns the decode steps' tokens/s."""

    def run() -> float:
        cache = DynamicCache()
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        t = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
        return steps / (time.perf_counter() - t)

    return run


def inference_rows(art: Path, reps: int, steps: int) -> tuple[list[list[str]], list[str]]:
    """Prefill and decode of the dense (fp32, bf16) and packed (torch decode per call, kernel) models."""
    dense32 = load_artifact(art, mode="dense")
    dense16 = load_artifact(art, mode="dense", dtype=torch.bfloat16)
    packed = load_artifact(art, mode="packed")
    mods = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    kernel = library() is not None
    g = torch.Generator().manual_seed(0)
    ids1, ids8 = torch.randint(0, 1000, (1, 512), generator=g), torch.randint(0, 1000, (8, 512), generator=g)
    prompt = torch.randint(0, 1000, (1, 16), generator=g)
    with torch.no_grad():
        want = dense32(input_ids=ids1[:, :64], use_cache=False).logits
        got = packed(input_ids=ids1[:, :64], use_cache=False).logits  # tile decode + BLAS: bit-exact
        got1 = torch.cat([packed(input_ids=ids1[:, i : i + 1], use_cache=False).logits for i in range(4)], 1)
        want1 = torch.cat([dense32(input_ids=ids1[:, i : i + 1], use_cache=False).logits for i in range(4)], 1)
    diff, diff1 = (got - want).abs().max().item(), (got1 - want1).abs().max().item()
    models: dict[str, tuple[torch.nn.Module, bool]] = {
        "dense fp32": (dense32, True),
        "dense bf16": (dense16, True),
        "packed, decode in torch per call (before)": (packed, False),
        "packed, kernel": (packed, True),
    }
    times: dict[str, dict[str, list[float]]] = {k: {"1x512": [], "8x512": [], "decode": []} for k in models}
    with torch.no_grad():
        for _ in range(reps):
            for name, (model, use) in models.items():  # alternate the models run by run
                with use_kernel(use):
                    times[name]["1x512"].append(_timed(prefill(model, ids1)))
                    times[name]["8x512"].append(_timed(prefill(model, ids8)))
                    times[name]["decode"].append(decode(model, prompt, steps if use else max(2, steps // 8))())
    med = {k: {f: statistics.median(v) for f, v in d.items()} for k, d in times.items()}
    ref = med["dense fp32"]
    fp32_bytes = sum(m.in_features * m.out_features * 4 for m in mods)
    packed_bytes = sum(m.resident_bytes() for m in mods)
    plan_bytes = sum(m.kernel_bytes() for m in mods)
    mem = {
        "dense fp32": fp32_bytes,
        "dense bf16": fp32_bytes // 2,
        "packed, decode in torch per call (before)": packed_bytes,
        "packed, kernel": packed_bytes + plan_bytes,
    }
    rows = []
    for name in models:
        m = med[name]
        rows.append(
            [
                name,
                f"{m['1x512']:.2f} s ({m['1x512'] / ref['1x512']:.2f}x)",
                f"{m['8x512']:.2f} s ({m['8x512'] / ref['8x512']:.2f}x)",
                f"{m['decode']:.1f} ({m['decode'] / ref['decode']:.2f}x)",
                f"{mem[name] / 2**20:.1f} MiB ({mem[name] / (fp32_bytes / 2):.3f})",
            ]
        )
    notes = [
        f"Inference: {reps} runs of each model, alternated, median; ratios against dense fp32 (time: lower is "
        f"better; tokens/s: higher is better). Decode: {steps} greedy tokens after a 16-token prompt, with the KV "
        f"cache ({max(2, steps // 8)} for the torch-decode path). Memory: the compressed linears' weights (fp16 = "
        f"{fp32_bytes / 2 / 2**20:.1f} MiB; ratio to fp16 in brackets); the kernel adds {plan_bytes / 2**10:.0f} KiB "
        f"of index arrays to the packed bytes. Kernel {'built' if kernel else 'NOT available (torch fallback)'}. "
        f"Logits, packed kernel vs dense fp32: max |diff| {diff:.2e} (1 x 64 prefill), {diff1:.2e} (one token).",
        f"Measured {datetime.date.today()} on {machine()}; written by bench/packing.py, not edited by hand.",
    ]
    return rows, notes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=3, help="runs of each inference measurement (median)")
    ap.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded one at a time")
    ap.add_argument("--inference-only", action="store_true", help="only the packed-inference table")
    add_out_option(ap)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cfg = CompressionConfig.from_options(pattern="6:8", calib_samples=1)
    model_dir = real_model_dir()
    reader = WeightReader(model_dir)
    names = [n for n in reader.names() if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    codes: dict[str, LinearResult] = {}
    t = time.perf_counter()
    for n in names:
        codes[n] = synthetic_code(reader.load([n])[n].to(torch.float32), cfg)
    t_codes = time.perf_counter() - t
    weights = sum(r.weight.numel() for r in codes.values())

    packed: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}
    t = time.perf_counter()
    for n, r in codes.items():
        packed[n] = pack_linear(r, r.n_keep, cfg.pattern.m, cfg.block_size, cfg.ablations.scale_dtype)
    t_pack = time.perf_counter() - t
    t_decode = 0.0
    for n, (ts, meta) in packed.items():
        t = time.perf_counter()
        w = decode_linear(ts, meta, check=False)
        t_decode += time.perf_counter() - t
        assert torch.equal(w, codes[n].weight), n  # bit-exact, outside the timing
    t = time.perf_counter()
    for ts, meta in packed.values():
        unpack_linear(ts, meta, check=False)
    t_unpack = time.perf_counter() - t
    packed_bytes = sum(sum(v.numel() * v.element_size() for v in ts.values()) for ts, _ in packed.values())

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "art"
        t = time.perf_counter()
        writer = ArtifactWriter(out, model_dir, cfg)
        by_block: dict[int, list[str]] = {}
        for n in names:
            by_block.setdefault(int(n.split(".")[2]), []).append(n)
        for i, ns in sorted(by_block.items()):
            prefix = f"model.layers.{i}."
            tensors = reader.load_prefix(prefix)
            tensors = {prefix + k: v for k, v in tensors.items()}
            writer.write_block(i, tensors, {n: codes[n] for n in ns})
        rest = [n for n in reader.names() if not n.startswith("model.layers.")]
        writer.write_rest(reader.load(rest))
        writer.finish({"config": cfg.to_dict(), "model_type": "llama", "blocks": []})
        t_write = time.perf_counter() - t
        t = time.perf_counter()
        verify_artifact(out)
        t_verify = time.perf_counter() - t
        info = inspect_artifact(out)
        t = time.perf_counter()
        model = load_artifact(out, mode="packed")
        t_load = time.perf_counter() - t
        mods = [m for m in model.modules() if isinstance(m, PackedLinear)]
        resident = sum(m.resident_bytes() for m in mods)
        fp16 = sum(m.in_features * m.out_features * 2 for m in mods)
        ids = torch.randint(0, 1000, (1, 128), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            t = time.perf_counter()
            lp = model(input_ids=ids, use_cache=False).logits
            t_fwd_packed = time.perf_counter() - t
            del model, mods
            dense = load_artifact(out, mode="dense")
            t = time.perf_counter()
            ld = dense(input_ids=ids, use_cache=False).logits
            t_fwd_dense = time.perf_counter() - t
        assert torch.equal(lp, ld), "packed and dense logits differ"
        inf_rows, inf_notes = inference_rows(out, a.reps, a.decode_tokens)
    header = ["model", "prefill 1 x 512", "prefill 8 x 512", "decode, tokens/s", "linears' memory"]
    write_table("packing_inference", "Packed inference on the CPU", header, inf_rows, inf_notes, a.out)
    if a.inference_only:
        return

    total = info["total"]
    rows = [
        ["compressed linears", f"{len(codes)} ({weights / 1e6:.1f} M weights)"],
        ["pack all linears (pack_linear)", f"{t_pack:.2f} s"],
        ["unpack all linears to block codes (unpack_linear)", f"{t_unpack:.2f} s"],
        ["decode all linears to dense Ŵ (unpack + BlockCode.dense)", f"{t_decode:.2f} s"],
        ["write the artifact (pack + safetensors + sha256)", f"{t_write:.2f} s"],
        ["verify the artifact (sha256 of every file, headers)", f"{t_verify:.2f} s"],
        ["load packed (verify + build + one checking decode)", f"{t_load:.2f} s"],
        [
            "first forward, 1 x 128 tokens: packed (builds the kernel plans) / dense",
            f"{t_fwd_packed:.2f} s / {t_fwd_dense:.2f} s",
        ],
        ["resident bytes of the compressed linears, packed", f"{resident / 2**20:.1f} MiB"],
        ["their fp16 size", f"{fp16 / 2**20:.1f} MiB"],
        ["packed / fp16", f"{resident / fp16:.3f}"],
        ["true bits per weight (bytes x 8 / weights)", f"{total['true_bits']:.3f} (paper {total['paper_bits']:.3f})"],
    ]
    assert packed_bytes == total["bytes"] == resident
    notes = [
        f"Model {MODEL}: every q/k/v/o/gate/up/down projection of the 30 blocks. Codes are synthetic but real-"
        f"shaped (6:8 mask of largest |w|, 8 salient columns per 128, ARB with fp16 scales via binarize_block; "
        f"made in {t_codes:.0f} s, not counted). Packing cost depends on shapes only. The packed and dense models "
        "give identical logits. Forward times are single runs (noisy).",
        f"Measured {datetime.date.today()} on {machine()}; written by bench/packing.py, not edited by hand.",
    ]
    write_table("packing", "Packing and unpacking the real model", ["what", "value"], rows, notes, a.out)


if __name__ == "__main__":
    main()
