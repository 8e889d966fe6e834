"""What a compression job reports: per linear, per block, for the job (the manifest's `report`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from pbs2p.core.bits import BitCount
from pbs2p.core.config import CompressionConfig

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
    # a Ray job's wall seconds per step of the block's schedule (forward, reduce, solve, transfer, advance,
    # checkpoint) and the workers' busy and idle seconds in it: timings, kept out of the manifest
    phases: dict[str, float] = field(default_factory=dict)
    tune_loss: list[float] | None = None  # block tuning (block_tune_steps): the block's loss before, after it


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
