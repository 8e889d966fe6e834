"""A job's worker: a Ray actor holding its calibration shards (worker k of W holds shards [k·S/W, (k+1)·S/W) of
the S) and a copy of the current block. The coordinator drives it through the steps of `workers.block`, block by block:

  begin     the block's forward on this worker's shards, Σ x xᵀ per input group over each subtree of the shards'
            fixed reduction tree that it holds whole (object store)
  prepare   one input group: the subtrees' sums added over the rest of the tree, H factorised, each linear's
            shared state
  solve     one row chunk of one linear
  apply     every linear's chunks joined in row order, the compressed weights set in this copy of the block
  advance   this worker's shards moved on to the next block (compressed or FP outputs), held here
  save_*    (I/O lane, alongside the next block's compute) the shards' inputs and, on worker 0, the block

Lanes (concurrency groups, one thread each): compute, io (checkpoint writes, reading the next block's weights),
control. A worker restarted by Ray comes back empty: it captures its block-0 inputs again, or reads its shards'
inputs of the block from the checkpoint.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import torch
from torch import nn

from pbs2p.core.config import CompressionConfig
from pbs2p.core.hessian import HessianSum, Span, tree_cover, tree_sum
from pbs2p.core.solver import LinearPrep, LinearResult, RowsResult, merge_rows, solve_rows

from ..block import Group, block_linears, finish_block, forward_shards, prepare_group, set_result
from ..blocktune import tune_block
from ..checkpoints import JobCheckpoint
from ..model_stream import BlockModel, Capture, release_memory
from ..plan import plan_blocks
from ..report import BlockReport
from ..storage import S3Settings, storage_from_url
from .cluster import WorkerRestarted

log = logging.getLogger(__name__)


def shards_of(calib: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The calibration shards: windows in batches of `batch_size` (the last may be shorter)."""
    return list(calib.split(batch_size))


def _no_leaf(s: int) -> HessianSum:
    raise AssertionError(f"shard {s}'s sums were not sent")  # every shard is in some worker's subtrees


def _fetch(ref: Any) -> HessianSum:
    return ray.get(ref)  # type: ignore[no-any-return]


