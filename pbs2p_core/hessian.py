"""Collect, then solve: the per-linear Hessian H = 2/T · X Xᵀ (summed per calibration shard, then over the shards
by a fixed tree) and its inverse Cholesky factor."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch

from .errors import Pbs2pError

T = TypeVar("T")


class HessianSum:
    """Σ x xᵀ over the tokens of some calibration shards, in fp32, batches added in order (deterministic)."""

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.S = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).to(self.S.device, torch.float32)  # (T, C)
        self.tokens += x.shape[0]
        self.S.addmm_(x.T, x)

    def plus(self, other: HessianSum) -> HessianSum:
        """self + other (in place): the sum of both sets of shards."""
        self.S += other.S.to(self.S.device)
        self.tokens += other.tokens
        return self

    def hessian(self) -> torch.Tensor:
        """H = 2/T · Σ x xᵀ."""
        return self.S.mul(2.0 / max(self.tokens, 1))


Span = tuple[int, int]  # shards [lo, hi): a node of the reduction tree


def tree_sum(
    lo: int, hi: int, leaf: Callable[[int], T], add: Callable[[T, T], T], known: Mapping[Span, Callable[[], T]] = {}
) -> T:
    """The sum of shards [lo, hi) over a fixed binary tree of shard indices (split at the middle): the same
    additions in the same order, whoever computes which subtree. Leaves come from `leaf(s)` in increasing s;
    `known` gives subtrees summed elsewhere."""
    if (lo, hi) in known:
        return known[(lo, hi)]()
    if hi - lo == 1:
        return leaf(lo)
    mid = (lo + hi) // 2
    left = tree_sum(lo, mid, leaf, add, known)
    return add(left, tree_sum(mid, hi, leaf, add, known))


def tree_cover(lo: int, hi: int, a: int, b: int) -> list[Span]:
    """The largest nodes of the tree over [lo, hi) that lie inside shards [a, b), in order: what a worker holding
    those shards sums itself."""
    if a <= lo and hi <= b:
        return [(lo, hi)]
    if hi <= a or b <= lo or hi - lo == 1:
        return []
    mid = (lo + hi) // 2
    return tree_cover(lo, mid, a, b) + tree_cover(mid, hi, a, b)


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
