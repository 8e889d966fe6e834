"""The artifact's names and its manifest (docs/artifact-format.md, "Files" and "manifest.json").

The one definition of the format name and version, the manifest and timings file names and the packed tensor
naming; the safetensors dtype tables and header reader; building, writing and reading `manifest.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError

FORMAT_NAME = "pbs2p-artifact"
# config.json's quantization_config: the layout transformers is pointed at (index file, tensor names), the same for
# every codec; the codecs' version is the manifest's, which the quantizer checks as well
HF_FORMAT_VERSION = 1
FORMAT_VERSION = 2  # the highest this pbs2p reads and writes; an artifact without integer codecs is still 1
INT_CODEC_VERSION = 2  # the first version with integer-coded linears (layout field `codec`, method gptq)
MANIFEST_FILE = "manifest.json"
TIMINGS_FILE = "timings.json"  # wall-clock timings of the run: not hashed, not part of the verified content
# in a source model directory fetched from a hub: {"model": id, "commit": sha, "files": {name: {size, sha256}}},
# written by the fetch once the files are verified; the manifest's `source` is taken from it
SOURCE_FILE = ".pbs2p-source.json"
SEP = ":"  # packed tensor name = f"{weight name}{SEP}{field}", e.g. model.layers.0.mlp.up_proj.weight:sign
# transformers' `from_pretrained` (pbs2p.hf): config.json's `quantization_config` names the method, and the weight
# index that only the registered quantizer points transformers at (no `model.safetensors*`: without the quantizer,
# transformers finds no weights and raises instead of building a randomly initialised model)
QUANT_METHOD = "pbs2p"
HF_INDEX_FILE = "pbs2p.safetensors.index.json"

# safetensors dtype names (the header's "dtype" field) and item sizes
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TORCH = {v: k for k, v in ST_DTYPES.items()}
ST_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


def nbytes(t: torch.Tensor) -> int:
    """Bytes of a tensor's data."""
    return t.numel() * t.element_size()


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), checked for sanity."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 1024**2:
            raise ArtifactError(f"{path} is not a valid safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path} has an unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path} has an unreadable safetensors header")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, t in header.items():
        try:
            start, end = t["data_offsets"]
            want = math.prod(t["shape"]) * ST_SIZES[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if end - start != want or not 0 <= start <= end <= data:
            raise ArtifactError(f"{path}: tensor {name!r} has data offsets {t['data_offsets']} that do not fit")
    return header


# ---------------------------------------------------------------------------------------------- writing


def totals(linears: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The manifest's `totals`: bits over the compressed linears, count and bytes of the other tensors."""
    weights = sum(v["weights"] for v in linears.values())
    packed_bytes = sum(v["bytes"] for v in linears.values())
    paper = sum(v["kept"] * v.get("bits", 1) + v["kept_salient"] for v in linears.values())
    packed = {f"{n}{SEP}" for n in linears}
    other = [
        math.prod(t["shape"]) * ST_SIZES[t["dtype"]]
        for n, t in tensors.items()
        if not any(n.startswith(p) for p in packed)
    ]
    true_bits = packed_bytes * 8 / weights if weights else 16.0
    return {
        "linears": len(linears),
        "weights": weights,
        "bytes": packed_bytes,
        "paper_bits": paper / weights if weights else 16.0,
        "true_bits": true_bits,
        "ratio_fp16": 16 / true_bits if true_bits else 0.0,
        "uncompressed_tensors": len(other),
        "uncompressed_bytes": sum(other),
    }


def hf_quantization_config() -> dict[str, Any]:
    """config.json's `quantization_config` of an artifact (docs/artifact-format.md, "Loading in transformers")."""
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT_NAME,
        "format_version": HF_FORMAT_VERSION,
        "weights": HF_INDEX_FILE,
    }


def hf_config_json(source_config: str) -> str:
    """The artifact's config.json: the source model's, with `quantization_config` (any earlier one replaced)."""
    try:
        config = json.loads(source_config)
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"the source model's config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ArtifactError("the source model's config.json is not a JSON object")
    config["quantization_config"] = hf_quantization_config()
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def hf_index_json(tensors: Mapping[str, Mapping[str, Any]]) -> str:
    """The weight index transformers reads (`{"metadata": {"total_size"}, "weight_map": {tensor: file}}`)."""
    total = sum(math.prod(t["shape"]) * ST_SIZES[t["dtype"]] for t in tensors.values())
    weight_map = {k: tensors[k]["file"] for k in sorted(tensors)}
    return json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"


def split_timings(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the report without wall-clock fields, for the manifest; those fields, for the timings file)."""
    rep = dict(report)
    timings: dict[str, Any] = {"seconds": rep.pop("seconds", None)}
    blocks = [dict(b) for b in rep.get("blocks", [])]
    timings["block_seconds"] = [b.pop("seconds", None) for b in blocks]
    phases = [b.pop("phases", None) for b in blocks]
    if any(phases):
        timings["block_phases"] = phases
    for b in blocks:  # block tuning's losses only where it ran (an untuned job's manifest is as before)
        if b.get("tune_loss", 0) is None:
            del b["tune_loss"]
    if "blocks" in rep:
        rep["blocks"] = blocks
    return rep, timings


def build_manifest(
    report: dict[str, Any],
    files: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, Mapping[str, Any]],
    linears: Mapping[str, Mapping[str, Any]],
    source: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    # version 1 readers cannot decode an integer codec: such an artifact says version 2, which they refuse
    coded = any(v.get("codec", "binary") != "binary" for v in linears.values())
    return {
        "format": FORMAT_NAME,
        "format_version": INT_CODEC_VERSION if coded else 1,
        "model_type": report.get("model_type"),
        "source": dict(source or {}),
        "config": report.get("config", {}),
        "files": {k: dict(files[k]) for k in sorted(files)},
        "totals": totals(linears, tensors),
        "linears": {k: dict(linears[k]) for k in sorted(linears)},
        "tensors": {k: dict(tensors[k]) for k in sorted(tensors)},
        "report": report,
    }


def dump_manifest(manifest: Mapping[str, Any]) -> str:
    """JSON, one line per file, tensor and linear (readable and diffable; any JSON parser reads it)."""
    lines = []
    for key, value in manifest.items():
        if key in ("files", "tensors", "linears") and value:
            body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{body}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: " + json.dumps(value, indent=1).replace("\n", "\n "))
    return "{\n" + ",\n".join(lines) + "\n}\n"


def model_source(model_dir: Path) -> dict[str, Any]:
    """Where the compressed model came from: the hub fetch's record (model id, commit, files) when the directory
    has one, else the size and sha256 of each of its files (a local, s3:// or packaged model)."""
    marker = Path(model_dir) / SOURCE_FILE
    if marker.is_file():
        source = json.loads(marker.read_text())
        if isinstance(source, dict) and isinstance(source.get("files"), dict):
            return source
    files = {
        p.name: {"size": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(Path(model_dir).iterdir())
        if p.is_file() and not p.name.startswith(".")
    }
    return {"files": files}


# ---------------------------------------------------------------------------------------------- reading


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the artifact directory `path`: present, JSON, this format, a version this pbs2p reads,
    and the file, tensor and linear tables (their content is checked by `verify_artifact`)."""
    path = Path(path)
    mf = path / MANIFEST_FILE
    if not path.is_dir():
        raise ArtifactError(f"artifact {path} is not a directory; give the directory that holds {MANIFEST_FILE}")
    if not mf.is_file():
        plain = any(path.glob("model*.safetensors"))
        hint = " (it looks like a plain checkpoint: load it with transformers)" if plain else ""
        raise ArtifactError(
            f"{mf} is missing: {path} is not a pbs2p artifact{hint}, or it is incomplete "
            f"(the manifest is written last); compress again or download it again"
        )
    try:
        manifest = json.loads(mf.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{mf} is not valid JSON ({exc}); the artifact is damaged, download it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{mf} is not a pbs2p artifact manifest (format is not {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{mf} has format_version {version!r}; a positive integer is expected")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{mf} is format version {version}, written by a newer pbs2p; this pbs2p reads format versions up "
            f"to {FORMAT_VERSION}: upgrade pbs2p"
        )
    for key in ("files", "tensors", "linears"):
        if not isinstance(manifest.get(key), dict):
            raise ArtifactError(f"{mf} lacks the field {key!r}; the artifact is damaged, download it again")
    return manifest


def check_fields(tensors: Mapping[str, torch.Tensor], want: Mapping[str, tuple[str, list[int]]]) -> None:
    """The packed fields of a linear are exactly the layout's, each with its dtype and shape (else ArtifactError)."""
    if set(want) != set(tensors):
        raise ArtifactError(f"packed fields {sorted(tensors)} differ from the layout's {sorted(want)}")
    for f, (dt, shape) in want.items():
        t = tensors[f]
        if ST_DTYPES.get(t.dtype) != dt or list(t.shape) != shape:
            raise ArtifactError(f"packed field {f!r} is {t.dtype} {list(t.shape)}; the layout says {dt} {shape}")