def _cpu(x: Any) -> Any:
    """A result that can travel to another process (no CUDA tensors in the object store)."""
    if isinstance(x, torch.Tensor):
        return x.cpu()
    if isinstance(x, dict):
        return {k: _cpu(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_cpu(v) for v in x]
    if hasattr(x, "__dataclass_fields__"):
        for name in x.__dataclass_fields__:
            setattr(x, name, _cpu(getattr(x, name)))
    return x


@ray.remote(concurrency_groups={"compute": 1, "io": 1, "control": 1})  # type: ignore[call-overload]
class BlockWorker:
    """Worker `rank` of `size` of one job. Constructed again with the same arguments when Ray restarts it."""

    def __init__(
        self,
        model_dir: str,
        cfg: dict[str, Any],
        checkpoint_url: str,
        job_id: str,
        threads: int,
        s3: dict[str, Any],
        rank: int,
        size: int,
        calib: torch.Tensor,
    ) -> None:
        torch.set_num_threads(threads)  # Ray also sets OMP_NUM_THREADS to the worker's CPUs
        self.model_dir = Path(model_dir)
        self.cfg = CompressionConfig.from_dict(cfg)
        # the coordinator's S3 settings, as a dict: this process reads no environment for them
        self.ckpt = JobCheckpoint(storage_from_url(checkpoint_url, S3Settings.from_dict(s3)), job_id)
        self.calib = calib
        self.shards = len(shards_of(calib, self.cfg.batch_size))
        self.mine = range(rank * self.shards // size, (rank + 1) * self.shards // size)  # a contiguous range
        self.bm = BlockModel(self.model_dir, self.cfg.device)
        self._capture: Capture | None = None
        self._kwargs: Capture | None = None  # every batch size's kwargs (block tuning on worker 0)
        self.held: dict[int, tuple[int, torch.Tensor]] = {}  # shard -> (block, its inputs of that block)
        self.index = -1  # the block in `self.block`
        self.attempt = ""  # the coordinator's token of the block attempt this state belongs to
        self.block: nn.Module | None = None
        self.linears: dict[str, nn.Linear] = {}
        self.fp_out: dict[int, torch.Tensor] = {}  # pass 0's outputs (the FP block's), per shard
        self.results: dict[str, LinearResult] = {}
        self.tune_loss: list[float] | None = None  # block tuning's loss before and after (on worker 0)
        self.layer: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # block tuning: FP weight, H, total
        self.preps: dict[str, dict[str, LinearPrep]] = {}  # by object id: read once per block
        self.done: dict[int, tuple[dict[str, torch.Tensor], dict[str, LinearResult]]] = {}  # for save_block
        self.outbox: dict[int, dict[int, torch.Tensor]] = {}  # block -> its inputs per shard, for save_inputs
        self.busy = 0.0  # seconds of compute, for the coordinator's per-block breakdown
        self._io = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
        self._prefetch: tuple[int, Future[dict[str, torch.Tensor]]] | None = None

    # ---------------------------------------------------------------------------------- state

    def capture(self) -> Capture:
        """Block kwargs per batch shape, and (once) the block-0 inputs of this worker's shards."""
        if self._capture is None:
            mine = [shards_of(self.calib, self.cfg.batch_size)[s] for s in self.mine]
            cap = self.bm.capture(torch.cat(mine), self.cfg.batch_size) if mine else Capture()
            self._capture = cap
            self.held.update({s: (0, x) for s, x in zip(self.mine, cap.inputs, strict=True)})
            cap.inputs = []
        return self._capture

    def _all_kwargs(self) -> Capture:
        """The blocks' keyword arguments for every shard's batch size (an embedding pass over all windows, once)."""
        if self._kwargs is None:
            bm = BlockModel(self.model_dir, self.cfg.device)
            self._kwargs = bm.capture(self.calib, self.cfg.batch_size)
            self._kwargs.inputs = []
        return self._kwargs

    def _inputs(self, index: int, shard: int) -> torch.Tensor:
        held = self.held.get(shard)
        if held is not None and held[0] == index:
            return held[1]
        if index == 0:  # a restarted worker, or block 0 redone: the embedding pass again
            self._capture = None
            self.capture()
            return self.held[shard][1]
        log.warning("block %d: inputs of shard %d read from the checkpoint", index, shard)
        x = self.ckpt.load_inputs(index, shard).to(self.cfg.device)
        self.held[shard] = (index, x)
        return x

    def _load(self, index: int) -> None:
        """A fresh copy of block `index` (FP weights), from the prefetch when it read this block."""
        if self.block is not None:
            self.bm.unload_block(self.index)
        sd = None
        if self._prefetch is not None and self._prefetch[0] == index:
            sd = self._prefetch[1].result()
        self._prefetch = None
        self.block = self.bm.load_block(index, sd)
        self.index = index
        self.linears = block_linears(self.bm, index, self.block, self.cfg)
        self.fp_out, self.results, self.preps, self.tune_loss, self.layer = {}, {}, {}, None, {}
        if index + 1 < self.bm.num_blocks:  # the next block's weights are read while this one computes
            self._prefetch = (index + 1, self._io.submit(self.bm.read_block, index + 1))

    def _timed(self, t0: float) -> None:
        self.busy += time.perf_counter() - t0

    def _check(self, attempt: str) -> None:
        """Refuse a step of a block attempt whose earlier steps this process did not run (Ray restarted it)."""
        if attempt != self.attempt or self.block is None:
            raise WorkerRestarted(f"worker has no state of {attempt} (it holds {self.attempt or 'nothing'})")

    # ---------------------------------------------------------------------------------- compute lane

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="control")
    def busy_seconds(self) -> float:
        return self.busy

    @ray.method(concurrency_group="compute")
    def plan(self) -> tuple[list[float | None], list[int]]:
        """The CFS coarse stage, on the whole calibration set (this worker captures all of it)."""
        bm = BlockModel(self.model_dir, self.cfg.device)
        return plan_blocks(bm, bm.capture(self.calib, self.cfg.batch_size), self.cfg, lambda *a: None)

    @ray.method(concurrency_group="compute")
    def begin(self, index: int, attempt: str, first: bool, groups: list[Group]) -> dict[Span, dict[Group, Any]]:
        """Forward of block `index` over this worker's shards with hooks on `groups`: {tree node: {group: ref of its
        Σ x xᵀ}} for the largest nodes of the shards' reduction tree that this worker holds whole. `first`: a new
        attempt at the block (fresh FP weights; the FP outputs are kept)."""
        t0 = time.perf_counter()
        if first:
            self._load(index)
            self.attempt = attempt
        self._check(attempt)
        assert self.block is not None
        capture = self.capture()
        xs = {s: self._inputs(index, s) for s in self.mine}
        out: dict[Span, dict[Group, Any]] = {}
        for lo, hi in tree_cover(0, self.shards, self.mine.start, self.mine.stop):
            ys, sums = forward_shards(self.bm, index, self.block, xs, capture, groups, lo, hi)
            if first:
                self.fp_out.update(ys)
            for acc in sums.values():
                acc.S = acc.S.cpu()
            out[(lo, hi)] = {g: ray.put(acc) for g, acc in sums.items()}
        self._timed(t0)
        return out

    @ray.method(concurrency_group="compute")
    def prepare(self, attempt: str, group: Group, sums: dict[Span, Any]) -> list[Any]:
        """The group's H from the workers' subtree sums (refs by tree node), added over the rest of the fixed tree,
        and the state of each of its linears that needs all rows."""
        t0 = time.perf_counter()
        self._check(attempt)
        known = {span: functools.partial(_fetch, ref) for span, ref in sums.items()}  # one node in memory at a time
        total: HessianSum = tree_sum(0, self.shards, _no_leaf, HessianSum.plus, known)
        out = _cpu(prepare_group(self.linears, group, total, self.cfg))
        self._timed(t0)
        return [ray.put(out)]  # a ref in a list: the coordinator waits on it without fetching the state

    def _prep(self, ref: Any) -> dict[str, LinearPrep]:
        key = ref.hex()
        if key not in self.preps:
            self.preps[key] = ray.get(ref)
        return self.preps[key]

    @ray.method(concurrency_group="compute")
    def solve(self, attempt: str, name: str, r0: int, r1: int, prep: list[Any], n_keep: int) -> list[Any]:
        """Rows [r0, r1) of linear `name`; `prep` holds the ref of its group's state (read once per block)."""
        t0 = time.perf_counter()
        self._check(attempt)
        release_memory()  # what the previous chunk left in the heap
        W = self.linears[name].weight.data[r0:r1]
        out: RowsResult = _cpu(solve_rows(W, self._prep(prep[0])[name], n_keep, self.cfg))
        self._timed(t0)
        return [ray.put(out)]  # a ref in a list: the coordinator waits on it without fetching the rows

    @ray.method(concurrency_group="compute")
    def apply(self, attempt: str, chunks: dict[str, list[Any]], preps: dict[str, list[Any]], n_keep: int) -> None:
        """Each linear's row chunks (refs, in row order) joined and set; `preps` gives its group state's ref."""
        t0 = time.perf_counter()
        self._check(attempt)
        for name, refs in chunks.items():
            prep = self._prep(preps[name][0])[name]
            res = merge_rows(ray.get(refs), prep, n_keep, self.cfg)
            if self.cfg.tune_steps:
                self.layer[name] = (self.linears[name].weight.data.clone(), prep.H, prep.total)
            set_result(self.linears[name], res)
            self.results[name] = res
        self._timed(t0)

    @ray.method(concurrency_group="compute")
    def tune_data(self, attempt: str) -> list[Any]:
        """This worker's shards' inputs of the block and the FP block's outputs on them (block tuning's data)."""
        self._check(attempt)
        data = {s: (self._inputs(self.index, s).cpu(), self.fp_out[s].cpu()) for s in self.mine}
        return [ray.put(data)]

    @ray.method(concurrency_group="compute")
    def tune(self, attempt: str, data: list[list[Any]]) -> list[Any]:
        """Block tuning (`workers.blocktune`) on every shard, gathered here in shard order: the local path's
        computation on the same data. Returns the ref of the results of the tuned linears."""
        t0 = time.perf_counter()
        self._check(attempt)
        assert self.block is not None
        shards: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for refs in data:
            shards.update(ray.get(refs[0]))
        dev = self.cfg.device
        xs = [shards[s][0].to(dev) for s in range(self.shards)]
        ys = [shards[s][1].to(dev) for s in range(self.shards)]
        capture = self.capture()
        if any((self.index, x.shape[0]) not in capture.kwargs for x in xs):  # a batch size only others hold
            capture = self._all_kwargs()
        out = tune_block(
            self.bm, self.index, self.block, self.linears, self.results, xs, ys, capture, self.cfg, self.layer
        )
        self.results, self.tune_loss = out.results, [out.loss_before, out.loss_after]
        self._timed(t0)
        return [ray.put(_cpu(dict(out.results)))]

    @ray.method(concurrency_group="compute")
    def set_tuned(self, attempt: str, results: list[Any]) -> None:
        """The tuned results (a ref in a list) set in this worker's copy of the block."""
        self._check(attempt)
        for name, res in ray.get(results[0]).items():
            set_result(self.linears[name], res)
            self.results[name] = res

    @ray.method(concurrency_group="compute")
    def advance(self, index: int, attempt: str, report: BlockReport | None) -> BlockReport | None:
        """This worker's shards on to block `index + 1`: the compressed block's outputs (sequential) or the FP
        block's. With `report` (worker 0): the block's tensors and results kept for `save_block`, and the report
        returned with its linears."""
        t0 = time.perf_counter()
        self._check(attempt)
        assert self.block is not None
        sequential = self.linears and self.cfg.propagation == "sequential"
        for s in self.mine:
            if sequential or s not in self.fp_out:
                (y,) = self.bm.run_block(index, self.block, [self._inputs(index, s)], self.capture())
            else:
                y = self.fp_out[s]
            self.held[s] = (index + 1, y)
        if index + 1 < self.bm.num_blocks:
            self.outbox[index + 1] = {s: self.held[s][1] for s in self.mine}
        if report is not None:
            report.tune_loss = self.tune_loss
            self.done[index] = finish_block(self.bm, index, self.block, self.linears, self.results, self.cfg, report)
        self.bm.unload_block(index)
        self.block, self.index, self.fp_out, self.preps, self.attempt, self.layer = None, -1, {}, {}, "", {}
        release_memory()
        self._timed(t0)
        return report

    # ---------------------------------------------------------------------------------- io lane

    @ray.method(concurrency_group="io")
    def save_inputs(self, index: int) -> dict[str, str]:
        """This worker's shards' inputs of block `index` into the checkpoint: {file name: sha256}."""
        if index not in self.outbox:
            raise WorkerRestarted(f"no inputs of block {index} are held here")
        files = {}
        for s, x in self.outbox.pop(index).items():
            name, sha = self.ckpt.save_inputs(index, s, x)
            files[name] = sha
        return files

    @ray.method(concurrency_group="io")
    def save_block(self, index: int, report: BlockReport, *inputs: dict[str, str]) -> None:
        """The block's checkpoint (worker 0), its marker naming the shards' input files `inputs` (written)."""
        if index not in self.done:
            raise WorkerRestarted(f"block {index} is not held here")
        tensors, results = self.done.pop(index)
        files = {k: v for d in inputs for k, v in d.items()}
        self.ckpt.save_block(index, tensors, results, report, self.cfg, files)
