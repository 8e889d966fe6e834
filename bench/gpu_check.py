"""GPU check: the core on CUDA with the real model and a short calibration; records the device and timings.

1. compresses the packaged SmolLM2-135M on CUDA (pbs2p 6:8, short calibration), with its peak GPU memory;
2. evaluates the FP model and the artifact (packed) on CUDA: held-out Wikipedia perplexity;
3. times `compress_linear` alone on CUDA for the real model's shapes and for 7B and 70B Llama shapes
   (random W, H = 2XᵀX/T): the per-linear costs that the README's 7B / 70B estimates scale from;
4. with --ray: the same job through a local Ray cluster with one GPU worker per GPU, and whether its
   artifact is byte-identical to the in-process CUDA run.
Writes bench/results/gpu_check.md (or --out DIR/gpu_check.md). On a machine without CUDA it says so and exits
with code 2. Usage:
  python bench/gpu_check.py [--calib-samples 16] [--seqlen 512] [--windows 20] [--no-big] [--ray] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import add_out_option, write_table  # noqa: E402
from pbs2p.core.config import CompressionConfig  # noqa: E402
from pbs2p.core.solver import compress_linear  # noqa: E402
from pbs2p.testing.artifacts import file_hashes  # noqa: E402
from pbs2p.workers.evaluation import EvalSpec, evaluate_model  # noqa: E402
from pbs2p.workers.local import compress_model  # noqa: E402
from pbs2p.workers.model_refs import fetch_model  # noqa: E402
from pbs2p.workers.settings import WorkerSettings  # noqa: E402
from pbs2p.workers.text import calibration_for  # noqa: E402

SMOLLM = [(576, 576), (192, 576), (1536, 576), (576, 1536)]
LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
LLAMA_70B = [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)]


def time_linears(shapes: list[tuple[int, int]], tokens: int = 4096) -> list[tuple[tuple[int, int], float]]:
    cfg = CompressionConfig.from_options(device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    compress_linear(torch.randn(64, 128, device="cuda"), torch.eye(128, device="cuda"), 6, cfg)  # warm-up
    out = []
    for R, C in shapes:
        X = torch.randn(tokens, C, device="cuda", generator=g)
        H = 2 * X.T @ X / tokens
        del X
        W = torch.randn(R, C, device="cuda", generator=g) * 0.02
        torch.cuda.synchronize()
        t = time.perf_counter()
        compress_linear(W, H, 6, cfg)
        torch.cuda.synchronize()
        out.append(((R, C), time.perf_counter() - t))
        print(f"compress_linear {R}x{C} on CUDA: {out[-1][1]:.2f} s", flush=True)
        del W, H
        torch.cuda.empty_cache()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=20, help="evaluation windows")
    ap.add_argument("--no-big", action="store_true", help="skip the 7B / 70B linear shapes")
    ap.add_argument("--ray", action="store_true", help="also run the job on a local Ray cluster with GPU workers")
    add_out_option(ap)
    a = ap.parse_args()

    if not torch.cuda.is_available():
        print(
            f"gpu_check: CUDA is not available here (torch {torch.__version__}, CUDA build: {torch.version.cuda}); "
            "run it on a machine with an NVIDIA GPU and a CUDA build of torch. Nothing was measured.",
            file=sys.stderr,
        )
        return 2

    props = torch.cuda.get_device_properties(0)
    device = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}"
    print(f"device: {device}", flush=True)
    settings = WorkerSettings()
    model_dir = fetch_model(a.model, settings)
    cfg = CompressionConfig.from_options(calib_samples=a.calib_samples, seqlen=a.seqlen, device="cuda")
    calib = calibration_for(model_dir, cfg)  # made before the clock starts: the compression alone is timed
    rows: list[list[str]] = [["device", device], ["torch / CUDA", f"{torch.__version__} / {torch.version.cuda}"]]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cuda"
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        report = compress_model(model_dir, out, cfg, calib)
        secs = time.perf_counter() - t
        blocks = [b.seconds for b in report.blocks]
        rows.append(["compress (pbs2p 6:8, CUDA)", f"{secs:.1f} s, {sum(blocks) / len(blocks):.2f} s per block"])
        rows.append(["peak GPU memory", f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"])
        rows.append(["mean layer error", f"{report.mean_rel_error:.4f}"])
        spec = EvalSpec(seqlen=a.seqlen, windows=a.windows)
        fp = evaluate_model(model_dir, spec, device="cuda")
        q = evaluate_model(out, spec, device="cuda")
        rows.append([f"perplexity ({a.windows} x {a.seqlen}, FP / pbs2p)", f"{fp['ppl']:.2f} / {q['ppl']:.2f}"])
        if a.ray:
            from pbs2p.workers.distributed import (  # ray (an extra): imported only with --ray
                compress_model_ray,
                init_ray,
            )

            init_ray(None)
            t = time.perf_counter()
            ckpt = f"{tmp}/ckpt"
            compress_model_ray(model_dir, Path(tmp) / "ray", cfg, calib, settings=settings, checkpoint_url=ckpt)
            same = file_hashes(Path(tmp) / "ray") == file_hashes(out)
            rows.append(["Ray job, GPU workers", f"{time.perf_counter() - t:.1f} s; artifact identical: {same}"])
    shapes = SMOLLM + ([] if a.no_big else LLAMA_7B + LLAMA_70B)
    timed = time_linears(shapes)
    notes = [
        f"Model {a.model}, calibration {a.calib_samples} x {a.seqlen} tokens of Wikipedia, pbs2p 6:8 on CUDA.",
        "compress_linear alone on CUDA (random W, H from 4096 random tokens; out x in): "
        + ", ".join(f"{R}x{C} {s:.2f} s" for (R, C), s in timed),
        f"Measured {datetime.date.today()}; written by bench/gpu_check.py, not edited by hand.",
    ]
    write_table("gpu_check", "GPU check: the core on CUDA", ["what", "result"], rows, notes, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
