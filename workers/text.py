"""Text for calibration and evaluation: the packaged Wikipedia (split by document) or the user's files, and the
token windows cut from it.

`calibration_for(model_dir, cfg)` is the one place a job's calibration windows are made. A `.jsonl` line is a
document (`{"text": ...}`) or a conversation (`{"messages": [{"role", "content"}, ...]}`), which is rendered
to text with the model's own chat template (`tokenizer.apply_chat_template`), as the model saw chat in
training. `calib` may mix sources with weights (`wiki:0.7,/data/chat.jsonl:0.3`): each source gives its share
of the windows, cut from its own token stream, and the windows are interleaved by a seeded permutation.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from jinja2 import TemplateError
from transformers import AutoTokenizer

from pbs2p.core.config import CalibSource, CompressionConfig, window_counts
from pbs2p.core.errors import Pbs2pError

from .packaged import wiki_file

log = logging.getLogger(__name__)

Split = Literal["calib", "eval"]
SPLITS: tuple[str, ...] = ("calib", "eval")
TEXT_SUFFIXES = (".txt", ".jsonl")
CHAT_ROLES = ("system", "user", "assistant")
_EVAL_EVERY = 10  # document i is held out for evaluation when i % 10 == 9
_LINE_FORMS = '{"text": "..."} or {"messages": [{"role": "user", "content": "..."}, ...]}'


@dataclass(frozen=True)
class Conversation:
    """A `{"messages": [...]}` line of a .jsonl file: (role, content) pairs, and where they were read."""

    messages: tuple[tuple[str, str], ...]
    where: str  # "FILE line N", for errors


Document = str | Conversation


def calibration_for(model_dir: Path, cfg: CompressionConfig) -> torch.Tensor:
    """The job's calibration windows [calib_samples, seqlen]: the model's tokenizer over `cfg.calib`'s documents
    (conversations through its chat template), windows at seeded random starts (the same config, model and text
    give the same windows)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return mixed_calibration_windows(tokenizer, cfg.calib_sources, cfg.calib_samples, cfg.seqlen, cfg.seed)


def mixed_calibration_windows(
    tokenizer: Any, sources: Sequence[CalibSource], n: int, seqlen: int, seed: int
) -> torch.Tensor:
    """`n` windows [n, seqlen] over `sources`: one source gives `calibration_windows` of its documents; a mix gives
    each source its `window_counts` share, cut from its own stream (seed + 1 + its index), and interleaves them
    by a permutation seeded with `seed` (so the first windows, e.g. CFS's, come from every source)."""
    if len(sources) == 1:
        return calibration_windows(tokenizer, load_documents(sources[0].source, "calib", tokenizer), n, seqlen, seed)
    parts = []
    for i, (source, count) in enumerate(zip(sources, window_counts(tuple(sources), n), strict=True)):
        docs = load_documents(source.source, "calib", tokenizer)
        try:
            parts.append(calibration_windows(tokenizer, docs, count, seqlen, seed + 1 + i))
        except Pbs2pError as exc:
            raise Pbs2pError(f"calibration source {source.source!r}: {exc}") from None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return torch.cat(parts)[order]


def load_documents(spec: str, split: Split, tokenizer: Any | None = None) -> list[str]:
    """Documents of a corpus as text: `"wiki"` (the packaged Wikipedia, split by document) or a .txt/.jsonl file,
    whose conversations are rendered with `tokenizer`'s chat template (a file with conversations needs it).

    For a user file `split` is ignored: the whole file is used for calibration and for evaluation.
    """
    return render_documents(read_documents(spec, split), tokenizer)


def read_documents(spec: str, split: Split) -> list[Document]:
    """The documents of a corpus, each line of a .jsonl file checked (valid JSON; a text, or messages with a known
    role and string content each); conversations are not rendered yet."""
    if split not in SPLITS:
        raise Pbs2pError(f"split {split!r} is unknown; use one of {', '.join(SPLITS)}")
    if spec == "wiki":
        return list(_wiki_documents(split))
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
    docs: list[Document] = list(_split_txt(text)) if suffix == ".txt" else _parse_jsonl(text, path)
    if not docs:
        raise Pbs2pError(f"text file {path} is empty; give a file with text")
    return docs


