"""Collect, then solve: the per-linear Hessian H = 2/T · X Xᵀ and its inverse Cholesky factor."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import Pbs2pError


class HessianAccumulator:
    """Running mean of 2 · x xᵀ over calibration tokens, in fp32 (fixed order -> deterministic)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.H.device, torch.float32)  # (T, C)
        t = x.shape[0]
        self.H *= self.tokens / (self.tokens + t)
        self.tokens += t
        x = x * math.sqrt(2.0 / self.tokens)
        self.H.addmm_(x.T, x)


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
