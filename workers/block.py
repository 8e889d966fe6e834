"""One decoder block, in the steps that a job's workers share out (the local path runs them in order here).

A block is calibrated on shards: the calibration windows cut into batches of `batch_size` windows, a size that
does not depend on the number of workers. The steps:
1. per shard: the block's forward with a hook on each group of linears that reads one input (q/k/v, o,
   gate/up, down), giving the shard's Σ x xᵀ per group (`shard_hessians`);
2. per group: the shards' sums added over a fixed binary tree of shard indices (`forward_shards`), H factorised
   once, and each linear's state that needs all its rows (`prepare_group`);
3. per linear: its rows solved in fixed chunks (`solve_rows`), joined in row order (`merge_rows`);
4. the compressed weights set, and the next block's inputs: per shard, the compressed block's outputs
   (sequential propagation) or the FP block's (independent).
Every sum runs in a fixed order over shards and row chunks, so the bits are the same on 1 or 64 workers.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from pbs2p.core.bits import count_bits, count_int_bits
from pbs2p.core.config import CompressionConfig, NMPattern
from pbs2p.core.hessian import HessianSum, inverse_cholesky, tree_sum
from pbs2p.core.solver import LinearPrep, LinearResult, merge_rows, prepare_linear, row_chunks, solve_rows

from .blocktune import tune_block
from .model_stream import BlockModel, Capture, release_memory
from .report import BlockReport, LinearReport

log = logging.getLogger(__name__)

Group = tuple[str, ...]  # linears of a block that read the same input, e.g. ("self_attn.q_proj", ...)
Sums = dict[Group, HessianSum]  # Σ x xᵀ per input group, over some shards


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


def block_passes(bm: BlockModel, names: list[str] | dict[str, nn.Linear], true_sequential: bool) -> list[list[Group]]:
    """The calibration passes over a block, each a list of input groups (only their compressed linears): one pass
    for all groups, or with "true sequential" one per group (later groups see the compressed earlier ones)."""
    groups = [tuple(n for n in g if n in names) for g in bm.family.groups]
    groups = [g for g in groups if g]
    return [[g] for g in groups] if true_sequential else ([groups] if groups else [])


def shard_hessians(
    bm: BlockModel, index: int, block: nn.Module, x: torch.Tensor, capture: Capture, groups: list[Group]
) -> tuple[torch.Tensor, dict[Group, HessianSum]]:
    """One shard through the block, with a hook on the first linear of each group: (outputs, Σ x xᵀ per group)."""
    sums: dict[Group, HessianSum] = {}
    hooks = []
    for g in groups:
        lin = block.get_submodule(g[0])
        sums[g] = acc = HessianSum(lin.in_features, bm.device)  # type: ignore[arg-type]
        hooks.append(lin.register_forward_hook(lambda mod, inp, out, acc=acc: acc.add_batch(inp[0])))
    try:
        (y,) = bm.run_block(index, block, [x], capture)
    finally:
        for h in hooks:
            h.remove()
    return y, sums


def add_sums(a: Sums, b: Sums) -> Sums:
    """a + b group by group (in place): a node of the shards' reduction tree."""
    return {g: a[g].plus(b[g]) for g in a}


def forward_shards(
    bm: BlockModel, index: int, block: nn.Module, shards: dict[int, torch.Tensor], capture: Capture,
    groups: list[Group], lo: int, hi: int,
) -> tuple[dict[int, torch.Tensor], Sums]:  # fmt: skip
    """Shards [lo, hi) (of `shards`, by index) through the block: (outputs by shard, their sums per group, added
    over the fixed tree of shard indices, `tree_sum`)."""
    ys: dict[int, torch.Tensor] = {}

    def leaf(s: int) -> Sums:
        ys[s], sums = shard_hessians(bm, index, block, shards[s], capture, groups)
        return sums

    return ys, tree_sum(lo, hi, leaf, add_sums)


def prepare_group(
    linears: dict[str, nn.Linear], group: Group, total: HessianSum, cfg: CompressionConfig
) -> dict[str, LinearPrep]:
    """H of the group's input from the summed shards, factorised once, and each linear's all-rows state."""
    H = total.hessian()
    inv = inverse_cholesky(H, cfg.damping)
    return {name: prepare_linear(linears[name].weight.data, H, cfg, inv) for name in group}


