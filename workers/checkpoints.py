"""Checkpoints of a job, for resume: one prefix per job id in a Storage (local directory or S3).

Layout under `<job_id>/`:
- `job.json`: the fingerprint (model, config, calibration data, code version), written when the job starts.
- `plan.json`: N and the CFS cosine per block (the coarse stage is not redone on resume).
- `block-00003.safetensors` + `block-00003.json`: the compressed block. Plain tensors (norms, skipped
  linears) under their names; every compressed linear packed exactly as the artifact packs it (`pack_linear`,
  fields `name:sign`, `name:mask`, ...), its layout and report numbers in the JSON.
- `inputs-00004-s0003.safetensors`: the calibration inputs of block 4 for shard 3 (the outputs of block 3), one
  file per shard, written by the worker that holds the shard. Only the newest two blocks' are kept.
The block's JSON is written LAST and holds the sha256 of the block's files: a block without it is not done,
and a file that does not match it is refused. Everything is safetensors or JSON; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import re
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pbs2p.core.config import CompressionConfig
from pbs2p.core.errors import Pbs2pError
from pbs2p.core.format import pack_linear
from pbs2p.core.format.manifest import SEP
from pbs2p.core.solver import LinearResult

from .report import BlockReport, LinearReport
from .storage import ObjectNotFound, Storage

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 2
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# the sources whose code decides the numbers: a change to any of them invalidates checkpoints. Every .py file
# below them, subpackages included: the core computes the numbers, workers decide what it is fed and in which
# order (a file moved or added anywhere there changes the fingerprint). Paths are taken inside the installed
# `pbs2p` package (not resolved: in the repository pbs2p/core links to pbs2p_core/), so a wheel and a checkout of
# the same sources have the same code version.
_ROOT = Path(__file__).parent.parent
_CODE_DIRS = ("core", "workers")


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.fullmatch(job_id):
        raise Pbs2pError(
            f"job id {job_id!r} is not usable; use 1-64 letters, digits, '.', '_' or '-', starting with a "
            f"letter or digit (e.g. llama-7b-6of8)"
        )
    return job_id


def code_version(root: Path = _ROOT) -> str:
    """The package version and a hash of the sources that decide the compressed numbers (under `root`): every
    .py file below `_CODE_DIRS`, sorted by relative path."""
    tree = sorted(
        (p for d in _CODE_DIRS for p in (root / d).rglob("*.py")), key=lambda p: p.relative_to(root).as_posix()
    )
    h = hashlib.sha256()
    for p in tree:
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    try:
        version = importlib.metadata.version("pbs2p")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return f"pbs2p {version} checkpoint {CHECKPOINT_FORMAT} src {h.hexdigest()[:16]}"


def model_fingerprint(model_dir: Path) -> str:
    """config.json, the safetensors index and every weight file's name and size (not their content: hashing a
    70B model on every start costs minutes; a re-exported model changes sizes or the index)."""
    d = Path(model_dir)
    h = hashlib.sha256((d / "config.json").read_bytes())
    index = d / "model.safetensors.index.json"
    if index.is_file():
        h.update(index.read_bytes())
    for f in sorted(d.glob("*.safetensors")):
        h.update(f"\0{f.name}\0{f.stat().st_size}".encode())
    return h.hexdigest()


def fingerprint(model_dir: Path, cfg: CompressionConfig, calib: torch.Tensor) -> dict[str, str]:
    """What a checkpoint was computed from, part by part (so a mismatch can say which part changed)."""
    ids = calib.detach().to("cpu").contiguous()
    calib_h = hashlib.sha256(f"{ids.dtype} {list(ids.shape)}".encode() + ids.numpy().tobytes())
    return {
        "model": model_fingerprint(model_dir),
        "config": hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest(),
        "calibration": calib_h.hexdigest(),
        "code": code_version(),
    }


def _block_report(d: dict[str, Any]) -> BlockReport:
    linears = [LinearReport(**{**lr, "shape": tuple(lr["shape"])}) for lr in d["linears"]]
    phases = dict(d.get("phases") or {})
    return BlockReport(d["index"], d["n_keep"], d["cosine"], d["seconds"], linears, phases, d.get("tune_loss"))


class JobCheckpoint:
    """The checkpoints of one job in `storage`, under `<job_id>/`."""

    def __init__(self, storage: Storage, job_id: str) -> None:
        self.storage = storage
        self.job_id = check_job_id(job_id)
        self.prefix = f"{job_id}/"

    def _key(self, name: str) -> str:
        return self.prefix + name

    def where(self) -> str:
        return self.storage.locate(self.prefix)

    # ------------------------------------------------------------------------------------ job and plan

    def open(self, parts: dict[str, str]) -> None:
        """Keep the checkpoints when they were made from the same `parts`; otherwise start over, saying why."""
        try:
            old = json.loads(self.storage.get_bytes(self._key("job.json")))
        except ObjectNotFound:
            old = None
        if old is not None and old.get("fingerprint") == parts:
            return
        if old is not None:
            changed = sorted(k for k in parts if old.get("fingerprint", {}).get(k) != parts[k])
            log.warning(
                "job %s: the checkpoints in %s were made from a different %s; starting over",
                self.job_id,
                self.where(),
                " and ".join(changed) or "checkpoint format",
            )
        stale = self.storage.list(self.prefix)
        if stale:
            self.storage.delete_prefix(self.prefix)
            if old is None:
                log.warning("job %s: %d checkpoint files without a job.json removed", self.job_id, len(stale))
        body = {"format": CHECKPOINT_FORMAT, "job_id": self.job_id, "fingerprint": parts}
        self.storage.put_bytes(json.dumps(body, indent=1).encode(), self._key("job.json"))

    def save_plan(self, cosines: list[float | None], n_keep: list[int]) -> None:
        body = json.dumps({"cosines": cosines, "n_keep": n_keep})
        self.storage.put_bytes(body.encode(), self._key("plan.json"))

    def load_plan(self) -> tuple[list[float | None], list[int]] | None:
        try:
            d = json.loads(self.storage.get_bytes(self._key("plan.json")))
        except ObjectNotFound:
            return None
        return list(d["cosines"]), [int(n) for n in d["n_keep"]]

    def clear(self) -> int:
        return self.storage.delete_prefix(self.prefix)

    # ---------------------------------------------------------------------------------------- blocks

    @staticmethod
    def block_name(index: int) -> str:
        return f"block-{index:05d}"

    @staticmethod
    def inputs_name(index: int, shard: int) -> str:
        return f"inputs-{index:05d}-s{shard:04d}.safetensors"

    def _put_tensors(self, tensors: dict[str, torch.Tensor], name: str) -> str:
        with tempfile.TemporaryDirectory(prefix="pbs2p-ckpt-") as tmp:
            path = Path(tmp) / name
            save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, path)
            info = self.storage.put_file(path, self._key(name))
        assert info.sha256 is not None
        return info.sha256

    def _get_tensors(self, name: str, sha256: str) -> dict[str, torch.Tensor]:
        with tempfile.TemporaryDirectory(prefix="pbs2p-ckpt-") as tmp:
            path = Path(tmp) / name
            self.storage.get_file(self._key(name), path, expected_sha256=sha256)
            return load_file(path)

    def save_inputs(self, index: int, shard: int, x: torch.Tensor) -> tuple[str, str]:
        """Shard `shard`'s calibration inputs of block `index`: (file name, sha256), for the block's marker."""
        name = self.inputs_name(index, shard)
        return name, self._put_tensors({"x": x}, name)

    def save_block(
        self,
        index: int,
        tensors: dict[str, torch.Tensor],
        results: dict[str, LinearResult],
        report: BlockReport,
        cfg: CompressionConfig,
        input_files: dict[str, str] | None = None,
    ) -> None:
        """Block `index` done: its tensors and packed linears, then the JSON marker naming them and the next block's
        input files (`save_inputs`, already written)."""
        files: dict[str, str] = dict(input_files or {})
        flat: dict[str, torch.Tensor] = {}
        linears: dict[str, Any] = {}
        for name, t in tensors.items():
            res = results.get(name)
            if res is None:
                flat[name] = t
                continue
            packed, meta = pack_linear(res, res.n_keep, cfg.pattern.m, cfg.block_size, cfg.ablations.scale_dtype)
            flat.update({f"{name}{SEP}{k}": v for k, v in packed.items()})
            linears[name] = {
                "meta": meta,
                "n_keep": res.n_keep,
                "rel_error": res.rel_error,
                "damping": res.damping,
                "retries": res.retries,
                "stats": res.stats,
            }
        bname = self.block_name(index) + ".safetensors"
        files[bname] = self._put_tensors(flat, bname)
        marker = {"format": CHECKPOINT_FORMAT, "index": index, "files": files, "linears": linears}
        marker["report"] = asdict(report)
        self.storage.put_bytes(json.dumps(marker).encode(), self._key(self.block_name(index) + ".json"))  # last
        if index > 1:  # inputs two blocks back: not needed by a resume (one block back is kept for a
            # coordinator that scanned the checkpoints just before the block was marked done)
            self.storage.delete_prefix(self._key(f"inputs-{index - 1:05d}-"))

    def _marker(self, index: int) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.storage.get_bytes(self._key(self.block_name(index) + ".json"))))
        except ObjectNotFound:
            return None

    def finished(self, num_blocks: int) -> list[int]:
        """Indices of the blocks whose checkpoint is complete."""
        names = {i.key[len(self.prefix) :] for i in self.storage.list(self.prefix)}
        return [i for i in range(num_blocks) if self.block_name(i) + ".json" in names]

    def load_packed(
        self, index: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]], BlockReport]:
        """Block `index` as stored: (plain tensors, packed linears as `ArtifactWriter.write_packed_block` takes
        them, report); nothing decoded."""
        marker = self._marker(index)
        if marker is None:
            raise Pbs2pError(f"job {self.job_id}: block {index} has no checkpoint in {self.where()}")
        bname = self.block_name(index) + ".safetensors"
        flat = self._get_tensors(bname, marker["files"][bname])
        plain = {k: v for k, v in flat.items() if SEP not in k}
        packed = {}
        for name, d in marker["linears"].items():
            fields = {k[len(name) + len(SEP) :]: v for k, v in flat.items() if k.startswith(name + SEP)}
            packed[name] = (fields, d["meta"])
        return plain, packed, _block_report(marker["report"])

    def load_inputs(self, index: int, shard: int) -> torch.Tensor:
        """Shard `shard`'s calibration inputs of block `index` (> 0), saved with block `index - 1`."""
        marker = self._marker(index - 1)
        name = self.inputs_name(index, shard)
        if marker is None or name not in marker["files"]:
            raise Pbs2pError(f"job {self.job_id}: no saved inputs for block {index}, shard {shard} in {self.where()}")
        return self._get_tensors(name, marker["files"][name])["x"]
