"""A linear's codes as a differentiable function of their scales, for block-wise reconstruction.

With every mask and sign plane fixed, Ŵ of a linear is linear in its scales (`refit._basis`): per kind of scale
(α, μ, α_s, μ_s, α_r, μ_r) a fixed pattern P_k (R, C) of ±1/0 and a value per row per column block S_k (R, nb),
Ŵ = Σ_k S_k[:, block of column] ⊙ P_k. `CodeScales` holds the patterns and the values (normalised per kind, so
one learning rate fits scales of any size) and gives Ŵ as a function of them, and the tuned codes back, rounded
to their storage dtype. The workers' block step (`workers.blocktune`) tunes them against a block's FP outputs.
"""

from __future__ import annotations

import dataclasses

import torch

from .binarize import BlockCode, round_scale
from .refit import _KINDS, _basis


def _stored(code: BlockCode) -> list[str]:
    """The block's scales, in a fixed order (a full-layout μ_r stored beside μ_s, refit off, is tuned as it is)."""
    return [k for k in _KINDS if k in code.scales]


class CodeScales:
    """The scales of one linear's column-block codes as parameters: Ŵ(θ) = Σ_k (c_k θ_k)[:, col_block] ⊙ P_k."""

    def __init__(self, codes: list[BlockCode], spans: list[tuple[int, int]]) -> None:
        if any("alpha_col" in c.scales for c in codes):
            raise ValueError("ARB-RC codes (row x column scales) are not linear in their scales")
        self.codes, self.spans = codes, spans
        ref = codes[0].scales["alpha"]
        R, C, nb = ref.shape[0], spans[-1][1], len(spans)
        self.names = [k for k in _KINDS if any(k in c.scales for c in codes)]
        self.patterns: dict[str, torch.Tensor] = {}
        values: dict[str, torch.Tensor] = {}
        for k in self.names:
            self.patterns[k] = torch.zeros(R, C, dtype=ref.dtype, device=ref.device)
            values[k] = torch.zeros(R, nb, dtype=ref.dtype, device=ref.device)
        for b, (code, (s, e)) in enumerate(zip(codes, spans, strict=True)):
            V = _basis(code, slice(None), _stored(code))  # (R, k, e - s)
            for j, k in enumerate(_stored(code)):
                self.patterns[k][:, s:e] = V[:, j]
                values[k][:, b] = code.scales[k]
        self.column_block = torch.cat(
            [torch.full((e - s,), b, dtype=torch.long, device=ref.device) for b, (s, e) in enumerate(spans)]
        )
        # one normaliser per kind: θ = S / c is of order 1 for every kind
        self.norm = {k: float(v.abs().mean().clamp_min(1e-12)) for k, v in values.items()}
        self.initial = {k: v / self.norm[k] for k, v in values.items()}

    def params(self) -> list[torch.Tensor]:
        """Fresh leaf tensors (requires_grad) holding the initial θ, one per kind in `names` order."""
        return [self.initial[k].clone().requires_grad_(True) for k in self.names]

    def weight(self, theta: list[torch.Tensor]) -> torch.Tensor:
        """Ŵ (R, C) for θ (differentiable; equal to the codes' `dense()` up to float rounding)."""
        out = None
        for k, t in zip(self.names, theta, strict=True):
            term = (t * self.norm[k])[:, self.column_block] * self.patterns[k]
            out = term if out is None else out + term
        assert out is not None
        return out

    def rounded(self, theta: list[torch.Tensor], dtype: str) -> list[BlockCode]:
        """The codes with the scales θ, rounded to the storage dtype; masks, signs and scale names unchanged."""
        values = {k: (t.detach() * self.norm[k]) for k, t in zip(self.names, theta, strict=True)}
        new = []
        for b, code in enumerate(self.codes):
            scales = dict(code.scales)
            for k in _stored(code):
                scales[k] = round_scale(values[k][:, b].contiguous(), dtype)
            new.append(dataclasses.replace(code, scales=scales))
        return new


def dense_weight(codes: list[BlockCode]) -> torch.Tensor:
    """Ŵ exactly as the artifact decodes it: the codes' `dense()` side by side."""
    return torch.cat([c.dense() for c in codes], 1)
