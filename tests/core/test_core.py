"""Unit tests of the algorithm on hand-made tensors: masks, ARB, SPBO, CFS, numerics."""

import dataclasses
import itertools

import pytest
import torch

from pbs2p.core.binarize import ArbFit, arb, arb_error, binarize_block
from pbs2p.core.bits import SCALE_BITS, count_bits
from pbs2p.core.cfs import allocate, allocate_by_error, block_importance
from pbs2p.core.config import CompressionConfig, NMPattern
from pbs2p.core.errors import Pbs2pError
from pbs2p.core.hessian import HessianSum, tree_cover, tree_sum
from pbs2p.core.refit import layer_error, refit_scales
from pbs2p.core.solver import (
    _code_block,
    column_blocks,
    compress_linear,
    merge_rows,
    nm_mask,
    oneshot_linear,
    prepare_linear,
    row_chunks,
    salient_per_block,
    solve_rows,
    split_steps,
)


def _problem(rows: int = 64, cols: int = 256, tokens: int = 1024, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.1)
    W = torch.randn(rows, cols, generator=g) * 0.05
    return W, 2.0 / tokens * X.T @ X


def _groups(mask: torch.Tensor, m: int) -> torch.Tensor:
    return mask.view(mask.shape[0], -1, m).sum(-1)


@pytest.mark.parametrize("n", [1, 4, 5, 6, 7])
def test_nm_mask_keeps_exactly_n_per_group(n):
    score = torch.randn(32, 64)
    assert (_groups(nm_mask(score, n, 8), 8) == n).all()


@pytest.mark.parametrize(
    "kw",
    [
        dict(method="pbs2p"),
        dict(method="pbs2p", pattern="4:8"),
        dict(method="pbs2p", pattern="5:8", spbo_steps=2),
        dict(method="pbs2p", spbo_mode="fixed"),
        dict(method="prune-binarize", mask_score="wanda"),
        dict(method="pbs2p", arb_variant="arb-x", column_feedback=True),
        dict(method="pbs2p", arb_variant="arb-obs", pattern="4:8"),
        dict(method="pbs2p", arb_variant="arb-rc", salient_columns=0),
        dict(method="pbs2p", salient_search=(0, 4, 8)),
        dict(method="pbs2p", scale_layout="shared", column_feedback=True),
        dict(method="pbs2p", scale_layout="lean", block_size=256),
        dict(method="pbs2p", salient_allocation="linear", arb_variant="arb-obs"),
        dict(method="arb", scale_layout="lean"),
    ],
)
def test_compressed_linear_is_n_m_in_every_group_and_block(kw):
    cfg = CompressionConfig.from_options(**kw)
    W, H = _problem(cols=352)  # 2.75 column blocks: the last one is shorter
    res = compress_linear(W, H, cfg.pattern.n, cfg)
    n = cfg.pattern.n if cfg.prunes else 8  # arb is dense
    assert (_groups(res.weight != 0, 8) == n).all()
    for code in res.blocks:
        assert (_groups(code.mask, 8) == n).all()
    assert torch.equal(torch.cat([c.dense() for c in res.blocks], 1), res.weight)
    assert 0 < res.rel_error < 1


def test_each_arb_update_never_raises_the_error():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 128, generator=g) * 0.1 + 0.02
    K = nm_mask(torch.rand(48, 128, generator=g), 5, 8)
    K[3] = False  # an empty row: alpha = mu = 0
    trace: list[torch.Tensor] = []
    fit = arb(W, K, iters=15, trace=trace)
    errs = torch.stack(trace)  # (updates, rows)
    assert (errs[1:] <= errs[:-1] * (1 + 1e-6) + 1e-9).all()
    assert fit.alpha[3] == 0 and fit.mu[3] == 0
    # and the refined fit beats the plain sign binarization it starts from
    plain = ArbFit(W.abs().mean(1), torch.zeros(48), torch.where(W >= 0, 1.0, -1.0))
    assert arb_error(W, K, fit).sum() < arb_error(W, K, plain).sum()


@pytest.mark.parametrize("pattern,steps", [("6:8", None), ("4:8", None), ("5:8", 1)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spbo_block_error_not_above_prune_then_binarize(pattern, steps, seed):
    """Same block, same H: SPBO's OBS loss <= prune-then-binarize (OBS mask, tau = 1)."""
    W, H = _problem(rows=96, cols=128, seed=seed)
    U = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(H + 0.01 * H.diag().mean() * torch.eye(128))), upper=True
    )
    d, hdiag = U.diag(), H.diag()

    def loss(cfg):
        code = _code_block(W, d, hdiag, H, U, cfg.pattern.n, cfg.salient_columns, cfg)
        err = torch.linalg.solve_triangular(U, W - code.dense(), upper=True, left=False)
        return float((err**2).sum())

    spbo = loss(CompressionConfig.from_options(method="pbs2p", pattern=pattern, spbo_steps=steps))
    pb = loss(CompressionConfig.from_options(method="prune-binarize", pattern=pattern))
    assert spbo <= pb


