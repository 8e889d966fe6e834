"""Writing an artifact (docs/artifact-format.md, "Files"): block by block, manifest last, renamed into place.

The directory: the source model's config (with `quantization_config`) and tokenizer files, safetensors shards
`pbs2p-<part>-<k>.safetensors` (one part per decoder block plus `rest`, split at a size limit), their index for
transformers, the run's timings, and the manifest, written last, with the format version, the source model (hub id
and commit when fetched from a hub, and the sha256 of each source file), the compression config, per file size
and sha256, per tensor dtype and shape, per compressed linear its layout and bit counts, and the compression report.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import CompressionConfig
from ..errors import Pbs2pError
from ..solver import LinearResult
from .linear import linear_bits, pack_linear
from .loader import verify_artifact
from .manifest import (
    HF_INDEX_FILE,
    MANIFEST_FILE,
    SEP,
    ST_DTYPES,
    TIMINGS_FILE,
    build_manifest,
    dump_manifest,
    file_sha256,
    hf_config_json,
    hf_index_json,
    model_source,
    nbytes,
    split_timings,
)

DEFAULT_SHARD_BYTES = 2 * 1024**3
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".gguf")


class ArtifactWriter:
    """Writes format v1 into a temporary sibling directory renamed into place by `finish`: never a half
    output that looks done. An existing output is replaced only when it is an earlier pbs2p output.

    A block's tensors are packed and written when they arrive (one or more shard files per block, each at
    most `shard_bytes` unless a single tensor is larger), so memory holds one block at a time."""

    def __init__(
        self,
        out_dir: Path,
        model_dir: Path,
        config: CompressionConfig | Mapping[str, Any] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> None:
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise Pbs2pError(f"output {self.out} is a file; choose an empty or new directory")
        if self.out.exists() and any(self.out.iterdir()) and not (self.out / MANIFEST_FILE).is_file():
            raise Pbs2pError(f"output {self.out} exists and is not a pbs2p output; choose an empty or new directory")
        if shard_bytes < 1:
            raise Pbs2pError(f"shard size limit {shard_bytes} must be positive, e.g. 2 GiB")
        if config is None:
            config = CompressionConfig()
        elif isinstance(config, Mapping):
            config = CompressionConfig.from_dict(dict(config))
        self.cfg: CompressionConfig = config
        self.shard_bytes = shard_bytes
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise Pbs2pError(f"source model {self.model_dir} has no config.json to copy into the artifact")
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.files: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, dict[str, Any]] = {}
        self.linears: dict[str, dict[str, Any]] = {}

    def write_block(self, index: int, tensors: dict[str, torch.Tensor], results: dict[str, LinearResult]) -> None:
        """Block `index`: all its tensors by full name (compressed linears hold Ŵ, ignored here); `results`
        by full weight name for the compressed linears: their codes are packed."""
        missing = sorted(set(results) - set(tensors))
        if missing:
            raise Pbs2pError(f"block {index}: compressed linears {missing} are not among the block's tensors")
        m, bs = self.cfg.pattern.m, self.cfg.block_size
        packed = {
            name: pack_linear(res, res.n_keep, m, bs, self.cfg.ablations.scale_dtype) for name, res in results.items()
        }
        self.write_packed_block(index, {k: v for k, v in tensors.items() if k not in results}, packed)

    def write_packed_block(
        self,
        index: int,
        plain: dict[str, torch.Tensor],
        packed: dict[str, tuple[dict[str, torch.Tensor], dict[str, Any]]],
    ) -> None:
        """Block `index` from tensors stored as they are (`plain`) and compressed linears already packed
        (`pack_linear`'s fields and layout by full weight name), e.g. as a job's checkpoint holds them."""
        units: list[tuple[str | None, dict[str, torch.Tensor], dict[str, Any] | None]] = []
        for name in sorted(set(plain) | set(packed)):
            if name in packed:
                fields, meta = packed[name]
                units.append((name, {f"{name}{SEP}{k}": v for k, v in fields.items()}, meta))
            else:
                units.append((None, {name: plain[name]}, None))
        self._write_units(f"block-{index:05d}", units)

    def write_rest(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every tensor outside the decoder blocks (embeddings, final norm, head), as stored."""
        self._write_units("rest", [(None, {k: tensors[k]}, None) for k in sorted(tensors)])

    def _write_units(
        self, part: str, units: list[tuple[str | None, dict[str, torch.Tensor], dict[str, Any] | None]]
    ) -> None:
        """Greedy shards in name order; a linear's packed tensors stay together in one file."""
        shards: list[list[int]] = [[]]
        size = 0
        for i, (_, ts, _) in enumerate(units):
            b = sum(nbytes(t) for t in ts.values())
            if shards[-1] and size + b > self.shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += b
        for k, idx in enumerate(shards):
            if not idx:
                continue
            fname = f"pbs2p-{part}-{k:03d}.safetensors"
            if fname in self.files:
                raise Pbs2pError(f"{fname} is written twice; each block is written once")
            flat: dict[str, torch.Tensor] = {}
            for i in idx:
                name, ts, meta = units[i]
                flat.update({n: t.detach().to("cpu").contiguous() for n, t in ts.items()})
                if name is not None and meta is not None:
                    packed_bytes = sum(nbytes(t) for t in ts.values())
                    self.linears[name] = {**meta, "file": fname, **linear_bits(meta, packed_bytes)}
            save_file(flat, self.tmp / fname, metadata={"format": "pt"})  # one key: a map has no fixed order
            for n, t in flat.items():
                self.tensors[n] = {"file": fname, "dtype": ST_DTYPES[t.dtype], "shape": list(t.shape)}
            self._record(fname)

    def _record(self, fname: str) -> None:
        p = self.tmp / fname
        self.files[fname] = {"size": p.stat().st_size, "sha256": file_sha256(p)}

    def finish(self, report: Any) -> Path:
        """Copy the source's config (with `quantization_config`), tokenizer and generation files, write the weight
        index transformers reads, then manifest.json last, and rename into place."""
        rep = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        for f in sorted(self.model_dir.iterdir()):  # config, tokenizer, generation config, chat template
            if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_WEIGHT_SUFFIXES):
                if f.name == MANIFEST_FILE:
                    continue
                if f.name == "config.json":  # + quantization_config: what transformers needs (pbs2p.hf)
                    (self.tmp / f.name).write_text(hf_config_json(f.read_text()))
                else:
                    shutil.copyfile(f, self.tmp / f.name)
                self._record(f.name)
        (self.tmp / HF_INDEX_FILE).write_text(hf_index_json(self.tensors))
        self._record(HF_INDEX_FILE)
        # wall-clock timings differ from run to run: they go to timings.json (not hashed, not in the manifest),
        # so the same config, model and calibration give a byte-identical artifact
        rep, timings = split_timings(rep)
        (self.tmp / TIMINGS_FILE).write_text(json.dumps(timings, indent=1))
        manifest = build_manifest(rep, self.files, self.tensors, self.linears, model_source(self.model_dir))
        (self.tmp / MANIFEST_FILE).write_text(dump_manifest(manifest))  # written last
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def add_transformers_files(path: Path) -> Path:
    """Give an artifact written before `pbs2p.hf` existed what transformers' `from_pretrained` needs: config.json
    with `quantization_config` and the weight index, as `finish` writes them today (the result is byte-identical
    to a fresh compression's). Verifies the artifact first; the tensors are not touched; the manifest (its file
    table gains the two files) replaces the old one last. A current artifact comes out unchanged."""
    art = verify_artifact(path)
    files = dict(art.manifest["files"])
    new = {
        "config.json": hf_config_json((art.path / "config.json").read_text()),
        HF_INDEX_FILE: hf_index_json(art.manifest["tensors"]),
    }
    staged = []
    for name, text in new.items():
        tmp = art.path / f".{name}.partial-{os.getpid()}"
        tmp.write_text(text)
        files[name] = {"size": tmp.stat().st_size, "sha256": file_sha256(tmp)}
        staged.append((tmp, art.path / name))
    manifest = {**art.manifest, "files": {k: files[k] for k in sorted(files)}}
    tmp = art.path / f".{MANIFEST_FILE}.partial-{os.getpid()}"
    tmp.write_text(dump_manifest(manifest))
    staged.append((tmp, art.path / MANIFEST_FILE))
    for src, dst in staged:  # the manifest last: renames only, nothing left to fail in between
        os.replace(src, dst)
    return art.path
