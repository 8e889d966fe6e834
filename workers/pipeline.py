"""The per-block sequential pipeline on one machine.

Blocks of the model are streamed from safetensors one at a time: the model skeleton lives on the meta
device, block l's weights are loaded, its linears' Hessians are collected from the calibration inputs,
every linear is compressed (independent given H), and the block's outputs become the next block's inputs.
Peak memory: one block + the calibration activations (+ the embedding, to make the block-0 inputs).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from pbs2p_core.artifact import MANIFEST_FILE, ArtifactWriter
from pbs2p_core.bits import BitCount, count_bits
from pbs2p_core.cfs import allocate, block_cosine, block_importance
from pbs2p_core.config import CompressionConfig, NMPattern
from pbs2p_core.errors import Pbs2pError
from pbs2p_core.families import Family, family_for
from pbs2p_core.hessian import HessianAccumulator
from pbs2p_core.solver import LinearResult, compress_linear

from .checkpoint import WeightReader

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]
    n_keep: int
    rel_error: float
    damping: float
    retries: int
    bits: dict[str, float]


@dataclass
class BlockReport:
    index: int
    n_keep: int
    cosine: float | None
    seconds: float
    linears: list[LinearReport] = field(default_factory=list)


@dataclass
class CompressReport:
    config: dict[str, Any]
    model_type: str
    blocks: list[BlockReport]
    bits: dict[str, float]
    mean_rel_error: float
    seconds: float
    calib_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Stop(Exception):
    """Raised by the last recorder: the capture forward needs no more of the model."""


class _Recorder(nn.Module):
    """Stands in for decoder block `index` during capture: records its inputs' keyword arguments
    (attention mask, position embeddings: they differ per layer type, e.g. sliding vs full in Gemma)."""

    def __init__(self, index: int, last: bool, store: _Capture) -> None:
        super().__init__()
        self.index, self.last, self.store = index, last, store

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        key = (self.index, hidden_states.shape[0])
        self.store.kwargs.setdefault(key, kwargs)
        if self.index == 0:
            self.store.inputs.append(hidden_states.detach())
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class _Capture:
    inputs: list[torch.Tensor] = field(default_factory=list)
    kwargs: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)


class BlockModel:
    """A causal LM whose decoder blocks are loaded from safetensors one at a time."""

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        self.dir = Path(model_dir)
        if (self.dir / MANIFEST_FILE).is_file():
            raise Pbs2pError(
                f"{self.dir} is a compressed pbs2p artifact, not a source model; compress the original model "
                f"(or turn the artifact into a plain checkpoint with `pbs2p export-dense`)"
            )
        self.device = torch.device(device)
        self.config = AutoConfig.from_pretrained(self.dir)  # never trust_remote_code
        self.family: Family = family_for(self.config.model_type)
        with init_empty_weights():  # parameters on meta; buffers (rotary inv_freq) real
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.reader = WeightReader(self.dir)
        self.base = getattr(self.model, self.family.base)
        self.blocks: list[nn.Module] = list(getattr(self.base, self.family.layers))
        self.layer_root = f"{self.family.base}.{self.family.layers}."

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def rest_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the decoder blocks (embeddings, final norm, head), as stored."""
        return self.reader.load([n for n in self.reader.names() if not n.startswith(self.layer_root)])

    def capture(self, calib: torch.Tensor, batch_size: int) -> _Capture:
        """Inputs of block 0 and each block's keyword arguments, per calibration batch."""
        rest = {k: v.to(torch.float32) for k, v in self.rest_tensors().items()}
        self.model.load_state_dict(rest, strict=False, assign=True)
        for name, child in self.base.named_children():
            if name != self.family.layers:
                child.to(self.device)
        store = _Capture()
        L = self.num_blocks
        setattr(self.base, self.family.layers, nn.ModuleList(_Recorder(i, i == L - 1, store) for i in range(L)))
        try:
            with torch.no_grad():
                for batch in calib.split(batch_size):
                    with contextlib.suppress(_Stop):
                        self.base(input_ids=batch.to(self.device), use_cache=False)
        finally:
            setattr(self.base, self.family.layers, nn.ModuleList(self.blocks))
            for name, child in self.base.named_children():  # free the embedding: only inputs are needed
                if name != self.family.layers:
                    child.to("meta")
        return store

    def load_block(self, index: int) -> nn.Module:
        block = self.blocks[index]
        sd = {k: v.to(torch.float32) for k, v in self.reader.load_prefix(f"{self.layer_root}{index}.").items()}
        block.load_state_dict(sd, strict=True, assign=True)
        return block.to(self.device).eval()

    def unload_block(self, index: int) -> None:
        self.blocks[index].to("meta")

    @torch.no_grad()
    def run_block(
        self, index: int, block: nn.Module, inputs: list[torch.Tensor], store: _Capture
    ) -> list[torch.Tensor]:
        return [block(x, **store.kwargs[(index, x.shape[0])]) for x in inputs]


def _skipped(full_name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(full_name, p) for p in patterns)


