"""A job's worker: a Ray actor with three lanes (lead: a whole block; linear: one `compress_linear`; fp: the
full-precision pass of independent propagation). It sets its device up once and only moves data."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import ray
import torch

from pbs2p.core.config import CompressionConfig
from pbs2p.core.solver import LinearResult, compress_linear

from ..block import LinearSolver, compress_block
from ..checkpoints import JobCheckpoint
from ..model_stream import BlockModel, Capture, release_memory
from ..plan import plan_blocks
from ..storage import S3Settings, storage_from_url

log = logging.getLogger(__name__)

LINEAR_RETRIES = 3  # a linear (or FP step) whose worker died is retried on the restarted worker


def _to_cpu(res: LinearResult) -> LinearResult:
    """A result that can travel to another process (no CUDA tensors in the object store)."""
    for b in res.blocks:
        b.mask, b.sign, b.salient, b.sign2 = b.mask.cpu(), b.sign.cpu(), b.salient.cpu(), b.sign2.cpu()
        b.scales = {k: v.cpu() for k, v in b.scales.items()}
    res.weight = res.weight.cpu()
    return res


@ray.remote(concurrency_groups={"lead": 1, "linear": 1, "fp": 1, "control": 1})  # type: ignore[call-overload]
class BlockWorker:
    """One worker of one job. Constructed again with the same arguments when Ray restarts it."""

    def __init__(
        self, model_dir: str, cfg: dict[str, Any], checkpoint_url: str, job_id: str, threads: int, s3: dict[str, Any]
    ) -> None:
        torch.set_num_threads(threads)  # Ray also sets OMP_NUM_THREADS to the worker's CPUs
        self.model_dir = Path(model_dir)
        self.cfg = CompressionConfig.from_dict(cfg)
        # the coordinator's S3 settings, as a dict: this process reads no environment for them
        self.ckpt = JobCheckpoint(storage_from_url(checkpoint_url, S3Settings.from_dict(s3)), job_id)
        self._lock = threading.Lock()
        self._captured: Capture | None = None
        self._lead_bm: BlockModel | None = None
        self._fp_bm: BlockModel | None = None
        self._next: tuple[int, list[torch.Tensor] | None] = (-1, None)  # sequential: (block, its inputs)
        self._fp: tuple[int, list[torch.Tensor] | None] = (-1, None)  # FP pass: (block, its FP inputs)

    # ---------------------------------------------------------------------------------- shared state

    def _model(self, which: str) -> BlockModel:
        with self._lock:  # one skeleton per lane: lanes load and unload blocks independently
            if which == "lead":
                if self._lead_bm is None:
                    self._lead_bm = BlockModel(self.model_dir, self.cfg.device)
                return self._lead_bm
            if self._fp_bm is None:
                self._fp_bm = BlockModel(self.model_dir, self.cfg.device)
            return self._fp_bm

    def _capture(self, calib: torch.Tensor, fresh_inputs: bool = False) -> Capture:
        """Block kwargs per calibration batch (and block-0 inputs), from the embedding pass, made once."""
        with self._lock:
            if self._captured is None or (fresh_inputs and not self._captured.inputs):
                bm = BlockModel(self.model_dir, self.cfg.device)
                self._captured = bm.capture(calib, self.cfg.batch_size)
            return self._captured

    def _block0_inputs(self, calib: torch.Tensor) -> list[torch.Tensor]:
        capture = self._capture(calib, fresh_inputs=True)
        with self._lock:
            xs, capture.inputs = capture.inputs, []  # one owner at a time; a later caller captures again
        return xs

    # ------------------------------------------------------------------------------------------ lanes

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        return os.getpid()

    @ray.method(concurrency_group="lead")
    def plan(self, calib: torch.Tensor) -> tuple[list[float | None], list[int]]:
        return plan_blocks(self._model("lead"), self._capture(calib, fresh_inputs=True), self.cfg, lambda *a: None)

    @ray.method(concurrency_group="linear", max_task_retries=LINEAR_RETRIES)
    def compress(self, W: torch.Tensor, H: torch.Tensor, n_keep: int) -> LinearResult:
        release_memory()  # what the previous linear left in the heap
        dev = self.cfg.device
        return _to_cpu(compress_linear(W.to(dev), H.to(dev), n_keep, self.cfg))

    @ray.method(concurrency_group="fp", max_task_retries=LINEAR_RETRIES)
    def fp_inputs(self, index: int, calib: torch.Tensor) -> list[torch.Tensor]:
        """The full-precision inputs of block `index`; calls come in increasing order (else the pass restarts)."""
        nxt, xs = self._fp
        self._fp = (-1, None)
        if xs is None or nxt > index:
            nxt, xs = 0, self._block0_inputs(calib)
        bm, capture = self._model("fp"), self._capture(calib)
        while nxt < index:
            ys = bm.run_block(nxt, bm.load_block(nxt), xs, capture)
            bm.unload_block(nxt)
            release_memory()
            nxt, xs = nxt + 1, ys
        self._fp = (nxt, xs)
        return [x.cpu() for x in xs]

    @ray.method(concurrency_group="lead")
    def run_block(
        self,
        index: int,
        n_keep: int,
        cosine: float | None,
        pool: list[Any],
        calib: torch.Tensor,
        inputs: list[torch.Tensor] | None = None,
    ) -> int:
        """Compress block `index` and checkpoint it. Inputs: given (independent propagation), or this worker's
        outputs of the previous block, or (after a restart) the ones saved with the previous block."""
        cfg = self.cfg
        bm = self._model("lead")
        if inputs is not None:
            xs = [x.to(cfg.device) for x in inputs]
        else:
            nxt, held = self._next
            self._next = (-1, None)
            if nxt == index and held is not None:
                xs, held = held, None
            elif index == 0:
                xs = self._block0_inputs(calib)
            else:
                log.warning("block %d: inputs read from the checkpoint (this worker did not hold them)", index)
                xs = [x.to(cfg.device) for x in self.ckpt.load_inputs(index)]
        out = compress_block(bm, index, xs, self._capture(calib), cfg, n_keep, cosine, self._fan_out(pool))
        del xs
        sequential = cfg.propagation == "sequential"
        keep = sequential and index + 1 < bm.num_blocks
        self.ckpt.save_block(index, out.tensors, out.results, out.report, cfg, out.outputs if keep else None)
        if sequential:
            self._next = (index + 1, out.outputs)
        return index

    def _fan_out(self, pool: list[Any]) -> LinearSolver:
        """One `compress` call per linear, at most one in flight per worker; W and H go into the object store
        once each (the worker that runs the linear reads them from there)."""

        def solve(work: dict[str, tuple[torch.Tensor, torch.Tensor]], n_keep: int) -> dict[str, LinearResult]:
            names = list(work)
            free = list(range(len(pool)))
            pending: dict[Any, tuple[str, int]] = {}
            out: dict[str, LinearResult] = {}

            def collect_one() -> None:
                done, _ = ray.wait(list(pending), num_returns=1)
                name, k = pending.pop(done[0])
                out[name] = ray.get(done[0])
                free.append(k)

            for name in names:
                if not free:
                    collect_one()
                W, H = work.pop(name)
                k = free.pop(0)
                ref = pool[k].compress.remote(ray.put(W.detach().cpu()), ray.put(H.cpu()), n_keep)
                pending[ref] = (name, k)
            while pending:
                collect_one()
            return {name: out[name] for name in names}

        return solve
