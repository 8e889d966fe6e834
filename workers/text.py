"""Text for calibration and evaluation: the packaged Wikipedia (split by document) or the user's files, and the
token windows cut from it.

`calibration_for(model_dir, cfg)` is the one place a job's calibration windows are made.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoTokenizer

from pbs2p.core.config import CompressionConfig
from pbs2p.core.errors import Pbs2pError

from .packaged import wiki_file

log = logging.getLogger(__name__)

Split = Literal["calib", "eval"]
SPLITS: tuple[str, ...] = ("calib", "eval")
TEXT_SUFFIXES = (".txt", ".jsonl")
_EVAL_EVERY = 10  # document i is held out for evaluation when i % 10 == 9


def calibration_for(model_dir: Path, cfg: CompressionConfig) -> torch.Tensor:
    """The job's calibration windows [calib_samples, seqlen]: the model's tokenizer over `cfg.calib`'s documents,
    windows at seeded random starts (the same config and model give the same windows)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    docs = load_documents(cfg.calib, "calib")
    return calibration_windows(tokenizer, docs, cfg.calib_samples, cfg.seqlen, cfg.seed)


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
    with open(wiki_file(), encoding="utf-8") as fh:
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
