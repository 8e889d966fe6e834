"""ARB binarization on a kept set, and a column block's full 1-bit code (salient residual included).

Shapes: W (R, C) = (rows of the block, its columns); K (R, C) bool kept set. Everything is per row and
vectorised over rows and columns; no Python loop over rows or groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _sign(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, as a float tensor of ±1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


@dataclass
class ArbFit:
    alpha: torch.Tensor  # (R,)
    mu: torch.Tensor  # (R,)
    B: torch.Tensor  # (R, C) ±1 (only meaningful where K)


def arb_error(W: torch.Tensor, K: torch.Tensor, fit: ArbFit) -> torch.Tensor:
    """‖K ⊙ (W − (αB + μ))‖² per row, shape (R,)."""
    r = (W - (fit.alpha[:, None] * fit.B + fit.mu[:, None])) * K
    return (r * r).sum(1)


def arb(
    W: torch.Tensor,
    K: torch.Tensor,
    iters: int,
    warm: ArbFit | None = None,
    S: torch.Tensor | None = None,
    trace: list[torch.Tensor] | None = None,
    fit_mu: bool = True,
) -> ArbFit:
    """Alternating refined binarization: min ‖K ⊙ (W − (αB + μ))‖² per row, closed-form alternation.

    S (C, C), when given, is the block of H: α, μ are then solved jointly against the calibration-weighted
    error r S rᵀ (ARB-X). `trace`, when given, receives the per-row error after every single update
    (used by the test that no update raises it). fit_mu=False keeps μ = 0 (Ŵ = αB).
    """
    Kf = K.to(W.dtype)
    nKf = -Kf
    cnt = Kf.sum(1)
    safe = cnt.clamp_min(1)
    sW = (W * Kf).sum(1)
    if warm is None:
        mu = sW / safe if fit_mu else W.new_zeros(W.shape[0])
        alpha = ((W - mu[:, None]).abs() * Kf).sum(1) / safe
    else:
        alpha, mu = warm.alpha.clone(), warm.mu.clone()

    def signs(mu: torch.Tensor, alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K ⊙ B with B = sign(W − μ) · sign(α), and its row sums Σ_K B, Σ_K B·W (all ARB needs of B)."""
        BK = torch.where(W >= mu[:, None], Kf, nKf) * _sign(alpha)[:, None]
        return BK, BK.sum(1), (BK * W).sum(1)

    def record() -> None:
        if trace is not None:
            B = _sign(W - mu[:, None]) * _sign(alpha)[:, None]
            trace.append(arb_error(W, K, ArbFit(alpha, mu, B)))

    BK, sB, sBW = signs(mu, alpha)
    record()
    for _ in range(iters):
        if S is None or not fit_mu:
            if fit_mu:
                mu = (sW - alpha * sB) / safe  # mean_K (W − αB)
                record()
            alpha = (sBW - mu * sB) / safe  # mean_K B (W − μ), B² = 1
            record()
        else:
            alpha, mu = _weighted_scales(W, Kf, BK, S, alpha, mu)
        BK, sB, sBW = signs(mu, alpha)
        record()
    empty = cnt == 0
    alpha = torch.where(empty, 0.0, alpha)
    mu = torch.where(empty, 0.0, mu)
    return ArbFit(alpha, mu, _sign(W - mu[:, None]) * _sign(alpha)[:, None])