def test_column_blocks():
    assert column_blocks(576, 128) == [(0, 128), (128, 256), (256, 384), (384, 512), (512, 576)]
    assert column_blocks(1536, 128) == [(i, i + 128) for i in range(0, 1536, 128)]
    assert column_blocks(64, 128) == [(0, 64)]


def test_salient_allocation_over_the_linear():
    """The budget (per block x blocks) goes to the highest-scoring columns anywhere, at most half a block each."""
    W = torch.randn(16, 384) * 0.01
    W[:, 130:200] *= 50  # block 1 holds 70 outlier columns
    spans = column_blocks(384, 128)
    per = salient_per_block(W, torch.ones(384), spans, 8)
    assert sum(p.numel() for p in per) == 24
    assert per[1].numel() == 24 and all(130 <= 128 + int(c) < 200 for c in per[1])
    per = salient_per_block(W, torch.ones(384), spans, 40)  # 120 > what block 1 may take (64)
    assert per[1].numel() == 64 and sum(p.numel() for p in per) == 120 and max(p.numel() for p in per) == 64


def test_split_steps():
    assert split_steps(2, 2) == [1, 1]
    assert split_steps(4, 4) == [1, 1, 1, 1]
    assert split_steps(3, 2) == [2, 1]
    assert sum(split_steps(7, 3)) == 7


def test_cfs_keeps_average_exactly_and_favours_important_end_blocks():
    cos = [0.55, 0.93, 0.96, 0.97, 0.95, 0.96, 0.94, 0.7]
    imp = block_importance(cos)
    assert sum(imp) == pytest.approx(len(imp))
    for n_t in (4, 5, 6):
        n = allocate(imp, n_t, 8)
        assert sum(n) == n_t * len(cos)
        assert all(n_t - 1 <= x <= n_t + 1 for x in n)
        assert n[0] > n[3] and n[-1] > n[3] and n[0] == max(n)
    assert allocate([1.0] * 5, 6, 8) == [6] * 5
    # a block with c <= 0 gets the largest importance; N never leaves [1, M-1]
    imp = block_importance([-0.1, 0.9, 0.95, 0.2])
    assert imp[0] == max(imp)
    n = allocate(imp, 7, 8, spread=3)
    assert sum(n) == 28 and max(n) <= 7


def test_cfs_error_allocation_minimises_the_sum_exactly():
    # block 0 loses much from fewer weights, block 2 gains much from more, block 1 is flat
    errors = [{5: 0.30, 6: 0.10, 7: 0.09}, {5: 0.11, 6: 0.10, 7: 0.095}, {5: 0.5, 6: 0.4, 7: 0.1}]
    n = allocate_by_error(errors, 6)
    assert sum(n) == 18 and n == [6, 5, 7]
    total = sum(e[k] for e, k in zip(errors, n, strict=True))
    # brute force over every assignment with the same average: nothing is lower
    best = min(
        sum(e[k] for e, k in zip(errors, ks, strict=True))
        for ks in itertools.product((5, 6, 7), repeat=3)
        if sum(ks) == 18
    )
    assert total == pytest.approx(best)
    # equal curves: nothing moves; a single block cannot trade with itself
    assert allocate_by_error([{5: 0.2, 6: 0.1, 7: 0.05}] * 4, 6) == [6] * 4
    assert allocate_by_error([{5: 0.2, 6: 0.1, 7: 0.0}], 6) == [6]


def test_oneshot_linear_is_n_of_m_and_no_better_than_compensated():
    """The CFS error score's quick code: N:M holds, and without GPTQ compensation its error is never below the
    compensated one-shot prune-binarize of the same linear (random Gaussian weights: e(N) need not fall with N)."""
    W, H = _problem(cols=256)
    cfg = CompressionConfig.from_options(pattern=NMPattern(6, 8))
    for n in (5, 6, 7):
        Q = oneshot_linear(W, H, n, cfg)
        assert ((Q != 0).view(W.shape[0], -1, 8).sum(-1) <= n).all()
        d = Q - W
        err = float(torch.einsum("rc,cd,rd->", d, H, d) / torch.einsum("rc,cd,rd->", W, H, W))
        assert compress_linear(W, H, n, cfg.replace(method="prune-binarize")).rel_error <= err < 1


