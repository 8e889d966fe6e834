"""Perplexity of a causal LM on fixed token windows, pure torch (no datasets/evaluate packages)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .errors import Pbs2pError

# Positions per cross-entropy call: bounds the float32 copy of the logits (512 x 49k vocab ~ 100 MB).
_CE_CHUNK = 512


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    tokens: int  # predicted tokens: windows * (seqlen - 1)
    seqlen: int
    windows: int
    bos: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    bos: bool,
    batch_size: int = 4,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """exp(mean NLL) of predicting token t+1 from tokens <= t, over every window [k, T] (T-1 targets each).

    The model must already be on `device`. The sum runs in float64 in window order, so the result does not
    depend on `batch_size` beyond float32 kernel noise. `progress(done_windows, k)` runs after each batch.
    """
    if windows.dim() != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise Pbs2pError(
            f"evaluation windows have shape {tuple(windows.shape)}; give [k, T] token ids with k >= 1, T >= 2"
        )
    if batch_size < 1:
        raise Pbs2pError(f"evaluation batch size {batch_size} is not positive; use e.g. 4")
    k, seqlen = windows.shape
    was_training = model.training
    model.eval()
    total = 0.0
    try:
        for start in range(0, k, batch_size):
            batch = windows[start : start + batch_size].to(device=device, dtype=torch.long)
            logits = model(input_ids=batch, use_cache=False).logits
            for row in range(batch.shape[0]):
                total += _window_nll(logits[row], batch[row])
            del logits
            if progress is not None:
                progress(min(start + batch_size, k), k)
    finally:
        model.train(was_training)
    tokens = k * (seqlen - 1)
    nll = total / tokens
    ppl = math.exp(nll) if nll < 700.0 else math.inf
    return PerplexityResult(ppl=ppl, nll=nll, tokens=tokens, seqlen=seqlen, windows=k, bos=bos)


def _window_nll(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed NLL of one window: logits [T, V] at positions 0..T-2 predict ids 1..T-1."""
    total = 0.0
    n = ids.shape[0] - 1
    for lo in range(0, n, _CE_CHUNK):
        hi = min(lo + _CE_CHUNK, n)
        losses = F.cross_entropy(logits[lo:hi].float(), ids[lo + 1 : hi + 1], reduction="none")
        total += float(losses.double().sum())
    return total