def linear_report(full_name: str, lin: nn.Linear, res: LinearResult, m: int) -> LinearReport:
    # the mask costs what this linear's own N needs (CFS gives blocks different N), none when dense
    mask_bits = NMPattern(res.n_keep, m).mask_bits_per_group if res.n_keep < m else 0
    bits = count_int_bits(res.intcode) if res.intcode is not None else count_bits(res.blocks, res.n_keep, m, mask_bits)
    if res.retries:
        log.warning("%s: Hessian needed damping %g (%d retries)", full_name, res.damping, res.retries)
    shape = (lin.out_features, lin.in_features)
    return LinearReport(
        full_name, shape, res.n_keep, res.rel_error, res.damping, res.retries, bits.to_dict(),
        res.stats.get("rel_error_oneshot"),
    )  # fmt: skip


def set_result(lin: nn.Linear, res: LinearResult) -> None:
    lin.weight.data = res.weight.to(lin.weight.device, lin.weight.dtype)


@dataclass
class BlockOutcome:
    tensors: dict[str, torch.Tensor]  # the block's state dict by full name (compressed linears hold Ŵ)
    results: dict[str, LinearResult]  # by full weight name
    report: BlockReport
    outputs: list[torch.Tensor]  # the next block's inputs, per shard


def finish_block(
    bm: BlockModel, index: int, block: nn.Module, linears: dict[str, nn.Linear], results: dict[str, LinearResult],
    cfg: CompressionConfig, report: BlockReport,
) -> tuple[dict[str, torch.Tensor], dict[str, LinearResult]]:  # fmt: skip
    """The block's tensors by full name and its results by full weight name; the report's linears in order."""
    prefix = f"{bm.layer_root}{index}."
    for name in bm.family.linears:
        if name in results:
            report.linears.append(linear_report(prefix + name, linears[name], results[name], cfg.pattern.m))
    tensors = {prefix + k: v for k, v in block.state_dict().items()}
    return tensors, {f"{prefix}{name}.weight": res for name, res in results.items()}


def compress_block(
    bm: BlockModel,
    index: int,
    shards: list[torch.Tensor],
    capture: Capture,
    cfg: CompressionConfig,
    n_keep: int,
    cosine: float | None,
) -> BlockOutcome:
    """Block `index` on its calibration shards in this process, the steps of the module doc in order."""
    tb = time.perf_counter()
    block = bm.load_block(index)
    linears = block_linears(bm, index, block, cfg)
    report = BlockReport(index, n_keep if cfg.prunes else cfg.pattern.m, cosine, 0.0)
    results: dict[str, LinearResult] = {}
    outputs: list[torch.Tensor] | None = None  # the next block's inputs: the FP block's, from the first pass
    layer: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # block tuning: FP weight, H, tr(W H Wᵀ)
    for groups in block_passes(bm, linears, cfg.ablations.true_sequential):
        ys, total = forward_shards(bm, index, block, dict(enumerate(shards)), capture, groups, 0, len(shards))
        outputs = outputs if outputs is not None else [ys[s] for s in range(len(shards))]
        for g in groups:
            preps = prepare_group(linears, g, total.pop(g), cfg)
            for name in g:
                W = linears[name].weight.data
                parts = [solve_rows(W[r0:r1], preps[name], n_keep, cfg) for r0, r1 in row_chunks(W.shape[0], cfg)]
                prep = preps.pop(name)
                results[name] = merge_rows(parts, prep, n_keep, cfg)
                if cfg.tune_steps:
                    layer[name] = (W.clone(), prep.H, prep.total)
                set_result(linears[name], results[name])
    if results and cfg.tune_steps and outputs is not None:  # the FP block's outputs are the targets
        tuned = tune_block(bm, index, block, linears, results, shards, outputs, capture, cfg, layer)
        results, report.tune_loss = tuned.results, [tuned.loss_before, tuned.loss_after]
        if cfg.propagation == "sequential":
            outputs = tuned.outputs
    elif outputs is None or (linears and cfg.propagation == "sequential"):
        outputs = bm.run_block(index, block, shards, capture)  # those of the compressed block
    tensors, named = finish_block(bm, index, block, linears, results, cfg, report)
    bm.unload_block(index)
    release_memory()
    report.seconds = time.perf_counter() - tb
    return BlockOutcome(tensors, named, report, outputs)


def collect_hessians(
    bm: BlockModel,
    index: int,
    block: nn.Module,
    xs: list[torch.Tensor],
    capture: Capture,
    names: list[str] | dict[str, nn.Linear],
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """The block on calibration shards `xs`: (outputs per shard, H per linear among `names`), one pass."""
    groups = [g for p in block_passes(bm, names, False) for g in p]
    ys, total = forward_shards(bm, index, block, dict(enumerate(xs)), capture, groups, 0, len(xs))
    out = {}
    for g, t in total.items():
        H = t.hessian()
        out.update({name: H for name in g})
    return [ys[s] for s in range(len(xs))], out
