"""A compression job in this process: the blocks streamed in order, each compressed and written as it is done."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pbs2p.core.config import CompressionConfig
from pbs2p.core.format import ArtifactWriter

from .block import compress_block
from .model_stream import BlockModel
from .plan import plan_blocks
from .report import BlockReport, CompressReport, ProgressFn, build_report


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
    capture = bm.capture(calib, cfg.batch_size)
    progress("capture", 1, 1)
    cosines, n_blocks = plan_blocks(bm, capture, cfg, progress)
    blocks: list[BlockReport] = []
    xs = capture.inputs  # one calibration shard per batch
    for i in range(bm.num_blocks):
        out = compress_block(bm, i, xs, capture, cfg, n_blocks[i], cosines[i])
        writer.write_block(i, out.tensors, out.results)
        xs = out.outputs
        blocks.append(out.report)
        progress("compress", i + 1, bm.num_blocks)
    writer.write_rest(bm.rest_tensors())
    return build_report(bm.config.model_type, cfg, blocks, int(calib.numel()))
