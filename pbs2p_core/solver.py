"""One linear layer: GPTQ-style column blocks with error compensation, N:M masks, SPBO, ARB (or, for method
"gptq", the integer baseline of `gptq.py` on the same Hessian, damping and row chunks).

`compress_linear(W, H, n_keep, cfg)` is the per-linear task: pure function, new tensors out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .binarize import ArbFit, BlockCode, binarize_block
from .config import CompressionConfig
from .errors import Pbs2pError
from .gptq import IntCode, cat_codes, column_order, quantize_rows
from .hessian import InverseFactor, inverse_cholesky
from .refit import layer_error, refit_scales


@dataclass
class LinearResult:
    weight: torch.Tensor  # (R, C) Ŵ, dense, exactly what the stored code decodes to
    blocks: list[BlockCode]  # one per column block, in order
    n_keep: int  # N of the N:M pattern used (M when dense)
    rel_error: float  # ‖WX − ŴX‖² / ‖WX‖² on the calibration inputs (= tr(ΔW H ΔWᵀ) / tr(W H Wᵀ))
    damping: float
    retries: int
    stats: dict[str, float] = field(default_factory=dict)
    intcode: IntCode | None = None  # method gptq: the integer code (then `blocks` is empty)


def split_steps(prune: int, tau: int) -> list[int]:
    """How many weights per group each SPBO step prunes: `prune` spread over `tau` steps, larger first."""
    return [prune // tau + (1 if t < prune % tau else 0) for t in range(tau)]


def column_blocks(columns: int, block_size: int) -> list[tuple[int, int]]:
    """[start, end) of each column block of block_size (the last one may be shorter)."""
    return [(s, min(s + block_size, columns)) for s in range(0, columns, block_size)]


def salient_per_block(
    W: torch.Tensor, d: torch.Tensor, spans: list[tuple[int, int]], per_block: int
) -> list[torch.Tensor]:
    """Salient columns allocated over the whole linear: the same budget (per_block × blocks) goes to the
    columns of highest OBS score Σ_rows w² / d² anywhere, so a block with many outlier columns gets more and
    a quiet block may get none (then it stores no salient scales). At most half of a block is salient."""
    score = (W * W).sum(0) / (d * d)  # (C,)
    order = score.argsort(descending=True, stable=True)
    budget = per_block * len(spans)
    chosen: list[list[int]] = [[] for _ in spans]
    starts = torch.tensor([s for s, _ in spans])
    for j in order.tolist():  # a loop over at most `budget` + capped columns, not over rows or groups
        if budget == 0:
            break
        b = int((starts <= j).sum()) - 1
        s, e = spans[b]
        if len(chosen[b]) < (e - s) // 2:
            chosen[b].append(j - s)
            budget -= 1
    return [torch.tensor(sorted(c), dtype=torch.long, device=W.device) for c in chosen]


def prune_lowest(score: torch.Tensor, K: torch.Tensor, count: int, m: int) -> torch.Tensor:
    """New kept set: in every group of m columns per row, drop the `count` kept entries of lowest score."""
    R, C = score.shape
    s = score.masked_fill(~K, float("inf")).view(R, C // m, m)
    drop = s.sort(dim=-1, stable=True).indices[..., :count]  # (R, G, count)
    keep = K.clone().view(R, C // m, m)
    keep.scatter_(-1, drop, False)
    return keep.view(R, C)


def nm_mask(score: torch.Tensor, n_keep: int, m: int) -> torch.Tensor:
    """Keep the n_keep highest-scoring entries in every group of m consecutive columns, per row."""
    full = torch.ones_like(score, dtype=torch.bool)
    return prune_lowest(score, full, m - n_keep, m)


def _obs_loss(delta: torch.Tensor, Ubb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Err with Err · U_bb = ΔW_b (exact OBS compensation of fixing the block at once), and its loss."""
    err = torch.linalg.solve_triangular(Ubb, delta, upper=True, left=False)
    return err, (err * err).sum()