def test_dead_columns_and_singular_hessian_do_not_crash():
    W, H = _problem(cols=128)
    H[:, 5] = 0
    H[5, :] = 0  # a dead input
    res = compress_linear(W, H, 6, CompressionConfig())
    assert (res.weight[:, 5] == 0).all() or (_groups(res.weight != 0, 8) == 6).all()
    assert torch.isfinite(res.weight).all()
    X = torch.randn(8, 128)  # rank 8 << 128: singular before damping
    res = compress_linear(W, X.T @ X, 6, CompressionConfig())
    assert torch.isfinite(res.weight).all()
    res = compress_linear(W, torch.zeros(128, 128), 6, CompressionConfig())  # nothing ever fired
    assert torch.isfinite(res.weight).all()


def test_in_features_not_divisible_by_m_is_a_clear_error():
    with pytest.raises(Pbs2pError, match="in_features=36"):
        compress_linear(torch.randn(8, 36), torch.eye(36), 6, CompressionConfig())


def test_bits_count_matches_the_algorithm_md_arithmetic():
    """6:8 with a rank-coded mask: signs 0.75 + mask 0.625 + fp16 alpha, mu per row per 128 columns 0.25."""
    W, H = _problem(rows=64, cols=256)
    cfg = CompressionConfig.from_options(salient_columns=0)
    res = compress_linear(W, H, 6, cfg)
    bits = count_bits(res.blocks, 6, 8, cfg.pattern.mask_bits_per_group)
    assert bits.paper_bits == pytest.approx(0.75)
    assert bits.true_bits == pytest.approx(0.75 + 0.625 + 0.25)


def test_binarize_block_scales_are_stored_rounded():
    W = torch.randn(16, 64) * 0.03
    K = torch.ones(16, 64, dtype=torch.bool)
    code, _ = binarize_block(W, K, torch.tensor([1, 7]), 15, "arb", "fp16")
    for s in code.scales.values():
        assert torch.equal(s, s.half().float())


