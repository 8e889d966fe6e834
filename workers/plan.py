"""The plan of a job: N per transformer block, from the CFS coarse stage on the full-precision model (the
paper's 1/cos importance, or each block's measured error at every candidate N), or N_t everywhere."""

from __future__ import annotations

import logging

import torch
from torch import nn

from pbs2p.core.cfs import allocate, allocate_by_error, block_cosine, block_importance, n_bounds
from pbs2p.core.config import CompressionConfig
from pbs2p.core.solver import oneshot_linear

from .block import block_linears, collect_hessians
from .model_stream import BlockModel, Capture, release_memory
from .report import ProgressFn

log = logging.getLogger(__name__)


def coarse_stage(
    bm: BlockModel, capture: Capture, cfg: CompressionConfig, progress: ProgressFn
) -> tuple[list[float], list[dict[int, float]]]:
    """CFS coarse stage on the FP model: c_l = mean over tokens of cos(h_in, h_out) of block l, and with
    cfs_score "error" also e_l(N) for every candidate N (see `block_errors`).

    Both are taken over the first `cfs_samples` calibration windows (whole batches), which keeps this
    extra FP pass cheap."""
    xs, windows = [], 0
    for x in capture.inputs:
        if windows >= cfg.ablations.cfs_samples:
            break
        xs.append(x)
        windows += x.shape[0]
    tokens = sum(x.shape[0] * x.shape[1] for x in xs)
    cosines: list[float] = []
    errors: list[dict[int, float]] = []
    for i in range(bm.num_blocks):
        block = bm.load_block(i)
        if cfg.ablations.cfs_score == "error":
            linears = block_linears(bm, i, block, cfg)
            ys, hessians = collect_hessians(bm, i, block, xs, capture, linears)
            errors.append(block_errors(bm, i, block, xs, ys, capture, linears, hessians, cfg))
        else:
            ys = bm.run_block(i, block, xs, capture)
        cosines.append(float(sum(block_cosine(x, y) for x, y in zip(xs, ys, strict=True)) / tokens))
        bm.unload_block(i)
        release_memory()
        xs = ys
        progress("coarse", i + 1, bm.num_blocks)
    return cosines, errors


def block_errors(
    bm: BlockModel,
    index: int,
    block: nn.Module,
    xs: list[torch.Tensor],
    ys: list[torch.Tensor],
    capture: Capture,
    linears: dict[str, nn.Linear],
    hessians: dict[str, torch.Tensor],
    cfg: CompressionConfig,
) -> dict[int, float]:
    """e_l(N) for N in [N_t - spread, N_t + spread]: the block's output error when all its linears get a quick
    one-shot code at N (`oneshot_linear`), as the mean over tokens of ||y' - y||^2 / ||y||^2 on FP inputs.
    The block's FP weights are restored afterwards."""
    lo, hi = n_bounds(cfg.pattern.n, cfg.pattern.m, cfg.ablations.cfs_spread)
    fp = {name: lin.weight.data for name, lin in linears.items()}
    out: dict[int, float] = {}
    try:
        for n in range(lo, hi + 1):
            for name, lin in linears.items():
                lin.weight.data = oneshot_linear(fp[name], hessians[name], n, cfg).to(fp[name].dtype)
            yq = bm.run_block(index, block, xs, capture)
            rel = [
                ((a - b).double().pow(2).sum(-1) / b.double().pow(2).sum(-1).clamp_min(1e-30))
                for a, b in zip(yq, ys, strict=True)
            ]
            out[n] = float(torch.cat([r.flatten() for r in rel]).mean())
    finally:
        for name, lin in linears.items():
            lin.weight.data = fp[name]
    return out


def needs_coarse_stage(cfg: CompressionConfig) -> bool:
    return cfg.method != "fp" and cfg.prunes and cfg.allocation == "cfs"


def plan_blocks(
    bm: BlockModel, capture: Capture, cfg: CompressionConfig, progress: ProgressFn
) -> tuple[list[float | None], list[int]]:
    """(cosine per block or None, N per block): the CFS coarse stage, or N_t everywhere."""
    L = bm.num_blocks
    if needs_coarse_stage(cfg):
        cos, errors = coarse_stage(bm, capture, cfg, progress)
        if cfg.ablations.cfs_score == "error":
            n_blocks = allocate_by_error(errors, cfg.pattern.n)
            log.info("CFS block errors per N: %s", [{n: round(e, 5) for n, e in d.items()} for d in errors])
        else:
            n_blocks = allocate(block_importance(cos), cfg.pattern.n, cfg.pattern.m, cfg.ablations.cfs_spread)
        log.info("CFS kept counts per block: %s", n_blocks)
        return list(cos), n_blocks
    return [None] * L, [cfg.pattern.n] * L
