"""The GPTQ baseline (`method` "gptq"): integer codes on a per-group min-max grid, column by column with the
inverse-Hessian error compensation (Frantar et al., 2022), for comparison with pbs2p on equal terms.

Per linear (rows independent given H): with act-order the columns are visited by descending diag(H), and a group is
`group_size` consecutive columns in that order (the artifact stores each column's group, `g_idx`); without it, in
their natural order. The last group is shorter when `group_size` does not divide the columns (576 = 4 × 128 + 64 in
SmolLM2-135M), as in the reference implementation. When a group starts, its grid is fitted to the current, already
compensated weights of its columns: asymmetric min-max over [min(w, 0), max(w, 0)] with 2^bits levels and an integer
zero point (or a symmetric grid around the middle level). Each column is rounded to the grid, its error divided by
U[j, j] and pushed onto the later columns through the upper Cholesky factor U of H⁻¹ (H damped as for every method,
`hessian.inverse_cholesky`); the pushes within a batch of `block_size` columns are applied column by column and onto
the later columns once per batch (lazy batch updates), the group fits seeing every push made so far. Scales are
rounded to their storage dtype before use, so `IntCode.dense()` is exactly what the artifact decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .binarize import round_scale
from .config import CompressionConfig


@dataclass
class IntCode:
    """Everything stored for an integer-coded linear (what the artifact packs)."""

    codes: torch.Tensor  # (R, C) uint8 in [0, 2^bits): the code of every weight, natural column order
    scales: torch.Tensor  # (R, G) compute dtype (float32), values exact in the storage dtype
    zeros: torch.Tensor  # (R, G) uint8 integer zero points (the middle level 2^(bits-1) when symmetric)
    g_idx: torch.Tensor | None  # (C,) long: each column's group (act-order); None: column // group_size
    bits: int
    group_size: int
    sym: bool

    @property
    def groups(self) -> int:
        return int(self.scales.shape[1])

    def group_of(self) -> torch.Tensor:
        """(C,) the group of every column."""
        C = self.codes.shape[1]
        if self.g_idx is not None:
            return self.g_idx
        return torch.arange(C, device=self.codes.device) // self.group_size

    def dense(self) -> torch.Tensor:
        """Ŵ = scale · (code − zero), in the scales' dtype: the normative decoding."""
        g = self.group_of()
        return self.scales[:, g] * (self.codes.to(self.scales.dtype) - self.zeros[:, g].to(self.scales.dtype))


def column_order(H: torch.Tensor, act_order: bool) -> torch.Tensor | None:
    """The visiting order of the columns: by descending diag(H) (ties by index) with act-order, else None."""
    if not act_order:
        return None
    return torch.argsort(torch.diag(H), descending=True, stable=True)


def group_count(C: int, group_size: int) -> int:
    """Groups of `group_size` columns over C columns, the last one possibly shorter."""
    return -(-C // group_size)


def fit_grid(w: torch.Tensor, bits: int, sym: bool, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale (R,), zero (R,) as exact integers in float) of the min-max grid of each row of w (R, g)."""
    maxq = 2**bits - 1
    lo = w.min(1).values.clamp(max=0)
    hi = w.max(1).values.clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    flat = (lo == 0) & (hi == 0)  # an all-zero group (dead inputs): any grid holding 0
    lo, hi = torch.where(flat, -1.0, lo), torch.where(flat, 1.0, hi)
    tiny = 2.0**-14  # the smallest normal fp16: a scale never underflows its storage dtype
    scale = round_scale(((hi - lo) / maxq).clamp(min=tiny), dtype)
    zero = torch.full_like(scale, float(2 ** (bits - 1))) if sym else torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_rows(W: torch.Tensor, U: torch.Tensor, perm: torch.Tensor | None, cfg: CompressionConfig) -> IntCode:
    """GPTQ on rows W (r, C) (dead columns already zeroed), U the upper Cholesky factor of H⁻¹ in visiting order."""
    R, C = W.shape
    bits, gs, B = cfg.gptq_bits, cfg.gptq_group_size, cfg.block_size
    maxq = float(2**bits - 1)
    W = W.to(torch.float32).clone()
    if perm is not None:
        W = W[:, perm]
    G = group_count(C, gs)
    codes = torch.zeros(R, C, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(R, G, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(R, G, dtype=torch.float32, device=W.device)
    scale = zero = torch.zeros(R, device=W.device)
    for i1 in range(0, C, B):
        i2 = min(i1 + B, C)
        Wb = W[:, i1:i2].clone()
        Err = torch.zeros_like(Wb)
        for i in range(i2 - i1):  # a loop over columns, as in GPTQ; rows stay vectorised
            j = i1 + i
            if j % gs == 0:  # a group starts: its grid from its columns' current (compensated) values
                end = min(j + gs, C)
                cur = Wb[:, i : end - i1]
                if end > i2:  # columns past this batch: add the pushes of the batch so far
                    late = W[:, i2:end] - Err[:, :i] @ U[i1:j, i2:end]
                    cur = torch.cat([cur, late], 1)
                scale, zero = fit_grid(cur, bits, cfg.gptq_sym, cfg.ablations.scale_dtype)
                scales[:, j // gs], zeros[:, j // gs] = scale, zero
            w = Wb[:, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            codes[:, j] = q.to(torch.uint8)
            err = (w - scale * (q - zero)) / U[j, j]
            Wb[:, i + 1 :] -= err[:, None] * U[j, j + 1 : i2][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]  # the batch's pushes onto the later columns at once
    g_idx = None
    if perm is not None:  # back to the natural column order; each column keeps the group it was coded in
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        g_idx = (torch.arange(C, device=W.device) // gs)[inv]
    return IntCode(codes, scales, zeros.to(torch.uint8), g_idx, bits, gs, cfg.gptq_sym)


def cat_codes(parts: list[IntCode]) -> IntCode:
    """One linear's code from its row chunks' codes, in row order (the same columns and groups)."""
    if len(parts) == 1:
        return parts[0]
    p = parts[0]
    return IntCode(
        torch.cat([c.codes for c in parts]),
        torch.cat([c.scales for c in parts]),
        torch.cat([c.zeros for c in parts]),
        p.g_idx,
        p.bits,
        p.group_size,
        p.sym,
    )
