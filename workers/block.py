"""One decoder block: its linears' Hessians from one calibration pass, every linear solved, the compressed
weights set, and the outputs that feed the next block."""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from pbs2p.core.bits import count_bits
from pbs2p.core.config import CompressionConfig, NMPattern
from pbs2p.core.hessian import HessianAccumulator
from pbs2p.core.solver import LinearResult, compress_linear

from .model_stream import BlockModel, Capture, release_memory
from .report import BlockReport, LinearReport

log = logging.getLogger(__name__)


# (the linears' weights W and Hessians H by name, N of the block) -> their results by name. `solve_here` runs
# them one after the other in this process; the Ray runner fans them out over a job's workers.
LinearSolver = Callable[[dict[str, tuple[torch.Tensor, torch.Tensor]], int], dict[str, LinearResult]]


def solve_here(cfg: CompressionConfig) -> LinearSolver:
    def solve(work: dict[str, tuple[torch.Tensor, torch.Tensor]], n_keep: int) -> dict[str, LinearResult]:
        out = {}
        for name in list(work):
            W, H = work.pop(name)  # each H is freed once its linear is done
            out[name] = compress_linear(W, H, n_keep, cfg)
        return out

    return solve


def _skipped(full_name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(full_name, p) for p in patterns)


def block_linears(bm: BlockModel, index: int, block: nn.Module, cfg: CompressionConfig) -> dict[str, nn.Linear]:
    """The linears of block `index` that the config compresses, by name within the block."""
    prefix = f"{bm.layer_root}{index}."
    return {
        name: block.get_submodule(name)  # type: ignore[misc]
        for name in bm.family.linears
        if cfg.method != "fp" and not _skipped(prefix + name, cfg.skip_modules)
    }


def collect_hessians(
    bm: BlockModel,
    index: int,
    block: nn.Module,
    xs: list[torch.Tensor],
    capture: Capture,
    linears: dict[str, nn.Linear],
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run the block on its calibration inputs with a hook on each linear: (block outputs, H per linear)."""
    accs = {name: HessianAccumulator(lin.in_features, bm.device) for name, lin in linears.items()}
    hooks = [
        lin.register_forward_hook(lambda mod, inp, out, acc=accs[name]: acc.add_batch(inp[0]))
        for name, lin in linears.items()
    ]
    try:
        ys = bm.run_block(index, block, xs, capture)
    finally:
        for h in hooks:
            h.remove()
    return ys, {name: acc.H for name, acc in accs.items()}


@dataclass
class BlockOutcome:
    tensors: dict[str, torch.Tensor]  # the block's state dict by full name (compressed linears hold Ŵ)
    results: dict[str, LinearResult]  # by full weight name
    report: BlockReport
    outputs: list[torch.Tensor]  # the next block's inputs (per calibration batch)


def compress_block(
    bm: BlockModel,
    index: int,
    xs: list[torch.Tensor],
    capture: Capture,
    cfg: CompressionConfig,
    n_keep: int,
    cosine: float | None,
    solve: LinearSolver,
) -> BlockOutcome:
    """Block `index` on its calibration inputs `xs`: H per linear, every linear solved by `solve`, the compressed
    weights set, the outputs for the next block (compressed block when sequential, FP block when independent)."""
    tb = time.perf_counter()
    i, m = index, cfg.pattern.m
    block = bm.load_block(i)
    prefix = f"{bm.layer_root}{i}."
    linears = block_linears(bm, i, block, cfg)
    report = BlockReport(i, n_keep if cfg.prunes else m, cosine, 0.0)
    results: dict[str, LinearResult] = {}
    # one calibration pass collects every H of the block; "true sequential" makes one pass per group
    # of linears that see the same input, so later groups are calibrated on the compressed earlier ones
    groups = bm.family.groups if cfg.ablations.true_sequential else (bm.family.linears,)
    fp_ys = None
    for group in groups:
        todo = {name: linears[name] for name in group if name in linears}
        if not todo:
            continue
        ys, hessians = collect_hessians(bm, i, block, xs, capture, todo)
        fp_ys = fp_ys if fp_ys is not None else ys  # the first pass runs the FP block
        solved = solve({name: (lin.weight.data, hessians.pop(name)) for name, lin in todo.items()}, n_keep)
        for name, lin in todo.items():
            res = solved[name]
            lin.weight.data = res.weight.to(lin.weight.device, lin.weight.dtype)
            results[f"{prefix}{name}.weight"] = res
            # the mask costs what this linear's own N needs (CFS gives blocks different N), none when dense
            mask_bits = NMPattern(res.n_keep, m).mask_bits_per_group if res.n_keep < m else 0
            bits = count_bits(res.blocks, res.n_keep, m, mask_bits)
            shape = (lin.out_features, lin.in_features)
            report.linears.append(
                LinearReport(
                    prefix + name,
                    shape,
                    res.n_keep,
                    res.rel_error,
                    res.damping,
                    res.retries,
                    bits.to_dict(),
                    res.stats.get("rel_error_oneshot"),
                )
            )
            if res.retries:
                log.warning("%s: Hessian needed damping %g (%d retries)", prefix + name, res.damping, res.retries)
    ys = fp_ys if fp_ys is not None else bm.run_block(i, block, xs, capture)
    if linears and cfg.propagation == "sequential":
        ys = bm.run_block(i, block, xs, capture)  # outputs of the compressed block
    tensors = {prefix + k: v for k, v in block.state_dict().items()}
    bm.unload_block(i)
    release_memory()
    report.seconds = time.perf_counter() - tb
    return BlockOutcome(tensors, results, report, ys)
