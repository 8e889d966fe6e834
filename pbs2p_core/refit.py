"""Scale refit: with every mask and sign plane of a linear fixed, its scales solved jointly against the layer's
own objective ‖(W − Ŵ) X‖² = tr(ΔW H ΔWᵀ).

Ŵ is linear in the scales (α, μ, α_s, μ_s, α_r, μ_r of every column block), so per output row this is a small
least-squares problem (5 unknowns per column block at most) with an exact solution. The column-block loop fits
each block's scales to the error-compensated weights in the plain (unweighted) norm, one block at a time; the
refit replaces them by the joint optimum for the original weights under H. The masks, signs and storage layout
stay, except that the full layout's μ_r is folded into μ_s and no longer stored.
"""

from __future__ import annotations

import dataclasses

import torch

from .binarize import BlockCode, round_scale

# the scales whose coefficient is a fixed ±1/0 pattern; "mu_r" duplicates "mu_s" (both multiply the salient
# kept set) in the full layout, so there it is folded into mu_s and not stored (R fp16 values less per block)
_KINDS = ("alpha", "mu", "alpha_s", "mu_s", "alpha_r", "mu_r")


def _names(code: BlockCode) -> list[str]:
    """The block's scales that the refit solves for, in a fixed order."""
    return [k for k in _KINDS if k in code.scales and not (k == "mu_r" and "alpha_s" in code.scales)]


def _basis(code: BlockCode, rows: slice, names: list[str] | None = None) -> torch.Tensor:
    """V (r, k, c) with Ŵ_b[rows] = Σ_k scale_k[rows, None] · V[:, k, :], k over `names` (default `_names(code)`)."""
    s, mask = code.scales, code.mask[rows].to(code.scales["alpha"].dtype)
    c = mask.shape[1]
    B = code.sign[rows].to(mask.dtype) * 2 - 1
    sal = torch.zeros(c, dtype=mask.dtype, device=mask.device)
    sal[code.salient] = 1.0
    B2 = torch.zeros_like(B)
    B2[:, code.salient] = code.sign2[rows].to(B.dtype) * 2 - 1
    own = "alpha_s" in s
    rest = 1.0 - sal if own else torch.ones_like(sal)
    patterns = {
        "alpha": B * mask * rest,
        "mu": mask * rest,
        "alpha_s": B * mask * sal,
        "mu_s": mask * sal,
        "alpha_r": B2 * mask * sal,
        "mu_r": mask * sal,
    }
    return torch.stack([patterns[k] for k in (names or _names(code))], 1)


def layer_error(W0: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) = ‖W0 X − Q X‖² for H = X Xᵀ."""
    delta = Q - W0
    return float(torch.einsum("rc,cd,rd->", delta, H, delta))


def refit_scales(
    W0: torch.Tensor,
    H: torch.Tensor,
    fitted: tuple[list[BlockCode], torch.Tensor, float],
    spans: list[tuple[int, int]],
    damping: float,
    dtype: str,
) -> tuple[list[BlockCode], torch.Tensor, float]:
    """(blocks, Ŵ, layer error) with every scale re-solved jointly per row (see the module doc); masks and signs
    unchanged. `fitted` is the same triple before the refit, returned as it is if the rounded refit is not better.

    H is damped as in the solver (λ · mean diag H on the diagonal). ARB-RC codes (row × column scales, not
    linear in them) are returned unchanged."""
    blocks = fitted[0]
    if any("alpha_col" in b.scales for b in blocks):
        return fitted
    Hd = H + damping * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    names = [_names(b) for b in blocks]
    P = sum(len(n) for n in names)
    R, C = W0.shape
    x = torch.empty(R, P, dtype=W0.dtype, device=W0.device)
    step = max(1, 2**25 // (P * C))  # rows per chunk: bounds the (rows, P, C) tensors at 128 MB each
    for r0 in range(0, R, step):
        rows = slice(r0, min(r0 + step, R))
        VH = torch.zeros(rows.stop - r0, P, C, dtype=W0.dtype, device=W0.device)  # (V Hd) per row
        G = torch.zeros(rows.stop - r0, P, P, dtype=torch.float64, device=W0.device)
        V = [_basis(b, rows) for b in blocks]  # V is block-sparse: block b's scales act on its span only
        p = 0
        for (s, e), Vb in zip(spans, V, strict=True):
            VH[:, p : p + Vb.shape[1]] = Vb @ Hd[s:e]
            p += Vb.shape[1]
        p = 0
        for (s, e), Vb in zip(spans, V, strict=True):
            G[:, :, p : p + Vb.shape[1]] = torch.einsum("rpc,rkc->rpk", VH[:, :, s:e], Vb).double()
            p += Vb.shape[1]
        rhs = torch.einsum("rpc,rc->rp", VH, W0[rows]).double()
        diag = torch.diagonal(G, dim1=1, dim2=2)
        ridge = 1e-9 * diag.mean(1, keepdim=True).clamp_min(1e-30) + (diag == 0).double()  # unused scales -> 0
        sol = torch.linalg.solve(G + torch.diag_embed(ridge.expand_as(diag)), rhs.unsqueeze(-1)).squeeze(-1)
        x[rows] = sol.to(W0.dtype)
    new, p = [], 0
    for b, solved in zip(blocks, names, strict=True):
        scales = dict(b.scales)
        for j, name in enumerate(solved):
            scales[name] = round_scale(x[:, p + j], dtype)
        if "mu_r" not in solved:
            scales.pop("mu_r", None)  # folded into mu_s (the decoder adds 0 when a block has no mu_r)
        p += len(solved)
        new.append(dataclasses.replace(b, scales=scales))
    Q = torch.cat([b.dense() for b in new], 1)
    error = layer_error(W0, Q, H)
    return (new, Q, error) if error < fitted[2] else fitted