def _weighted_scales(
    W: torch.Tensor, Kf: torch.Tensor, B: torch.Tensor, S: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """ARB-X: per row, (α, μ) = argmin r S rᵀ with r = K ⊙ (W − αB − μ): a 2×2 normal system per row."""
    b, k, w = B * Kf, Kf, W * Kf
    Sb, Sk = b @ S, k @ S
    a11, a12, a22 = (b * Sb).sum(1), (b * Sk).sum(1), (k * Sk).sum(1)
    r1, r2 = (w * Sb).sum(1), (w * Sk).sum(1)
    det = a11 * a22 - a12 * a12
    ok = det.abs() > 1e-12 * (a11 * a22).abs().clamp_min(1e-30)
    new_alpha = (r1 * a22 - r2 * a12) / torch.where(ok, det, 1.0)
    new_mu = (a11 * r2 - a12 * r1) / torch.where(ok, det, 1.0)
    return torch.where(ok, new_alpha, alpha), torch.where(ok, new_mu, mu)


def arb_rc(W: torch.Tensor, K: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ARB-RC: Ŵ = α_row ⊙ α_col ⊙ sign(W) on K (no μ). Returns (α_row (R,), α_col (C,), B)."""
    Kf = K.to(W.dtype)
    A = W.abs() * Kf
    B = _sign(W)
    a_col = torch.ones(W.shape[1], dtype=W.dtype, device=W.device)
    a_row = A.sum(1) / Kf.sum(1).clamp_min(1)
    for _ in range(iters):
        a_col = (A * a_row[:, None]).sum(0) / ((a_row[:, None] ** 2) * Kf).sum(0).clamp_min(1e-30)
        a_row = (A * a_col[None, :]).sum(1) / ((a_col[None, :] ** 2) * Kf).sum(1).clamp_min(1e-30)
    return a_row, a_col, B


def round_scale(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """The value a scale has once stored (fp16 or bf16); the model always uses the stored value."""
    return x.to(torch.float16 if dtype == "fp16" else torch.bfloat16).to(x.dtype)


@dataclass
class BlockCode:
    """Everything stored for one column block of one linear (what the artifact packs)."""

    mask: torch.Tensor  # (R, C) bool, kept weights
    sign: torch.Tensor  # (R, C) bool, first sign plane (True = +1)
    salient: torch.Tensor  # (k,) long, salient column indices within the block (sorted)
    sign2: torch.Tensor  # (R, k) bool, residual sign plane of the salient columns
    # per row (R,): alpha, mu [, alpha_s, mu_s], alpha_r [, mu_r] (see SCALE_LAYOUTS); ARB-RC: alpha, alpha_col (C,)
    scales: dict[str, torch.Tensor]

    def dense(self) -> torch.Tensor:
        """Ŵ of the block, (R, C), from the stored (rounded) values only."""
        s = self.scales
        B = self.sign.to(s["alpha"].dtype) * 2 - 1
        if "alpha_col" in s:  # ARB-RC
            Q = s["alpha"][:, None] * s["alpha_col"][None, :] * B
        else:
            Q = s["alpha"][:, None] * B + s["mu"][:, None]
        if self.salient.numel():
            if "alpha_s" in s:  # layout "full": the salient columns' first plane has its own scales
                Q[:, self.salient] = s["alpha_s"][:, None] * B[:, self.salient] + s["mu_s"][:, None]
            B2 = self.sign2.to(B.dtype) * 2 - 1
            Q[:, self.salient] += s["alpha_r"][:, None] * B2 + (s["mu_r"][:, None] if "mu_r" in s else 0.0)
        return torch.where(self.mask, Q, 0.0)  # pruned weights are +0.0 (no stored sign)


def binarize_block(
    W: torch.Tensor,
    K: torch.Tensor,
    salient: torch.Tensor,
    iters: int,
    variant: str,
    scale_dtype: str,
    S: torch.Tensor | None = None,
    warm: dict[str, ArbFit] | None = None,
    layout: str = "full",
) -> tuple[BlockCode, dict[str, ArbFit]]:
    """1-bit code of a column block on kept set K.

    Layout "full": non-salient columns get one ARB fit per row (α, μ); salient columns their own fit
    (α_s, μ_s) plus a second ARB fit of its residual (α_r, μ_r) — Ŵ = α_s B₁ + μ_s + α_r B₂ + μ_r — on the
    same kept set. "shared": one (α, μ) fit over all columns, then the salient residual (α_r, μ_r).
    "lean": as shared, with the residual's μ_r = 0. Returns the code and the raw fits (SPBO warm start).
    """
    R, C = W.shape
    is_sal = torch.zeros(C, dtype=torch.bool, device=W.device)
    is_sal[salient] = True
    if variant == "arb-rc":
        a_row, a_col, B = arb_rc(W, K, iters)
        scales = {"alpha": round_scale(a_row, scale_dtype), "alpha_col": round_scale(a_col, scale_dtype)}
        empty = torch.zeros(R, 0, dtype=torch.bool, device=W.device)
        return BlockCode(K.clone(), B > 0, salient, empty, scales), {}
    warm = warm or {}
    own = layout == "full" and salient.numel() > 0  # salient columns have their own first-order scales
    main = ~is_sal if own else torch.ones_like(is_sal)
    Sn = S[main][:, main] if S is not None else None
    fit = arb(W[:, main], K[:, main], iters, warm.get("main"), Sn)
    sign = torch.ones(R, C, dtype=torch.bool, device=W.device)
    sign[:, main] = fit.B > 0
    scales = {"alpha": round_scale(fit.alpha, scale_dtype), "mu": round_scale(fit.mu, scale_dtype)}
    fits = {"main": fit}
    sign2 = torch.zeros(R, salient.numel(), dtype=torch.bool, device=W.device)
    if salient.numel():
        Ws, Ks = W[:, salient], K[:, salient]  # (R, k)
        Ss = S[salient][:, salient] if S is not None else None
        if own:
            f1 = arb(Ws, Ks, iters, warm.get("sal"), Ss)
            a1, m1 = round_scale(f1.alpha, scale_dtype), round_scale(f1.mu, scale_dtype)
            sign[:, salient] = f1.B > 0
            scales.update(alpha_s=a1, mu_s=m1)
            fits["sal"] = f1
        else:
            a1, m1 = scales["alpha"], scales["mu"]
        B1 = sign[:, salient].to(W.dtype) * 2 - 1
        resid = Ws - (a1[:, None] * B1 + m1[:, None])
        f2 = arb(resid, Ks, iters, warm.get("res"), Ss, fit_mu=layout != "lean")
        sign2 = f2.B > 0
        scales["alpha_r"] = round_scale(f2.alpha, scale_dtype)
        if layout != "lean":
            scales["mu_r"] = round_scale(f2.mu, scale_dtype)
        fits["res"] = f2
    return BlockCode(K.clone(), sign, salient, sign2, scales), fits
