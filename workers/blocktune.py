"""Block-wise reconstruction: once every linear of a decoder block is compressed (masks and sign planes fixed),
its scales are tuned with Adam so that the compressed block's outputs reproduce the FP block's on the same
calibration inputs (OmniQuant / AutoRound style, scales only).

Fixed steps, fixed shard order (step t uses shard t mod S), no randomness: the same bytes on every run. The
tuned scales are rounded to their storage dtype and kept only if the block's loss with the rounded values is
lower than before (the loss is Σ‖y − y_FP‖² / Σ‖y_FP‖² over all shards).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from pbs2p.core.blocktune import CodeScales, dense_weight
from pbs2p.core.config import CompressionConfig
from pbs2p.core.refit import layer_error
from pbs2p.core.solver import LinearResult, column_blocks

from .model_stream import BlockModel, Capture

log = logging.getLogger(__name__)


@dataclass
class TuneOutcome:
    results: dict[str, LinearResult]  # by linear name within the block (tuned, or the ones given)
    outputs: list[torch.Tensor]  # the block's outputs per shard with those results' weights
    loss_before: float
    loss_after: float  # with the rounded tuned scales (kept only if lower)

    @property
    def kept(self) -> bool:
        return self.loss_after < self.loss_before


def _loss(ys: list[torch.Tensor], targets: list[torch.Tensor]) -> float:
    num = sum(float(((y - t) ** 2).sum()) for y, t in zip(ys, targets, strict=True))
    den = sum(float((t * t).sum()) for t in targets)
    return num / max(den, 1e-30)


WINDOWS_PER_STEP = 2  # calibration windows per Adam step: the steps go through the shards in order


def _chunks(inputs: list[torch.Tensor]) -> list[tuple[int, int, int]]:
    """(shard, first window, end window) of each step's windows, in shard and window order."""
    return [
        (s, lo, min(lo + WINDOWS_PER_STEP, x.shape[0]))
        for s, x in enumerate(inputs)
        for lo in range(0, x.shape[0], WINDOWS_PER_STEP)
    ]


def _sliced(value: Any, batch: int, lo: int, hi: int) -> Any:
    """A block keyword argument for windows [lo, hi) of a shard of `batch`: tensors (also in tuples) whose first
    dimension is the batch sliced, the rest (broadcast over the batch: rotary tables, None) as they are."""
    if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch and batch > 1:
        return value[lo:hi]
    if isinstance(value, tuple):
        return tuple(_sliced(v, batch, lo, hi) for v in value)
    if isinstance(value, dict):  # masks by layer type
        return {k: _sliced(v, batch, lo, hi) for k, v in value.items()}
    return value


def tune_block(
    bm: BlockModel, index: int, block: nn.Module, linears: dict[str, nn.Linear], results: dict[str, LinearResult],
    inputs: list[torch.Tensor], targets: list[torch.Tensor], capture: Capture, cfg: CompressionConfig,
    layer: dict[str, tuple[torch.Tensor, torch.Tensor, float]],
) -> TuneOutcome:  # fmt: skip
    """The block's scales tuned for `cfg.tune_steps` Adam steps against `targets` (the FP block's outputs
    on `inputs`, per shard). The block's linears hold the compressed weights on entry, and on return those of
    the outcome's results. `layer` gives each linear's (FP weight, H, tr(W H Wᵀ)): a tuned result's rel_error
    is that of its tuned Ŵ."""
    before = bm.run_block(index, block, inputs, capture)
    loss_before = _loss(before, targets)
    tunable = {n: r for n, r in results.items() if not any("alpha_col" in c.scales for c in r.blocks)}
    if not tunable or cfg.tune_steps == 0:
        return TuneOutcome(results, before, loss_before, loss_before)
    scales = {n: CodeScales(r.blocks, column_blocks(r.weight.shape[1], cfg.block_size)) for n, r in tunable.items()}
    theta = {n: s.params() for n, s in scales.items()}
    opt = torch.optim.Adam([t for ts in theta.values() for t in ts], lr=cfg.block_tune_lr)
    total = sum(float((t * t).sum()) for t in targets) / len(_chunks(inputs))  # a step's share of Σ‖y_FP‖²
    flags = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        chunks = _chunks(inputs)
        for step in range(cfg.tune_steps):
            s, lo, hi = chunks[step % len(chunks)]
            batch = inputs[s].shape[0]
            kwargs = {k: _sliced(v, batch, lo, hi) for k, v in capture.kwargs[(index, batch)].items()}
            weights = {f"{n}.weight": sc.weight(theta[n]) for n, sc in scales.items()}
            y = functional_call(block, weights, (inputs[s][lo:hi],), kwargs)
            loss = ((y - targets[s][lo:hi]) ** 2).sum() / total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    dtype = cfg.ablations.scale_dtype
    tuned = dict(results)
    for n, sc in scales.items():
        codes = sc.rounded(theta[n], dtype)
        W = dense_weight(codes)
        W0, H, total_n = layer[n]
        rel = layer_error(W0.to(W.dtype), W, H.to(W.device)) / max(total_n, 1e-30)
        tuned[n] = dataclasses.replace(results[n], weight=W, blocks=codes, rel_error=rel)
        linears[n].weight.data = W.to(linears[n].weight.device, linears[n].weight.dtype)
    after = bm.run_block(index, block, inputs, capture)
    loss_after = _loss(after, targets)
    log.info("block %d: tuned scales, block loss %.4g -> %.4g", index, loss_before, loss_after)
    if loss_after < loss_before:
        return TuneOutcome(tuned, after, loss_before, loss_after)
    for n in scales:  # not better: the compressed weights as they were
        linears[n].weight.data = results[n].weight.to(linears[n].weight.device, linears[n].weight.dtype)
    return TuneOutcome(results, before, loss_before, loss_after)
