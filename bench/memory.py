"""Memory benchmark: peak memory of a job does not grow with the number of blocks.

Synthetic Llamas of L and 2L blocks (random weights, written as safetensors) are compressed with the local
pipeline and with Ray (a local cluster started by the job); each job runs in its own process and the peak
of the summed memory of that process and all its descendants (Ray's GCS, raylet and workers included) is
sampled with psutil: RSS every 0.1 s, and PSS (shared pages, e.g. Ray's object store, counted once) every
0.5 s. The peak for 2L blocks must be at most 1.15x the peak for L. Writes bench/results/memory.md (or
--out DIR/NAME.md). Usage:
  python bench/memory.py [--hidden 1024] [--intermediate 2816] [--blocks 8] [--calib-samples 16] [--seqlen 256]
                         [--workers 2] [--name memory] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, add_out_option, machine, write_table  # noqa: E402
from pbs2p.core.config import CompressionConfig  # noqa: E402
from pbs2p.workers.local import compress_model  # noqa: E402
from pbs2p.workers.settings import WorkerSettings  # noqa: E402

LIMIT = 1.15
VOCAB = 512


def make_model(path: Path, blocks: int, hidden: int, intermediate: int) -> None:
    """A random Llama saved as safetensors (seeded; built on CPU once, a few hundred MB at most here)."""
    conf = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=blocks,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        head_dim=64,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(conf, dtype=torch.float32).save_pretrained(path)


def child(kind: str, model: Path, out: Path, samples: int, seqlen: int, workers: int) -> None:
    """The job itself (run in a child process): compress `model` locally or on a fresh local Ray cluster.

    The calibration windows are random tokens (the model is random too): the compression alone is measured."""
    calib = torch.randint(0, VOCAB, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    cfg = CompressionConfig.from_options(calib_samples=samples, seqlen=seqlen, batch_size=4)
    if kind == "local":
        report = compress_model(model, out, cfg, calib)
    else:
        from pbs2p.workers.distributed import compress_model_ray, init_ray  # ray (an extra): only in a Ray child

        init_ray(None, num_cpus=workers, object_store_memory=1 << 30)
        ckpt = str(out) + ".ckpt"
        report = compress_model_ray(
            model, out, cfg, calib, settings=WorkerSettings(), workers=workers, checkpoint_url=ckpt
        )
    print(json.dumps({"seconds": report.seconds}))


def _vm_hwm(pid: int) -> int:
    """The process's peak resident set (VmHWM in /proc/PID/status), in bytes: exact, not sampled."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Peak of the summed RSS (and PSS) over a process and all its descendants."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_rss = self.peak_pss = 0
        self.procs = 0
        self.by_pid: dict[int, tuple[str, int]] = {}  # pid -> (first name, its own peak PSS)
        self.hwm: dict[int, int] = {}  # pid -> its peak RSS as the kernel counts it (VmHWM), bytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            procs = self._tree()
            self.procs = max(self.procs, len(procs))
            rss = pss = 0
            for p in procs:
                try:
                    if tick % 5 == 0:
                        info = p.memory_full_info()
                        rss, pss = rss + info.rss, pss + info.pss
                        name, peak = self.by_pid.get(p.pid, (p.name(), 0))  # Ray renames workers per task
                        self.by_pid[p.pid] = (name, max(peak, info.pss))
                    else:
                        rss += p.memory_info().rss
                    self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), _vm_hwm(p.pid))
                except (psutil.NoSuchProcess, psutil.AccessDenied, OSError):
                    continue
            self.peak_rss = max(self.peak_rss, rss)
            if tick % 5 == 0:
                self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def measure(kind: str, model: Path, out: Path, a: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", kind, str(model), str(out)]
    cmd += ["--calib-samples", str(a.calib_samples), "--seqlen", str(a.seqlen), "--workers", str(a.workers)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    sampler = Sampler(proc.pid)
    stdout, _ = proc.communicate()
    sampler.stop()
    if proc.returncode:
        raise SystemExit(f"{kind} job on {model.name} failed with exit code {proc.returncode}")
    job = json.loads(stdout.strip().splitlines()[-1])
    return {
        "wall": time.perf_counter() - t,
        "job": job["seconds"],
        "rss": sampler.peak_rss / 2**20,
        "hwm": sum(sampler.hwm.values()) / 2**20,
        "pss": sampler.peak_pss / 2**20,
        "procs": sampler.procs,
        "top": sorted(sampler.by_pid.values(), key=lambda kv: -kv[1])[:6],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--blocks", type=int, default=8, help="L: models of L and 2L blocks are measured")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2, help="Ray workers (and the local cluster's CPUs)")
    ap.add_argument("--name", default="memory", help="results file name (bench/results/NAME.md)")
    add_out_option(ap)
    ap.add_argument("--child", nargs=3, metavar=("KIND", "MODEL", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        kind, model, out = a.child
        child(kind, Path(model), Path(out), a.calib_samples, a.seqlen, a.workers)
        return

    results: dict[tuple[str, int], dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for L in (a.blocks, 2 * a.blocks):
            model = Path(tmp) / f"llama-{L}"
            make_model(model, L, a.hidden, a.intermediate)
            size = sum(f.stat().st_size for f in model.glob("*.safetensors")) / 2**20
            print(f"{L} blocks: {size:.0f} MiB of safetensors", flush=True)
            for kind in ("local", "ray"):
                results[(kind, L)] = r = measure(kind, model, Path(tmp) / f"out-{kind}-{L}", a)
                r["model_mib"] = size
                print(
                    f"{kind} {L} blocks: peak RSS {r['rss']:.0f} MiB, PSS {r['pss']:.0f} MiB, "
                    f"sum of per-process peaks {r['hwm']:.0f} MiB",
                    flush=True,
                )
                print("  largest processes (peak PSS, MiB): " + ", ".join(f"{n} {v / 2**20:.0f}" for n, v in r["top"]))
    rows, verdicts = [], []
    for kind in ("local", "ray"):
        small, big = results[(kind, a.blocks)], results[(kind, 2 * a.blocks)]
        for L, r in ((a.blocks, small), (2 * a.blocks, big)):
            rows.append(
                [
                    kind,
                    str(L),
                    f"{r['model_mib']:.0f}",
                    f"{r['rss']:.0f}",
                    f"{r['pss']:.0f}",
                    f"{r['hwm']:.0f}",
                    str(r["procs"]),
                    f"{r['job']:.0f}",
                ]
            )
        ratio = big["rss"] / small["rss"]
        verdicts.append(
            f"{kind}: peak RSS ratio 2L/L = {ratio:.3f} (PSS {big['pss'] / small['pss']:.3f}): "
            f"{'PASS' if ratio <= LIMIT else 'FAIL'} (limit {LIMIT})"
        )
    notes = [
        f"Synthetic Llama, hidden {a.hidden}, intermediate {a.intermediate}, vocab {VOCAB}, random fp32 weights; "
        f"pbs2p 6:8, calibration {a.calib_samples} x {a.seqlen} random tokens; Ray: a local cluster of "
        f"{a.workers} CPUs started by the job, {a.workers} workers. Peak RSS / PSS: the peak of the sum over the "
        "job's process tree, sampled (RSS every 0.1 s, PSS every 0.5 s); sum of per-process peaks: each process's "
        "VmHWM (exact, an upper bound of the peak of the sum). Two runs of the same job differ by up to ~10% here.",
        *verdicts,
        f"Measured {datetime.date.today()} on {machine()}; written by bench/memory.py, not edited by hand.",
    ]
    header = [
        "pipeline",
        "blocks",
        "model (MiB)",
        "peak RSS (MiB)",
        "peak PSS (MiB)",
        "sum of per-process peaks (MiB)",
        "processes",
        "job (s)",
    ]
    write_table(a.name, "Memory: peak of the job vs number of blocks", header, rows, notes, a.out)


if __name__ == "__main__":
    main()
