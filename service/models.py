"""Where a job's model (and text) may come from, checked at the edge and fetched by the dispatcher.

A model reference is one of: an alias (`smollm2-135m`), a Hugging Face id (`org/name`, from the local hub
cache only: this service never reaches a hub by itself), an `s3://bucket/prefix` holding a model directory,
or an absolute local path under one of PBS2P_MODEL_ROOTS (no `..`, no symlink leaving the root). Weights must
be safetensors; `trust_remote_code` is never used anywhere.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING

from pbs2p_core.errors import Pbs2pError
from workers.sources import MODEL_ALIASES, cache_dir, resolve_model

if TYPE_CHECKING:
    from workers.storage import S3Settings

HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# files fetched for a model: config, tokenizer, weights; never *.bin / *.pt / *.py
MODEL_FILES = ("*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.jinja")


def confined(path_text: str, roots: list[Path], what: str) -> Path:
    """`path_text` as a real path under one of `roots`; Pbs2pError saying why not."""
    if not roots:
        raise Pbs2pError(f"local {what} paths are disabled on this service; set PBS2P_MODEL_ROOTS to allow a directory")
    p = Path(path_text)
    if not p.is_absolute():
        raise Pbs2pError(f"{what} path {path_text!r} must be absolute, under {', '.join(map(str, roots))}")
    if ".." in p.parts:
        raise Pbs2pError(f"{what} path {path_text!r} contains '..'; give a plain path under an allowed root")
    real = p.resolve()  # follows symlinks: a link pointing out of the root is caught below
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise Pbs2pError(f"{what} path {path_text!r} is not under an allowed root ({', '.join(map(str, roots))})")
    if not real.exists():
        raise Pbs2pError(f"{what} path {path_text!r} does not exist on the service's machine")
    return real


def check_model(ref: str, roots: list[Path]) -> str:
    """Validate a model reference without fetching anything; returns it normalised."""
    ref = ref.strip()
    if ref in MODEL_ALIASES:
        return ref
    if ref.startswith("s3://"):
        bucket, _, prefix = ref[5:].partition("/")
        if not bucket or not prefix.strip("/"):
            raise Pbs2pError(
                f"model {ref!r}: give s3://BUCKET/PREFIX of a model directory (config.json, *.safetensors)"
            )
        return ref.rstrip("/")
    if ref.startswith("/"):
        resolve_model(str(confined(ref, roots, "model")))  # config.json and safetensors present, no pickles
        return ref
    if HF_ID.match(ref):
        _fetch_hf(ref)  # only resolves: the model must already be in the local hub cache
        return ref
    raise Pbs2pError(
        f"model {ref!r} is not known: use an alias ({', '.join(sorted(MODEL_ALIASES))}), a Hugging Face id "
        f"(org/name), s3://BUCKET/PREFIX, or an absolute path under PBS2P_MODEL_ROOTS"
    )


def check_text(ref: str, roots: list[Path]) -> str:
    """Calibration / evaluation text: 'wiki' or a .txt/.jsonl file under an allowed root."""
    if ref == "wiki":
        return ref
    path = confined(ref, roots, "text")
    if path.suffix not in (".txt", ".jsonl"):
        raise Pbs2pError(f"text file {ref!r} must be .txt (blank-line separated) or .jsonl (a 'text' field)")
    return ref


def fetch_model(ref: str, roots: list[Path], max_bytes: int, s3: S3Settings | None = None) -> Path:
    """A local model directory for a checked reference (downloads s3:// prefixes into the cache once, with `s3`)."""
    if ref in MODEL_ALIASES:
        return resolve_model(ref)
    if ref.startswith("/"):
        return resolve_model(str(confined(ref, roots, "model")))
    if ref.startswith("s3://"):
        return _fetch_s3(ref, max_bytes, s3)
    return _fetch_hf(ref)


def _fetch_hf(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = snapshot_download(repo_id, local_files_only=True, allow_patterns=list(MODEL_FILES))
    except LocalEntryNotFoundError as exc:
        raise Pbs2pError(
            f"Hugging Face model {repo_id!r} is not in the local hub cache and this service does not download "
            f"from the hub; run `huggingface-cli download {repo_id}` on the service's machine, or upload it to S3"
        ) from exc
    return resolve_model(path)


def _fetch_s3(url: str, max_bytes: int, s3: S3Settings | None) -> Path:
    from workers.storage import storage_from_url

    target = cache_dir() / "models" / ("s3-" + hashlib.sha256(url.encode()).hexdigest()[:16])
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return resolve_model(str(target))
    store = storage_from_url(url, s3)
    objects = store.list()
    names = [o.key.rsplit("/", 1)[-1] for o in objects]
    if not any(n.endswith(".safetensors") for n in names):
        raise Pbs2pError(f"{url} holds no *.safetensors weights; upload a model directory in safetensors")
    total = sum(o.size for o in objects)
    if total > max_bytes:
        raise Pbs2pError(
            f"{url} holds {total} bytes, above this service's limit of {max_bytes} (PBS2P_MAX_MODEL_BYTES)"
        )
    store.download_dir("", target)
    return resolve_model(str(target))