def render_documents(docs: Sequence[Document], tokenizer: Any | None) -> list[str]:
    """The documents as text: conversations through `tokenizer.apply_chat_template` (no generation prompt)."""
    conversations = [doc for doc in docs if isinstance(doc, Conversation)]
    if not conversations:
        return [doc for doc in docs if isinstance(doc, str)]
    first = conversations[0].where
    if tokenizer is None:
        raise Pbs2pError(f"{first} is a conversation, which needs the model's tokenizer to render")
    if not getattr(tokenizer, "chat_template", None):
        raise Pbs2pError(
            f'{first} is a conversation ({{"messages": ...}}), but the model\'s tokenizer '
            f"({getattr(tokenizer, 'name_or_path', '') or 'given'}) has no chat template (no chat_template in "
            f"tokenizer_config.json, no chat_template.jinja); render the conversations in the model's own format "
            f'and give them as {{"text": ...}} lines, or use a model that ships its chat template'
        )
    return [doc if isinstance(doc, str) else _render(tokenizer, doc) for doc in docs]


def _render(tokenizer: Any, conversation: Conversation) -> str:
    messages = [{"role": role, "content": content} for role, content in conversation.messages]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except TemplateError as exc:
        raise Pbs2pError(
            f"{conversation.where}: the model's chat template refused the conversation ({exc}); "
            f"fix the conversation (e.g. the order of the roles the template expects)"
        ) from None
    if not isinstance(text, str):
        raise Pbs2pError(f"{conversation.where}: the chat template gave {type(text).__name__}, not text")
    return text


def _split_txt(text: str) -> list[str]:
    # A blank line may hold spaces or tabs; any run of them separates documents.
    return [doc.strip() for doc in re.split(r"\n[ \t]*\n\s*", text) if doc.strip()]


def _parse_jsonl(text: str, path: Path) -> list[Document]:
    docs: list[Document] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path} line {lineno}"
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as exc:
            raise Pbs2pError(f"{where} is not valid JSON ({exc.msg}); write one JSON object per line") from None
        if not isinstance(obj, dict) or not ("text" in obj or "messages" in obj):
            raise Pbs2pError(f'{where} has no "text" or "messages" field; write {_LINE_FORMS} on each line')
        if "text" in obj and "messages" in obj:
            raise Pbs2pError(f'{where} has both "text" and "messages"; give one of them per line')
        if "messages" in obj:
            docs.append(_conversation(obj["messages"], where))
        elif not isinstance(obj["text"], str):
            raise Pbs2pError(f'{where} has a "text" that is not a string; write {{"text": "..."}}')
        elif obj["text"].strip():
            docs.append(obj["text"])
    return docs


def _conversation(messages: Any, where: str) -> Conversation:
    form = '{"role": "user", "content": "..."}'
    if not isinstance(messages, list) or not messages:
        raise Pbs2pError(f'{where}: "messages" must be a non-empty list of {form} objects')
    pairs: list[tuple[str, str]] = []
    for k, message in enumerate(messages, start=1):
        if not isinstance(message, dict):
            raise Pbs2pError(f"{where}: message {k} is not an object; write {form}")
        missing = [key for key in ("role", "content") if key not in message]
        if missing:
            raise Pbs2pError(f"{where}: message {k} has no {' and no '.join(missing)}; write {form}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise Pbs2pError(f"{where}: message {k} has role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise Pbs2pError(
                f"{where}: message {k} has a content that is not a string (content parts are not read); "
                f"write the message's text as a string"
            )
        pairs.append((role, content))
    return Conversation(tuple(pairs), where)


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