def _code_block(
    Wb: torch.Tensor,
    d: torch.Tensor,
    hdiag: torch.Tensor,
    Sbb: torch.Tensor,
    Ubb: torch.Tensor,
    n_keep: int,
    salient: torch.Tensor | int,
    cfg: CompressionConfig,
) -> BlockCode:
    """Mask + binarization of one column block (Wb already compensated by earlier blocks).

    `salient`: the block's salient column indices, or how many to pick by the block's OBS score."""
    R, C = Wb.shape
    m = cfg.pattern.m
    obs = Wb * Wb / (d * d)[None, :]  # OBS score w² / d², the fine-stage score
    if isinstance(salient, int):
        salient = torch.sort(obs.sum(0).topk(salient).indices).values
    S = None
    if cfg.ablations.arb_variant == "arb-x":
        S = Sbb
    elif cfg.ablations.arb_variant == "arb-obs":  # ‖Err‖² = ΔW (U_bbᵀ U_bb)⁻¹ ΔWᵀ per row
        S = torch.cholesky_inverse(Ubb.T)

    def fit(K: torch.Tensor, warm: dict[str, ArbFit] | None = None) -> tuple[BlockCode, dict[str, ArbFit]]:
        return binarize_block(
            Wb,
            K,
            salient,
            cfg.ablations.arb_iters,
            cfg.ablations.arb_variant,
            cfg.ablations.scale_dtype,
            S,
            warm,
            cfg.scale_layout,
        )

    K = torch.ones(R, C, dtype=torch.bool, device=Wb.device)
    if not cfg.prunes or n_keep >= m:
        return fit(K)[0]
    steps = split_steps(m - n_keep, cfg.tau)
    if cfg.method == "prune-binarize" or cfg.ablations.spbo_mode == "fixed":
        # mask chosen once (OBS or Wanda |w|·‖x_j‖), then pruned by rank in τ steps (τ = 1: prune, binarize)
        score = obs if cfg.ablations.mask_score == "obs" else Wb.abs() * hdiag.clamp_min(0).sqrt()[None, :]
        rank = score.view(R, C // m, m).argsort(dim=-1, stable=True).argsort(dim=-1).view(R, C)
        code, fits, done = None, None, 0
        for r in steps:
            done += r
            code, fits = fit(rank >= done, fits)
        assert code is not None
        return code
    # SPBO, binarization-aware: binarize first, then each step prunes, per group, the kept weights whose
    # removal costs least compared with keeping their current binarized value, and re-fits ARB.
    code, fits = fit(K)
    for r in steps:
        q = code.dense()
        cost = (Wb * Wb - (Wb - q) ** 2) / (d * d)[None, :]
        K = prune_lowest(cost, code.mask, r, m)
        code, fits = fit(K, fits)
    return code


@dataclass
class LinearPrep:
    """What every row of a linear shares: H, the inverse factor, the dead inputs, the salient columns (chosen over
    all rows) and tr(W H Wᵀ). Computed once per linear; the rows are then solved in chunks (`solve_rows`)."""

    H: torch.Tensor  # (C, C) fp32
    U: torch.Tensor  # (C, C) upper Cholesky factor of H⁻¹
    dead: torch.Tensor  # (C,) bool
    damping: float
    retries: int
    salient: list[torch.Tensor] | None  # per column block (allocation "linear"), else None: chosen per block
    total: float  # tr(W H Wᵀ): the denominator of rel_error
    perm: torch.Tensor | None = None  # gptq act-order: the columns' visiting order (U is then of H permuted)


@dataclass
class RowsResult:
    """Rows [r0, r1) of a linear, solved: their Ŵ, their part of every column block's code, their errors."""

    weight: torch.Tensor  # (r, C)
    blocks: list[BlockCode]
    error: float  # tr(ΔW H ΔWᵀ) over these rows
    loss_spbo: float
    loss_oneshot: float
    intcode: IntCode | None = None  # method gptq


def check_shape(W: torch.Tensor, cfg: CompressionConfig) -> None:
    C = W.shape[1]
    if cfg.method == "gptq":
        return  # any width: the last group may be shorter
    if C % cfg.pattern.m:
        raise Pbs2pError(f"in_features={C} is not divisible by M={cfg.pattern.m}; use a pattern whose M divides {C}")


def prepare_linear(
    W: torch.Tensor, H: torch.Tensor, cfg: CompressionConfig, inv: InverseFactor | None = None
) -> LinearPrep:
    """The state of linear W (out, in) that needs all its rows, from its calibration Hessian H (in, in)."""
    check_shape(W, cfg)
    H = H.to(W.device, torch.float32)
    perm = column_order(H, cfg.gptq_act_order) if cfg.method == "gptq" else None
    if perm is not None:  # the group's factor is of H in natural order; act-order needs that of H permuted
        inv = inverse_cholesky(H[perm][:, perm], cfg.damping)
        inv.dead = inv.dead[torch.argsort(perm)]
    inv = inv or inverse_cholesky(H, cfg.damping)
    W0 = W.to(torch.float32)
    salient = None
    if cfg.ablations.salient_allocation == "linear" and cfg.method != "gptq":
        Wd = W0.clone()
        Wd[:, inv.dead] = 0.0
        spans = column_blocks(W.shape[1], cfg.block_size)
        salient = salient_per_block(Wd, torch.diag(inv.U), spans, cfg.salient_columns)
    total = float(torch.einsum("rc,cd,rd->", W0, H, W0))
    return LinearPrep(H, inv.U, inv.dead, inv.damping, inv.retries, salient, total, perm)


def row_chunks(rows: int, cfg: CompressionConfig) -> list[tuple[int, int]]:
    """[r0, r1) of the row chunks solved independently: `row_chunk` rows each, the same at any worker count.
    Settings whose choices look at all rows of a column block at once (a salient count picked per block, ARB-RC's
    column scales) solve the linear as one chunk."""
    a = cfg.ablations
    whole = a.salient_allocation != "linear" or bool(a.salient_search) or a.arb_variant == "arb-rc"
    step = rows if whole else cfg.row_chunk
    return [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]


def solve_rows(W: torch.Tensor, prep: LinearPrep, n_keep: int, cfg: CompressionConfig) -> RowsResult:
    """Rows W (r, C) of a linear: GPTQ column blocks with error compensation, each block masked and binarized.
    Each row's error compensation involves only that row, so rows solve independently given `prep`."""
    C = W.shape[1]
    H, U = prep.H.to(W.device), prep.U.to(W.device)
    W0 = W.to(torch.float32)
    W = W0.clone()
    W[:, prep.dead.to(W.device)] = 0.0
    if cfg.method == "gptq":
        perm = prep.perm.to(W.device) if prep.perm is not None else None
        intcode = quantize_rows(W, U, perm, cfg)
        Q = intcode.dense()
        return RowsResult(Q, [], layer_error(W0, Q, H), 0.0, 0.0, intcode)
    hdiag = torch.diag(H)
    Q = torch.zeros_like(W)
    blocks: list[BlockCode] = []
    spans = column_blocks(C, cfg.block_size)
    candidates: list[torch.Tensor | int] = [min(k, cfg.block_size // 2) for k in cfg.ablations.salient_search]
    # "before SPBO" (config spbo_report): one-shot prune-then-binarize of the same compensated block
    oneshot = (
        cfg.replace(method="prune-binarize", spbo_report=False) if cfg.ablations.spbo_report and cfg.prunes else None
    )
    loss_spbo = loss_oneshot = 0.0
    for b, (s, e) in enumerate(spans):
        Wb, Ubb = W[:, s:e], U[s:e, s:e]
        d = torch.diag(Ubb)
        best = None
        if prep.salient is not None:
            candidates = [prep.salient[b].to(W.device)]
        elif not cfg.ablations.salient_search:
            candidates = [min(cfg.salient_columns, (e - s) // 2)]
        for k in candidates:  # a searched salient count keeps the code of least OBS loss
            code = _code_block(Wb, d, hdiag[s:e], H[s:e, s:e], Ubb, n_keep, k, cfg)
            if cfg.ablations.column_feedback:
                code, err = _column_feedback(Wb, Ubb, code)
                loss = (err * err).sum()
            else:
                err, loss = _obs_loss(Wb - code.dense(), Ubb)
            if best is None or loss < best[0]:
                best = (loss, code, err)
        assert best is not None
        loss, code, err = best
        if oneshot is not None:
            first = _code_block(Wb, d, hdiag[s:e], H[s:e, s:e], Ubb, n_keep, code.salient, oneshot)
            loss_oneshot += float(_obs_loss(Wb - first.dense(), Ubb)[1])
            loss_spbo += float(loss)
        Q[:, s:e] = code.dense()
        W[:, e:] -= err @ U[s:e, e:]  # push the block's error onto later columns (GPTQ)
        blocks.append(code)
    error = layer_error(W0, Q, H)
    if cfg.ablations.scale_refit:
        blocks, Q, error = refit_scales(W0, H, (blocks, Q, error), spans, prep.damping, cfg.ablations.scale_dtype)
    return RowsResult(Q, blocks, error, loss_spbo, loss_oneshot)


def _cat_codes(parts: list[BlockCode]) -> BlockCode:
    """One column block's code from its row chunks' codes (same columns, salient set and scale names)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    scales = {k: torch.cat([p.scales[k] for p in parts]) for k in first.scales}
    return BlockCode(
        torch.cat([p.mask for p in parts]),
        torch.cat([p.sign for p in parts]),
        first.salient,
        torch.cat([p.sign2 for p in parts]),
        scales,
    )


def merge_rows(parts: list[RowsResult], prep: LinearPrep, n_keep: int, cfg: CompressionConfig) -> LinearResult:
    """The linear's result from its row chunks in row order (sums in that order: the same at any worker count)."""
    weight = parts[0].weight if len(parts) == 1 else torch.cat([p.weight for p in parts])
    codes = [p.intcode for p in parts if p.intcode is not None]
    intcode = cat_codes(codes) if codes else None
    blocks = [_cat_codes([p.blocks[b] for p in parts]) for b in range(len(parts[0].blocks))]
    error = loss_spbo = loss_oneshot = 0.0
    for p in parts:
        error, loss_spbo, loss_oneshot = error + p.error, loss_spbo + p.loss_spbo, loss_oneshot + p.loss_oneshot
    rel = error / max(prep.total, 1e-30)
    stats = {}
    if cfg.ablations.spbo_report and cfg.prunes:  # the exact error scaled by the blocks' OBS-loss ratio
        stats["rel_error_oneshot"] = rel * loss_oneshot / max(loss_spbo, 1e-30)
    m = cfg.pattern.m
    n = n_keep if cfg.prunes else m
    return LinearResult(weight, blocks, n, rel, prep.damping, prep.retries, stats, intcode)


def compress_linear(W: torch.Tensor, H: torch.Tensor, n_keep: int, cfg: CompressionConfig) -> LinearResult:
    """Compress one weight W (out, in) given its calibration Hessian H (in, in); N:M with N = n_keep.
    The rows are solved in the fixed chunks of `row_chunks`, here one after the other (a Ray job spreads them)."""
    prep = prepare_linear(W, H, cfg)
    parts = [solve_rows(W[r0:r1], prep, n_keep, cfg) for r0, r1 in row_chunks(W.shape[0], cfg)]
    return merge_rows(parts, prep, n_keep, cfg)


def oneshot_linear(W: torch.Tensor, H: torch.Tensor, n_keep: int, cfg: CompressionConfig) -> torch.Tensor:
    """A quick Ŵ for the CFS error score: one-shot prune-then-binarize of every column block with no error
    compensation between blocks (no GPTQ loop): a cheap, consistent estimate of how a block's error moves
    with N, not the compressed weights."""
    R, C = W.shape
    W = W.to(torch.float32).clone()
    H = H.to(W.device, torch.float32)
    inv = inverse_cholesky(H, cfg.damping)
    W[:, inv.dead] = 0.0
    hdiag = torch.diag(H)
    spans = column_blocks(C, cfg.block_size)
    if cfg.ablations.salient_allocation == "linear":
        salient: list[torch.Tensor | int] = list(salient_per_block(W, torch.diag(inv.U), spans, cfg.salient_columns))
    else:
        salient = [min(cfg.salient_columns, (e - s) // 2) for s, e in spans]
    quick = cfg.replace(method="prune-binarize", spbo_report=False)
    Q = torch.empty_like(W)
    for (s, e), k in zip(spans, salient, strict=True):
        Ubb = inv.U[s:e, s:e]
        Q[:, s:e] = _code_block(W[:, s:e], torch.diag(Ubb), hdiag[s:e], H[s:e, s:e], Ubb, n_keep, k, quick).dense()
    return Q


def _column_feedback(Wb: torch.Tensor, Ubb: torch.Tensor, code: BlockCode) -> tuple[BlockCode, torch.Tensor]:
    """GPTQ's per-column feedback inside the block: mask and scales fixed, signs re-chosen column by column
    on the compensated weights. Returns the new code and Err (R, C) with Err · U_bb = W_b − Q_b."""
    R, C = Wb.shape
    W = Wb.clone()
    sign, sign2 = code.sign.clone(), code.sign2.clone()
    sal_pos = {int(c): i for i, c in enumerate(code.salient.tolist())}
    s = code.scales
    err = torch.zeros_like(W)
    for j in range(C):  # a loop over columns, as in GPTQ; rows and groups stay vectorised
        w = W[:, j]
        if j in sal_pos:
            a1, m1 = s.get("alpha_s", s["alpha"]), s.get("mu_s", s["mu"])
            b1 = ((w - m1) >= 0) == (a1 >= 0)
            q1 = a1 * (b1.to(w.dtype) * 2 - 1) + m1
            m2 = s.get("mu_r", torch.zeros_like(m1))
            b2 = ((w - q1 - m2) >= 0) == (s["alpha_r"] >= 0)
            q = q1 + s["alpha_r"] * (b2.to(w.dtype) * 2 - 1) + m2
            sign[:, j], sign2[:, sal_pos[j]] = b1, b2
        elif "alpha_col" in s:
            b1 = w >= 0
            q = s["alpha"] * s["alpha_col"][j] * (b1.to(w.dtype) * 2 - 1)
            sign[:, j] = b1
        else:
            b1 = ((w - s["mu"]) >= 0) == (s["alpha"] >= 0)
            q = s["alpha"] * (b1.to(w.dtype) * 2 - 1) + s["mu"]
            sign[:, j] = b1
        q = q * code.mask[:, j]
        err[:, j] = (w - q) / Ubb[j, j]
        W[:, j + 1 :] -= err[:, j : j + 1] * Ubb[j, j + 1 :][None, :]
    new = BlockCode(code.mask, sign, code.salient, sign2, code.scales)
    return new, err
