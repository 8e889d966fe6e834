"""Collect, then solve: the per-linear Hessian H = 2/T · X Xᵀ (summed per calibration shard, then over the shards
in order) and its inverse Cholesky factor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import Pbs2pError


class HessianSum:
    """Σ x xᵀ over the tokens of one calibration shard, in fp32, batches added in order (deterministic)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.S = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.S.device, torch.float32)  # (T, C)
        self.tokens += x.shape[0]
        self.S.addmm_(x.T, x)


def reduce_hessians(parts: list[HessianSum]) -> torch.Tensor:
    """H = 2/T · Σ_shards S, summed in the order given (shard order): the same bits however the shards were
    spread over workers."""
    total = parts[0].S.clone()
    for p in parts[1:]:
        total += p.S.to(total.device)
    tokens = sum(p.tokens for p in parts)
    return total.mul_(2.0 / max(tokens, 1))


@dataclass
class InverseFactor:
    U: torch.Tensor  # (C, C) upper Cholesky factor of H⁻¹ (GPTQ's Hinv), fp32
    dead: torch.Tensor  # (C,) bool: inputs that never fired
    damping: float  # the relative damping finally used
    retries: int  # how many times the damping had to be raised


def inverse_cholesky(H: torch.Tensor, damping: float, max_retries: int = 6) -> InverseFactor:
    """U with H⁻¹ = UᵀU, after dead-column repair and damping H += λ · mean(diag H) · I.

    Factorised in fp64; when Cholesky still fails (a singular H), λ is raised tenfold and the retry recorded.
    """
    H = H.to(torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for retry in range(max_retries + 1):
        lam = damping * 10.0**retry
        # With J the reversal permutation and J H J = M Mᵀ (M lower): H = R Rᵀ for the upper R = J M J, so
        # H⁻¹ = R⁻ᵀ R⁻¹ and U = R⁻¹ = J M⁻¹ J: one Cholesky and one triangular inverse, no explicit H⁻¹.
        M, info = torch.linalg.cholesky_ex((H + lam * mean_diag * eye).flip(0, 1))
        if int(info) == 0:
            U = torch.linalg.solve_triangular(M, eye, upper=False).flip(0, 1)
            if torch.isfinite(U).all():
                return InverseFactor(U.to(torch.float32), dead, lam, retry)
    raise Pbs2pError(
        f"the Hessian could not be factorised even with damping {lam:g}; "
        "the calibration inputs are degenerate (NaN/inf activations?): check the model and calibration text"
    )