def _collect_hessians(
    bm: BlockModel, index: int, block: nn.Module, xs: list[torch.Tensor], store: _Capture, linears: dict[str, nn.Linear]
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run the block on its calibration inputs with a hook on each linear: (block outputs, H per linear)."""
    accs = {name: HessianAccumulator(lin.in_features, bm.device) for name, lin in linears.items()}
    hooks = [
        lin.register_forward_hook(lambda mod, inp, out, acc=accs[name]: acc.add_batch(inp[0]))
        for name, lin in linears.items()
    ]
    try:
        ys = bm.run_block(index, block, xs, store)
    finally:
        for h in hooks:
            h.remove()
    return ys, {name: acc.H for name, acc in accs.items()}


def coarse_stage(bm: BlockModel, store: _Capture, cfg: CompressionConfig, progress: ProgressFn) -> list[float]:
    """CFS coarse stage on the FP model: c_l = mean over tokens of cos(h_in, h_out) of block l.

    A mean cosine is a stable statistic: it is taken over the first `cfs_samples` calibration windows
    (whole batches), which keeps this extra FP pass cheap."""
    xs, windows = [], 0
    for x in store.inputs:
        if windows >= cfg.cfs_samples:
            break
        xs.append(x)
        windows += x.shape[0]
    tokens = sum(x.shape[0] * x.shape[1] for x in xs)
    cosines = []
    for i in range(bm.num_blocks):
        block = bm.load_block(i)
        ys = bm.run_block(i, block, xs, store)
        cosines.append(float(sum(block_cosine(x, y) for x, y in zip(xs, ys, strict=True)) / tokens))
        bm.unload_block(i)
        xs = ys
        progress("coarse", i + 1, bm.num_blocks)
    return cosines


def compress_model(
    model_dir: Path,
    out_dir: Path,
    cfg: CompressionConfig,
    calib: torch.Tensor,
    progress: ProgressFn | None = None,
) -> CompressReport:
    """Compress the model at `model_dir` with `cfg` on calibration windows `calib` (n, seqlen) into `out_dir`."""
    t0 = time.perf_counter()
    progress = progress or (lambda stage, done, total: None)
    bm = BlockModel(model_dir, cfg.device)
    writer = ArtifactWriter(out_dir, model_dir, cfg)
    try:
        report = _run(bm, writer, cfg, calib, progress)
        report.seconds = time.perf_counter() - t0
        writer.finish(report)
        return report
    except BaseException:
        writer.abort()
        raise


def _run(
    bm: BlockModel, writer: ArtifactWriter, cfg: CompressionConfig, calib: torch.Tensor, progress: ProgressFn
) -> CompressReport:
    store = bm.capture(calib, cfg.batch_size)
    progress("capture", 1, 1)
    L, m = bm.num_blocks, cfg.pattern.m
    cosines: list[float | None] = [None] * L
    n_blocks = [cfg.pattern.n] * L
    if cfg.method != "fp" and cfg.prunes and cfg.allocation == "cfs":
        cos = coarse_stage(bm, store, cfg, progress)
        cosines = list(cos)
        n_blocks = allocate(block_importance(cos), cfg.pattern.n, m, cfg.cfs_spread)
        log.info("CFS kept counts per block: %s", n_blocks)
    total_bits = BitCount()
    blocks: list[BlockReport] = []
    xs = store.inputs
    for i in range(L):
        tb = time.perf_counter()
        block = bm.load_block(i)
        prefix = f"{bm.layer_root}{i}."
        linears: dict[str, nn.Linear] = {
            name: block.get_submodule(name)  # type: ignore[misc]
            for name in bm.family.linears
            if cfg.method != "fp" and not _skipped(prefix + name, cfg.skip_modules)
        }
        report = BlockReport(i, n_blocks[i] if cfg.prunes else m, cosines[i], 0.0)
        results: dict[str, LinearResult] = {}
        # one calibration pass collects every H of the block; "true sequential" makes one pass per group
        # of linears that see the same input, so later groups are calibrated on the compressed earlier ones
        groups = bm.family.groups if cfg.true_sequential else (bm.family.linears,)
        fp_ys = None
        for group in groups:
            todo = {name: linears[name] for name in group if name in linears}
            if not todo:
                continue
            ys, hessians = _collect_hessians(bm, i, block, xs, store, todo)
            fp_ys = fp_ys if fp_ys is not None else ys  # the first pass runs the FP block
            for name, lin in todo.items():
                res: LinearResult = compress_linear(lin.weight.data, hessians.pop(name), n_blocks[i], cfg)
                lin.weight.data = res.weight.to(lin.weight.dtype)
                results[f"{prefix}{name}.weight"] = res
                # the mask costs what this linear's own N needs (CFS gives blocks different N), none when dense
                mask_bits = NMPattern(res.n_keep, m).mask_bits_per_group if res.n_keep < m else 0
                bits = count_bits(res.blocks, res.n_keep, m, mask_bits)
                total_bits.add(bits)
                shape = (lin.out_features, lin.in_features)
                report.linears.append(
                    LinearReport(
                        prefix + name, shape, res.n_keep, res.rel_error, res.damping, res.retries, bits.to_dict()
                    )
                )
                if res.retries:
                    log.warning("%s: Hessian needed damping %g (%d retries)", prefix + name, res.damping, res.retries)
        ys = fp_ys if fp_ys is not None else bm.run_block(i, block, xs, store)
        if linears and cfg.propagation == "sequential":
            ys = bm.run_block(i, block, xs, store)  # outputs of the compressed block
        writer.write_block(i, {prefix + k: v for k, v in block.state_dict().items()}, results)
        bm.unload_block(i)
        xs = ys
        report.seconds = time.perf_counter() - tb
        blocks.append(report)
        progress("compress", i + 1, L)
    writer.write_rest(bm.rest_tensors())
    errs = [lr.rel_error for b in blocks for lr in b.linears]
    return CompressReport(
        config=cfg.to_dict(),
        model_type=bm.config.model_type,
        blocks=blocks,
        bits=total_bits.to_dict() if errs else {},
        mean_rel_error=sum(errs) / len(errs) if errs else 0.0,
        seconds=0.0,
        calib_tokens=int(calib.numel()),
    )