def test_compression_is_deterministic():
    W, H = _problem()
    cfg = CompressionConfig()
    a, b = compress_linear(W, H, 6, cfg), compress_linear(W.clone(), H.clone(), 6, cfg)
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("layout,block,scales", [("full", 128, 5), ("shared", 128, 4), ("lean", 256, 3)])
def test_scale_layouts_cost_what_they_say(layout, block, scales):
    """signs 0.75 + residual plane (kept salient weights) + rank-coded mask 0.625 + fp16 scales per row per
    block + one byte per salient column index. Full: α, μ, α_s, μ_s, α_r (the refit folds μ_r into μ_s)."""
    W, H = _problem(rows=64, cols=512)
    cfg = CompressionConfig.from_options(
        scale_layout=layout, block_size=block, allocation="uniform", salient_allocation="block"
    )
    res = compress_linear(W, H, 6, cfg)
    bits = count_bits(res.blocks, 6, 8, cfg.pattern.mask_bits_per_group)
    weights = 64 * 512
    residual = sum(int(c.mask[:, c.salient].sum()) for c in res.blocks) / weights
    k = cfg.salient_columns
    assert 0 < residual * weights <= k * (512 // block) * 64  # at most every salient entry
    expected = 0.75 + residual + 0.625 + scales * 16 / block + 8 * k * (512 // block) / weights
    assert bits.true_bits == pytest.approx(expected)
    assert sum(len(c.scales) for c in res.blocks) == scales * (512 // block)
    assert torch.equal(torch.cat([c.dense() for c in res.blocks], 1), res.weight)


def test_empty_models_built_in_threads_leave_nothing_patched():
    """Two jobs in one process build skeletons at once: afterwards new modules get real parameters again
    (accelerate's init_empty_weights patches torch.nn.Module for the whole process while active)."""
    import threading

    from transformers import LlamaConfig

    from pbs2p.core.skeleton import empty_causal_lm

    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)  # fmt: skip
    built: list[torch.nn.Module] = []
    threads = [threading.Thread(target=lambda: built.extend(empty_causal_lm(cfg) for _ in range(5))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 20 and all(p.is_meta for m in built for p in m.parameters())
    assert torch.nn.Linear(4, 4).weight.device.type == "cpu"
    rotary = built[0].model.rotary_emb.inv_freq
    assert not rotary.is_meta and torch.isfinite(rotary).all()


def test_spbo_report_measures_before_spbo_without_changing_the_weights():
    W, H = _problem(rows=64, cols=256, seed=3)
    plain = compress_linear(W, H, 6, CompressionConfig.from_options(method="pbs2p"))
    reported = compress_linear(W, H, 6, CompressionConfig.from_options(method="pbs2p", spbo_report=True))
    assert torch.equal(plain.weight, reported.weight) and "rel_error_oneshot" not in plain.stats
    # SPBO's loss is <= one-shot prune-binarize block by block (test above), so the estimate is >= the error
    assert reported.stats["rel_error_oneshot"] >= reported.rel_error > 0
    arb = compress_linear(W, H, 8, CompressionConfig.from_options(method="arb", spbo_report=True))
    assert "rel_error_oneshot" not in arb.stats  # nothing is pruned: there is no "before SPBO"


@pytest.mark.parametrize("layout", ["full", "shared", "lean"])
@pytest.mark.parametrize("allocation", ["block", "linear"])
def test_scale_refit_is_the_joint_least_squares_optimum(layout, allocation):
    """Masks and signs kept; per row, the refit's error equals a direct least-squares solve over every scale's
    ±1/0 pattern (up to fp16 rounding of the scales), and is never above the per-block ARB scales'. With the
    salient budget over the linear, some blocks have no salient columns (and no salient scales)."""
    cfg = CompressionConfig.from_options(
        scale_layout=layout, salient_allocation=allocation, scale_refit=False, block_size=64
    )
    W, H = _problem(rows=6, cols=192)
    W[:, 70:74] *= 20  # outlier columns in block 1: the linear's salient budget goes there
    res = compress_linear(W, H, 6, cfg)
    spans = column_blocks(192, 64)
    before = layer_error(W, res.weight, H)
    new, Q, error = refit_scales(W, H, (res.blocks, res.weight, before), spans, 0.01, "fp16")
    assert all(
        torch.equal(a.mask, b.mask) and torch.equal(a.sign, b.sign) for a, b in zip(res.blocks, new, strict=True)
    )
    assert torch.equal(Q, torch.cat([b.dense() for b in new], 1))
    assert error == layer_error(W, Q, H) < before
    Hd = (H + 0.01 * torch.diag(H).mean() * torch.eye(192)).double()
    for r in range(W.shape[0]):
        cols = []
        for (s, e), code in zip(spans, res.blocks, strict=True):
            for name in code.scales:
                one = dataclasses.replace(code, scales={k: torch.zeros_like(v) for k, v in code.scales.items()})
                one.scales[name] = torch.ones_like(code.scales[name])
                v = torch.zeros(192, dtype=torch.float64)
                v[s:e] = one.dense()[r].double()
                cols.append(v)
        D = torch.stack(cols, 1)  # (C, P): the row's Ŵ is D @ scales
        w = W[r].double()
        best = D @ torch.linalg.pinv(D.T @ Hd @ D) @ (D.T @ Hd @ w)  # D may be rank-deficient (mu_s, mu_r)
        opt, got = float((best - w) @ Hd @ (best - w)), float((Q[r].double() - w) @ Hd @ (Q[r].double() - w))
        assert opt <= got <= opt * 1.001 + 1e-12


def test_scale_refit_is_on_by_default_and_lowers_the_error():
    W, H = _problem(cols=256)
    on = compress_linear(W, H, 6, CompressionConfig())
    off = compress_linear(W, H, 6, CompressionConfig.from_options(scale_refit=False))
    assert on.rel_error < off.rel_error
    assert all(
        torch.equal(a.mask, b.mask) and torch.equal(a.sign, b.sign) for a, b in zip(on.blocks, off.blocks, strict=True)
    )
    # the full layout's mu_r is folded into mu_s and not stored: fewer scale bits, the rest unchanged
    salient = [i for i, b in enumerate(off.blocks) if b.salient.numel()]
    assert salient and all("mu_r" in off.blocks[i].scales and "mu_r" not in on.blocks[i].scales for i in salient)
    bits_on, bits_off = (count_bits(r.blocks, 6, 8, 5) for r in (on, off))
    assert bits_off.scale_bits - bits_on.scale_bits == len(salient) * W.shape[0] * SCALE_BITS
    assert bits_on.sign_bits == bits_off.sign_bits and bits_on.residual_bits == bits_off.residual_bits


def test_scale_refit_leaves_arb_rc_as_it_is():
    """ARB-RC's Ŵ = α_row ⊙ α_col ⊙ B is not linear in its scales: no refit."""
    W, H = _problem(cols=128)
    on = compress_linear(W, H, 6, CompressionConfig.from_options(arb_variant="arb-rc", salient_columns=0))
    off = compress_linear(
        W, H, 6, CompressionConfig.from_options(arb_variant="arb-rc", salient_columns=0, scale_refit=False)
    )
    assert torch.equal(on.weight, off.weight)


# ---------------------------------------------------------------------- rows in chunks, Hessians in shards


def test_row_chunks_are_fixed_by_the_config_not_the_workers():
    cfg = CompressionConfig.from_options(row_chunk=256)
    assert row_chunks(600, cfg) == [(0, 256), (256, 512), (512, 600)]
    assert row_chunks(100, cfg) == [(0, 100)]
    # choices that look at every row of a column block solve the linear whole
    for opts in ({"salient_allocation": "block"}, {"arb_variant": "arb-rc", "salient_columns": 0}):
        assert row_chunks(600, cfg.replace(**opts)) == [(0, 600)]


def test_rows_solve_independently_of_the_other_rows():
    """A chunk's rows solved alone (as a worker does) are bit for bit those rows of the whole linear's result, and
    the whole equals compress_linear; the chunked error is the whole error, summed in row order."""
    W, H = _problem(rows=96, cols=256)
    cfg = CompressionConfig.from_options(row_chunk=32, spbo_report=True)
    whole = compress_linear(W, H, 6, cfg)
    prep = prepare_linear(W, H, cfg)
    parts = [solve_rows(W[r0:r1], prep, 6, cfg) for r0, r1 in reversed(row_chunks(96, cfg))][::-1]  # any order
    merged = merge_rows(parts, prep, 6, cfg)
    assert torch.equal(merged.weight, whole.weight) and merged.rel_error == whole.rel_error
    assert merged.stats == whole.stats and "rel_error_oneshot" in merged.stats
    alone = solve_rows(W[32:64].clone(), prepare_linear(W, H, cfg), 6, cfg)
    assert torch.equal(alone.weight, whole.weight[32:64])
    for b, code in enumerate(whole.blocks):
        assert torch.equal(code.sign[32:64], alone.blocks[b].sign) and torch.equal(
            code.salient, alone.blocks[b].salient
        )
    # the error is the layer's own objective over all rows (rows are independent, so the sum is exact)
    assert merged.rel_error == pytest.approx(layer_error(W, whole.weight, H) / prep.total, rel=1e-4)


def test_chunked_rows_cost_no_quality():
    """Row chunks change only the order of sums and where the scale refit is accepted: the error stays put."""
    W, H = _problem(rows=256, cols=256, seed=3)
    cfg = CompressionConfig()
    one = compress_linear(W, H, 6, cfg.replace(row_chunk=256)).rel_error
    many = compress_linear(W, H, 6, cfg.replace(row_chunk=16)).rel_error
    assert many == pytest.approx(one, rel=0.02)


def test_shard_sums_give_h_whatever_the_grouping_of_shards():
    """H = 2/T · Σ x xᵀ over a fixed tree of shard indices: any split of the shards into contiguous ranges (one per
    worker), each summing the subtrees it holds whole, gives the bits of the whole tree."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 5, 16, generator=g) for _ in range(7)]  # 7 shards of (windows, tokens, features)

    def leaf(s: int) -> HessianSum:
        acc = HessianSum(16)
        for batch in xs[s].split(2):  # batches inside a shard, in order
            acc.add_batch(batch)
        return acc

    whole = tree_sum(0, 7, leaf, HessianSum.plus)
    X = torch.cat([x.reshape(-1, 16) for x in xs])
    assert whole.tokens == 105
    assert torch.allclose(whole.hessian(), 2 * X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)
    for workers in (1, 2, 3, 4, 7, 9):
        nodes = {}
        for k in range(workers):
            a, b = k * 7 // workers, (k + 1) * 7 // workers
            for lo, hi in tree_cover(0, 7, a, b):
                nodes[(lo, hi)] = tree_sum(lo, hi, leaf, HessianSum.plus)
        assert sorted(s for lo, hi in nodes for s in range(lo, hi)) == list(range(7))  # every shard once

        def missing(s: int) -> HessianSum:
            raise AssertionError(s)

        known = {span: (lambda acc=acc: acc) for span, acc in nodes.items()}
        total = tree_sum(0, 7, missing, HessianSum.plus, known)
        assert torch.equal(total.S, whole.S) and total.tokens == whole.tokens
