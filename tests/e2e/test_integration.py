"""The real packaged model, end to end, with a small calibration set (a few minutes on 2 CPU cores)."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from pbs2p.core.config import CompressionConfig
from pbs2p.core.format import decode_linear, inspect_artifact, unpack_linear, verify_artifact
from pbs2p.workers.evaluation import EvalSpec
from pbs2p.workers.job import JobSpec, run_job
from pbs2p.workers.settings import WorkerSettings

pytestmark = pytest.mark.integration


def test_real_model_end_to_end(real_model: Path, tmp_path: Path) -> None:
    """pbs2p 6:8 on the real model: structure, bits and a working language model. Which method is better is
    measured by bench/quality.py with enough calibration, not asserted here. 8 x 256 calibration tokens: more
    than the MLP's 1536 inputs (with fewer, the Hessians are rank-deficient and the model can end up worse than
    a uniform guess)."""
    cfg = CompressionConfig.from_options(method="pbs2p", pattern="6:8", calib_samples=8, seqlen=256, batch_size=4)
    spec = JobSpec(str(real_model), cfg, evaluate=EvalSpec(seqlen=128, windows=2))  # the one job path
    job = run_job(spec, tmp_path / "pbs2p", WorkerSettings())
    pbs2p = job.report
    # every compressed linear reproduces its outputs better than dropping it would
    assert all(0 < lr.rel_error < 1 for b in pbs2p.blocks for lr in b.linears)
    assert sum(b.n_keep for b in pbs2p.blocks) == 6 * len(pbs2p.blocks)  # the average N is the target's
    assert all(b.tune_loss is not None for b in pbs2p.blocks)  # block tuning is on by default for pbs2p
    # N:M in the written weights of a CFS-chosen block
    block = max(pbs2p.blocks, key=lambda b: b.n_keep)
    art = verify_artifact(tmp_path / "pbs2p")
    name = f"model.layers.{block.index}.mlp.down_proj.weight"
    meta = art.linears[name]
    fields = load_file(art.path / meta["file"])
    packed = {k.split(":", 1)[1]: v for k, v in fields.items() if k.startswith(f"{name}:")}
    mask = torch.cat([b.mask for b in unpack_linear(packed, meta)], 1)
    assert (mask.view(mask.shape[0], -1, 8).sum(-1) == block.n_keep).all()
    w = decode_linear(packed, meta)
    assert not (w != 0)[~mask].any()  # pruned weights are zero (a kept one may decode to exactly 0)
    # bits: signs are N/M plus the salient residual plane; the true count adds mask and scales
    assert 0.75 < pbs2p.bits["paper_bits"] < pbs2p.bits["true_bits"]
    # the true count from the bytes written agrees with the formula up to the padding of the last bytes
    total = inspect_artifact(tmp_path / "pbs2p")["total"]
    assert total["linears"] == 7 * len(pbs2p.blocks)
    assert 0 <= total["true_bits"] - pbs2p.bits["true_bits"] < 8 * 3 * total["linears"] / total["weights"]
    # the compressed model (loaded packed) still is a language model, worse than FP, on held-out text
    fp, q = job.metrics["ppl_before"], job.metrics["ppl_after"]
    assert job.metrics["eval_windows"] == 2 and job.metrics["eval_tokens"] == 2 * 127
    assert math.isfinite(q) and fp < q < AutoTokenizer.from_pretrained(real_model).vocab_size
