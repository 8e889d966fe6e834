"""CFS coarse stage: per-block importance from the FP model, and the per-block kept count N_l."""

from __future__ import annotations

import torch


def block_cosine(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of cos(h_in, h_out) for one batch (B, T, D) -> scalar fp64 (divide by token count)."""
    cos = torch.nn.functional.cosine_similarity(h_in.double(), h_out.double(), dim=-1)
    return cos.sum()


def block_importance(cosines: list[float]) -> list[float]:
    """I_l = 1 / c_l normalised to mean 1; a block with c_l <= 0 gets the largest importance."""
    inv = [1.0 / c if c > 0 else float("nan") for c in cosines]
    finite = [v for v in inv if v == v]
    top = max(finite) if finite else 1.0
    inv = [v if v == v else top for v in inv]
    mean = sum(inv) / len(inv)
    return [v / mean for v in inv]


def n_bounds(n_target: int, m: int, spread: int) -> tuple[int, int]:
    """The kept counts a block may get: [N_t − spread, N_t + spread] within [1, M − 1]."""
    return max(1, n_target - spread), min(m - 1, n_target + spread)


def allocate(importance: list[float], n_target: int, m: int, spread: int = 1) -> list[int]:
    """N_l = clip(round(N_t · I_l), N_t − spread, N_t + spread) within [1, M − 1], then repaired greedily so
    that Σ N_l = L · N_t exactly (the average bits equal the target's). Deterministic."""
    lo, hi = n_bounds(n_target, m, spread)
    ideal = [n_target * i for i in importance]
    n = [min(hi, max(lo, round(x))) for x in ideal]
    target = n_target * len(n)
    while sum(n) > target:  # take one from the block most above its ideal share
        j = max((l for l in range(len(n)) if n[l] > lo), key=lambda l: (n[l] - ideal[l], -l))
        n[j] -= 1
    while sum(n) < target:  # give one to the block most below its ideal share
        j = max((l for l in range(len(n)) if n[l] < hi), key=lambda l: (ideal[l] - n[l], -l))
        n[j] += 1
    return n


def allocate_by_error(errors: list[dict[int, float]], n_target: int) -> list[int]:
    """N_l minimising Σ_l e_l(N_l) with Σ N_l = L · N_t exactly, each N_l among block l's measured candidates
    (`errors[l]`: N -> error). From N_t everywhere, one kept weight per group moves from the block that loses
    least to the block that gains most, while that lowers the sum (optimal when each e_l is convex in N).
    Deterministic: ties go to the lower block index."""
    n = [n_target] * len(errors)
    while True:
        best: tuple[float, int, int] | None = None
        for a, ea in enumerate(errors):  # a gains one kept weight per group
            if n[a] + 1 not in ea:
                continue
            gain = ea[n[a]] - ea[n[a] + 1]
            for b, eb in enumerate(errors):  # b gives one
                if b == a or n[b] - 1 not in eb:
                    continue
                net = gain - (eb[n[b] - 1] - eb[n[b]])
                if net > 1e-12 and (best is None or net > best[0]):
                    best = (net, a, b)
        if best is None:
            return n
        _, a, b = best
        n[a] += 1
        n[b] -= 1
