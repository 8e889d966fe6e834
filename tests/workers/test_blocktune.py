"""Block-wise reconstruction (config block_tune_steps; pbs2p_core/blocktune.py, workers/blocktune.py) on seeded
tiny random models, CPU only: the scales as parameters reproduce the codes, tuning lowers the block's loss with
masks and signs unchanged, the artifact decodes to the tuned weights, and the same job gives the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pbs2p.core.binarize import BlockCode
from pbs2p.core.blocktune import CodeScales, dense_weight
from pbs2p.core.config import CompressionConfig
from pbs2p.core.families import FAMILIES
from pbs2p.core.format import load_artifact, verify_artifact
from pbs2p.core.format.linear import unpack_linear
from pbs2p.core.format.loader import iter_files
from pbs2p.core.solver import column_blocks, compress_linear
from pbs2p.testing.artifacts import file_hashes, logits, saved_report, tensors
from pbs2p.testing.tiny import calib_ids, make_model, tiny_job_config
from pbs2p.workers.block import compress_block
from pbs2p.workers.local import compress_model
from pbs2p.workers.model_stream import BlockModel

pytestmark = pytest.mark.usefixtures("one_thread")

TUNED = {"block_tune_steps": 12, "block_tune_lr": 1e-2}


def stored_codes(out: Path) -> dict[str, list[BlockCode]]:
    """Every compressed linear's column-block codes as the artifact stores them."""
    art = verify_artifact(out)
    return {
        name: unpack_linear(fields, art.linears[name])
        for _, _, packed in iter_files(art)
        for name, fields in packed.items()
    }


@pytest.mark.parametrize(
    "options",
    [{}, {"scale_layout": "shared"}, {"scale_layout": "lean"}, {"scale_refit": False}, {"salient_columns": 0}],
    ids=["full", "shared", "lean", "no-refit", "no-salient"],
)
def test_scales_as_parameters_reproduce_the_codes(options: dict[str, object]) -> None:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(24, 64, generator=g)
    X = torch.randn(64, 256, generator=g)
    cfg = CompressionConfig.from_options(block_size=32, salient_columns=options.pop("salient_columns", 4), **options)
    res = compress_linear(W, X @ X.T / 256, 6, cfg)
    cs = CodeScales(res.blocks, column_blocks(64, 32))
    theta = cs.params()
    torch.testing.assert_close(cs.weight(theta), res.weight, rtol=0, atol=1e-6)
    again = cs.rounded(theta, "fp16")  # the initial values come back exactly, once rounded to their dtype
    assert torch.equal(dense_weight(again), res.weight)
    for a, b in zip(again, res.blocks, strict=True):
        assert a.scales.keys() == b.scales.keys() and all(torch.equal(a.scales[k], b.scales[k]) for k in a.scales)


def run_block0(src: Path, cfg: CompressionConfig) -> tuple[dict[str, torch.Tensor], list[float] | None]:
    """Block 0 of the model compressed alone: (its weights by full name, the tuning's loss before and after)."""
    bm = BlockModel(src)
    ids = calib_ids()
    capture = bm.capture(ids, cfg.batch_size)
    out = compress_block(bm, 0, capture.inputs, capture, cfg, cfg.pattern.n, None)
    return {k: r.weight for k, r in out.results.items()}, out.report.tune_loss


def test_tuning_lowers_the_block_loss_with_masks_and_signs_unchanged(tmp_path: Path) -> None:
    make_model(tmp_path / "src")
    plain, none = run_block0(tmp_path / "src", tiny_job_config(block_tune_steps=0))
    tuned, loss = run_block0(tmp_path / "src", tiny_job_config(**TUNED))
    assert none is None and loss is not None
    before, after = loss
    assert after < before  # kept only when lower: on this model it is
    assert any(not torch.equal(plain[k], tuned[k]) for k in plain)
    compress_model(tmp_path / "src", tmp_path / "plain", tiny_job_config(block_tune_steps=0), calib_ids())
    compress_model(tmp_path / "src", tmp_path / "tuned", tiny_job_config(**TUNED), calib_ids())
    a, b = stored_codes(tmp_path / "plain"), stored_codes(tmp_path / "tuned")
    block0 = [k for k in a if ".layers.0." in k]
    assert len(block0) == 7
    changed = 0
    for k in block0:  # block 0 sees the same inputs in both jobs: only its scales differ
        for ca, cb in zip(a[k], b[k], strict=True):
            assert torch.equal(ca.mask, cb.mask) and torch.equal(ca.sign, cb.sign)
            assert torch.equal(ca.salient, cb.salient) and torch.equal(ca.sign2, cb.sign2)
            changed += any(not torch.equal(ca.scales[n], cb.scales[n]) for n in ca.scales)
    assert changed
    decoded = tensors(tmp_path / "tuned")
    for k, w in tuned.items():  # the artifact decodes to the tuned weights, bit for bit
        assert torch.equal(decoded[k], w), k
    losses = [blk["tune_loss"] for blk in saved_report(tmp_path / "tuned")["blocks"]]
    assert losses[0] == [before, after] and all(la <= lb for lb, la in losses)


def test_tuned_job_is_deterministic_and_loads(tmp_path: Path) -> None:
    make_model(tmp_path / "src")
    ids = calib_ids()
    for run in ("a", "b"):
        compress_model(tmp_path / "src", tmp_path / run, tiny_job_config(**TUNED), ids)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")
    out = logits(load_artifact(tmp_path / "a", mode="packed"), ids)
    assert out.shape[:2] == ids.shape and bool(torch.isfinite(out).all())


def test_independent_propagation_passes_fp_outputs_on(tmp_path: Path) -> None:
    """With independent propagation the next block still gets the FP block's outputs (tuning changes weights)."""
    make_model(tmp_path / "src")
    cfg = tiny_job_config(propagation="independent", **TUNED)
    bm = BlockModel(tmp_path / "src")
    capture = bm.capture(calib_ids(), cfg.batch_size)
    fp = bm.run_block(0, bm.load_block(0), capture.inputs, capture)
    out = compress_block(bm, 0, capture.inputs, capture, cfg, cfg.pattern.n, None)
    assert out.report.tune_loss is not None
    assert all(torch.equal(a, b) for a, b in zip(out.outputs, fp, strict=True))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tuning_runs_on_every_family(tmp_path: Path, family: str) -> None:
    """Each family's block keyword arguments (masks, rotary tables) are cut to the windows of a step."""
    make_model(tmp_path / "src", family)
    _, loss = run_block0(tmp_path / "src", tiny_job_config(**TUNED))
    assert loss is not None and loss[1] < loss[0]
