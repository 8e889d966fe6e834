"""The per-block sequential pipeline on one machine.

Blocks of the model are streamed from safetensors one at a time: the model skeleton lives on the meta
device, block l's weights are loaded, its linears' Hessians are collected from the calibration inputs,
every linear is compressed (independent given H), and the block's outputs become the next block's inputs.
Peak memory: one block + the calibration activations (+ the embedding, to make the block-0 inputs).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fnmatch
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from pbs2p_core.bits import BitCount, count_bits
from pbs2p_core.cfs import allocate, allocate_by_error, block_cosine, block_importance, n_bounds
from pbs2p_core.config import CompressionConfig, NMPattern
from pbs2p_core.errors import Pbs2pError
from pbs2p_core.families import Family, family_for
from pbs2p_core.format import MANIFEST_FILE, ArtifactWriter
from pbs2p_core.hessian import HessianAccumulator
from pbs2p_core.skeleton import empty_causal_lm
from pbs2p_core.solver import LinearResult, compress_linear, oneshot_linear

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
    rel_error_oneshot: float | None = None  # one-shot prune-binarize on the same weights (config spbo_report)


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
        self.model = empty_causal_lm(self.config)  # parameters on meta; buffers (rotary inv_freq) real
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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


def release_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed blocks of tensors in its arenas, so without
    this a job's resident memory creeps up block after block (fragmentation, not data: measured +25 MB per
    block on a 512-wide model), and the peak would grow with the number of blocks."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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


def coarse_stage(
    bm: BlockModel, store: _Capture, cfg: CompressionConfig, progress: ProgressFn
) -> tuple[list[float], list[dict[int, float]]]:
    """CFS coarse stage on the FP model: c_l = mean over tokens of cos(h_in, h_out) of block l, and with
    cfs_score "error" also e_l(N) for every candidate N (see `block_errors`).

    Both are taken over the first `cfs_samples` calibration windows (whole batches), which keeps this
    extra FP pass cheap."""
    xs, windows = [], 0
    for x in store.inputs:
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
            ys, hessians = _collect_hessians(bm, i, block, xs, store, linears)
            errors.append(block_errors(bm, i, block, xs, ys, store, linears, hessians, cfg))
        else:
            ys = bm.run_block(i, block, xs, store)
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
    store: _Capture,
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
            yq = bm.run_block(index, block, xs, store)
            rel = [
                ((a - b).double().pow(2).sum(-1) / b.double().pow(2).sum(-1).clamp_min(1e-30))
                for a, b in zip(yq, ys, strict=True)
            ]
            out[n] = float(torch.cat([r.flatten() for r in rel]).mean())
    finally:
        for name, lin in linears.items():
            lin.weight.data = fp[name]
    return out


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


def plan_blocks(
    bm: BlockModel, store: _Capture, cfg: CompressionConfig, progress: ProgressFn
) -> tuple[list[float | None], list[int]]:
    """(cosine per block or None, N per block): the CFS coarse stage, or N_t everywhere."""
    L = bm.num_blocks
    if cfg.method != "fp" and cfg.prunes and cfg.allocation == "cfs":
        cos, errors = coarse_stage(bm, store, cfg, progress)
        if cfg.ablations.cfs_score == "error":
            n_blocks = allocate_by_error(errors, cfg.pattern.n)
            log.info("CFS block errors per N: %s", [{n: round(e, 5) for n, e in d.items()} for d in errors])
        else:
            n_blocks = allocate(block_importance(cos), cfg.pattern.n, cfg.pattern.m, cfg.ablations.cfs_spread)
        log.info("CFS kept counts per block: %s", n_blocks)
        return list(cos), n_blocks
    return [None] * L, [cfg.pattern.n] * L


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
    store: _Capture,
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
        ys, hessians = _collect_hessians(bm, i, block, xs, store, todo)
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
    ys = fp_ys if fp_ys is not None else bm.run_block(i, block, xs, store)
    if linears and cfg.propagation == "sequential":
        ys = bm.run_block(i, block, xs, store)  # outputs of the compressed block
    tensors = {prefix + k: v for k, v in block.state_dict().items()}
    bm.unload_block(i)
    release_memory()
    report.seconds = time.perf_counter() - tb
    return BlockOutcome(tensors, results, report, ys)


def build_report(
    model_type: str, cfg: CompressionConfig, blocks: list[BlockReport], calib_tokens: int
) -> CompressReport:
    """The job's report from its block reports (totals summed in block and linear order)."""
    total_bits = BitCount()
    for lr in (lr for b in blocks for lr in b.linears):
        total_bits.add(BitCount(**{f.name: int(lr.bits[f.name]) for f in fields(BitCount)}))
    errs = [lr.rel_error for b in blocks for lr in b.linears]
    return CompressReport(
        config=cfg.to_dict(),
        model_type=model_type,
        blocks=blocks,
        bits=total_bits.to_dict() if errs else {},
        mean_rel_error=sum(errs) / len(errs) if errs else 0.0,
        seconds=0.0,
        calib_tokens=calib_tokens,
    )


def _run(
    bm: BlockModel, writer: ArtifactWriter, cfg: CompressionConfig, calib: torch.Tensor, progress: ProgressFn
) -> CompressReport:
    store = bm.capture(calib, cfg.batch_size)
    progress("capture", 1, 1)
    cosines, n_blocks = plan_blocks(bm, store, cfg, progress)
    blocks: list[BlockReport] = []
    xs = store.inputs
    solve = solve_here(cfg)
    for i in range(bm.num_blocks):
        out = compress_block(bm, i, xs, store, cfg, n_blocks[i], cosines[i], solve)
        writer.write_block(i, out.tensors, out.results)
        xs = out.outputs
        blocks.append(out.report)
        progress("compress", i + 1, bm.num_blocks)
    writer.write_rest(bm.rest_tensors())
    return build_report(bm.config.model_type, cfg, blocks, int(calib.numel()))
