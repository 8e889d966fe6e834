"""Checks of written artifacts: their files' hashes, decoded tensors, stored N:M masks, model logits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from pbs2p.core.families import family_for
from pbs2p.core.format import MANIFEST_FILE, TIMINGS_FILE, dense_state_dict, unpack_linear, verify_artifact
from pbs2p.core.format.loader import iter_files
from pbs2p.workers.report import CompressReport

from .tiny import BATCH


def file_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file of the artifact, the manifest included (wall-clock times are in timings.json)."""
    files = [f for f in sorted(out.iterdir()) if f.name != TIMINGS_FILE]
    assert any(f.name == MANIFEST_FILE for f in files), f"{out} has no {MANIFEST_FILE}"
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the artifact at `out` (verified), compressed linears decoded to their dense Ŵ."""
    return dense_state_dict(out)


def saved_report(out: Path) -> dict[str, Any]:
    return dict(json.loads((out / MANIFEST_FILE).read_text())["report"])


@torch.no_grad()
def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(input_ids=b, use_cache=False).logits for b in ids.split(BATCH)])


def linear_names(model_type: str, layers: int) -> list[str]:
    fam = family_for(model_type)
    return [f"{fam.layer_prefix(i)}{name}.weight" for i in range(layers) for name in fam.linears]


def group_nonzeros(w: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros in every group of m consecutive input columns, per row: (rows, in/m)."""
    return (w.reshape(w.shape[0], -1, m) != 0).sum(-1)


def stored_masks(out: Path) -> dict[str, torch.Tensor]:
    """The N:M masks the artifact stores, per compressed linear's weight name."""
    art = verify_artifact(out)
    masks = {}
    for _, _, packed in iter_files(art):
        for name, fields in packed.items():
            masks[name] = torch.cat([code.mask for code in unpack_linear(fields, art.linears[name])], 1)
    return masks


def source_tensors(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_nm(out: Path, report: CompressReport, source: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    """Every compressed linear stores exactly its block's N in every group of 8; the decoded weights have at most
    N nonzeros per group (a kept weight may decode to exactly 0, e.g. where its row's alpha B + mu is 0)."""
    got = tensors(out)
    masks = stored_masks(out)
    checked = 0
    for b in report.blocks:
        compressed = {lr.name: lr for lr in b.linears}
        for name in linear_names(report.model_type, len(report.blocks)):
            if not name.startswith(family_for(report.model_type).layer_prefix(b.index)) or any(s in name for s in skip):
                continue
            assert name.removesuffix(".weight") in compressed, name
            assert compressed[name.removesuffix(".weight")].n_keep == b.n_keep
            counts = group_nonzeros(got[name], 8)
            assert int(counts.max()) <= b.n_keep, name
            assert (group_nonzeros(masks[name], 8) == b.n_keep).all(), name
            assert not torch.equal(got[name], source[name]), name
            checked += 1
    assert checked == sum(len(b.linears) for b in report.blocks) > 0
