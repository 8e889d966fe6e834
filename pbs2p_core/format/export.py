"""A plain transformers checkpoint from an artifact: compressed linears decoded to Ŵ, in the model's own dtype.

The checkpoint is laid out as `save_pretrained` lays one out: `model.safetensors`, or shards
`model-0000i-of-0000n.safetensors` with `model.safetensors.index.json` once the weights exceed the shard size
(default: the largest weights file of the source model when the manifest names them, else 5 GB, transformers'
default). Its config.json says the dtype written. Files get the ordinary modes of the user's umask.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import Pbs2pError
from .loader import Artifact, iter_dense, verify_artifact
from .manifest import HF_INDEX_FILE, nbytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 5 * 10**9  # transformers' save_pretrained default, "5GB"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def export_dense(path: Path, out_dir: Path, dtype: str = "auto", max_shard_bytes: int | None = None) -> Path:
    """Write the dense checkpoint of the artifact at `path` into `out_dir` (new or empty), through a temporary
    sibling directory renamed into place. `dtype`: auto (the source model's, from config.json), float32,
    bfloat16 or float16."""
    art = verify_artifact(path)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise Pbs2pError(f"output {out} is a file; choose an empty or new directory")
    if out.exists() and any(out.iterdir()):
        raise Pbs2pError(f"output {out} exists and is not empty; choose an empty or new directory")
    config = json.loads((art.path / "config.json").read_text())
    name = model_dtype(config) if dtype == "auto" else dtype
    if name not in DTYPES:
        raise Pbs2pError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    shard_bytes = max_shard_bytes or source_shard_bytes(art)
    if shard_bytes < 1:
        raise Pbs2pError(f"max shard size {shard_bytes} must be at least 1 byte")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_shards(art, tmp, DTYPES[name], shard_bytes)
        tensor_files = set(art.tensor_files())
        for fname in sorted(art.manifest["files"]):
            if fname not in tensor_files and fname not in ("config.json", HF_INDEX_FILE):
                shutil.copyfile(art.path / fname, tmp / fname)
        config["dtype"] = name
        config.pop("quantization_config", None)  # the weights are dense now
        config.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def model_dtype(config: dict[str, Any]) -> str:
    """The dtype a model's config.json names (transformers 5 `dtype`, older `torch_dtype`); float32 if none."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return name if name in DTYPES else "float32"


def source_shard_bytes(art: Artifact) -> int:
    """The largest weights file of the source model (the manifest's `source`), else transformers' default."""
    files = (art.manifest.get("source") or {}).get("files") or {}
    sizes = [int(f["size"]) for n, f in files.items() if n.endswith(".safetensors") and f.get("size")]
    return max(sizes) if sizes else DEFAULT_SHARD_BYTES


def _write_shards(art: Artifact, tmp: Path, dtype: torch.dtype, shard_bytes: int) -> None:
    """Tensors in the artifact's order, a new shard whenever the next tensor would pass `shard_bytes`."""
    shards: list[list[str]] = []  # the names in each shard written so far
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    for _, tensors in iter_dense(art):
        for key, t in tensors.items():
            t = (t.to(dtype) if t.is_floating_point() else t).contiguous()
            if current and size + nbytes(t) > shard_bytes:
                shards.append(_save(current, tmp / f".shard-{len(shards)}"))
                current, size = {}, 0
            current[key] = t
            size += nbytes(t)
            total += nbytes(t)
    shards.append(_save(current, tmp / f".shard-{len(shards)}"))
    if len(shards) == 1:
        os.replace(tmp / ".shard-0", tmp / WEIGHTS)
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(tmp / f".shard-{i}", tmp / fname)
        weight_map.update({k: fname for k in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _save(tensors: dict[str, torch.Tensor], path: Path) -> list[str]:
    save_file(tensors, path, metadata={"format": "pt"})
    # safetensors creates its files 0600; the rest of a checkpoint has the umask's modes (the directory's, as
    # mkdir made it, less execute)
    path.chmod(path.parent.stat().st_mode & 0o666)
    return list(tensors)
