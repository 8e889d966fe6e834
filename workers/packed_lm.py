"""The project's model (a packed artifact, or a dense model directory) as an lm-evaluation-harness language model.

`PackedLM` scores what the harness asks: the log-likelihood of a continuation after a context (multiple-choice
tasks), of a whole text in windows (perplexity tasks), and greedy text until a stop string (generative tasks).
Tokenization follows the harness's own `TemplateLM` (context and continuation encoded together and split, the
trailing spaces of a context moved to the continuation; no special tokens, like its `hf` model), so the numbers
are the harness's numbers for this model. Requests are scored longest first in batches of `batch_size`, right
padded without an attention mask: a causal model's real positions never see the padding, so a row scores the
same in any batch (up to float rounding).

This module imports lm_eval at module level: it is imported only at the `tasks` extra's edge.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

TokenRequest = tuple[tuple[str, str], list[int], list[int]]


class PackedLM(TemplateLM):
    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str = "cpu",
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        super().__init__()
        self.model: Any = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self._max_length = min(max_length or limit, limit)
        self._device = device
        self.progress = progress or (lambda done, total: None)  # requests scored, of those asked at once
        # transformers' causal LMs take the positions whose logits to compute (the whole vocabulary per position
        # is the largest tensor of a batch otherwise)
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return int(eos if eos is not None else self.prefix_token_id)

    @property
    def prefix_token_id(self) -> int:
        for tid in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id):
            if tid is not None:
                return int(tid)
        return 0

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return list(self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)))

    def _loglikelihood_tokens(self, requests: list[TokenRequest], **kwargs: Any) -> list[tuple[float, bool]]:
        rows = []
        for _, ctx, cont in requests:
            whole = (ctx + cont)[-(self._max_length + 1) :]
            rows.append((whole[:-1], whole[len(whole) - len(cont) :]))  # input ids, the continuation's ids
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # stable: ties keep the request order
        out: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            for i, res in zip(batch, self._score([rows[i] for i in batch]), strict=True):
                out[i] = res
            self.progress(start + len(batch), len(rows))
        return out

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(requests, disable_tqdm=True)  # the caller's progress shows the scoring

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation), whether greedy decoding gives it) for each (input, continuation) row."""
        width = max(len(inp) for inp, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # right padding: causal positions never see it
        for r, (inp, _) in enumerate(rows):
            ids[r, : len(inp)] = torch.tensor(inp)
        # the positions predicting a continuation token, over the batch
        wanted = sorted({p for inp, cont in rows for p in range(len(inp) - len(cont), len(inp))})
        kw: dict[str, Any] = {"use_cache": False}
        if self._keep:
            kw["logits_to_keep"] = torch.tensor(wanted, device=self._device)
        logits = self.model(input_ids=ids.to(self._device), **kw).logits.float()
        column = {p: c for c, p in enumerate(wanted)} if self._keep else {p: p for p in range(width)}
        res = []
        for r, (inp, cont) in enumerate(rows):
            if not cont:
                res.append((0.0, True))
                continue
            cols = [column[p] for p in range(len(inp) - len(cont), len(inp))]
            logp = F.log_softmax(logits[r, cols], dim=-1).cpu()
            target = torch.tensor(cont)
            total = float(logp.gather(1, target[:, None]).sum())
            res.append((total, bool((logp.argmax(-1) == target).all())))
        return res

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        windows: list[TokenRequest] = []
        owner: list[int] = []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self._max_length, 1),
            ):
                windows.append(((text, ""), ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logp
        return totals

    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, one request at a time, cut at the first of the request's stop strings."""
        out = []
        for n, req in enumerate(requests, 1):
            context, gen_kwargs = req.args
            gen = dict(gen_kwargs or {})
            until = gen.pop("until", None) or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            new = int(gen.pop("max_gen_toks", 256))
            ctx = self.tok_encode(context)[-max(1, self._max_length - new) :] or [self.prefix_token_id]
            ids = torch.tensor([ctx], device=self._device)
            gen_ids = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                do_sample=False,
                pad_token_id=self.eot_token_id,
            )[0, len(ctx) :]
            text = self.tokenizer.decode(gen_ids, skip_special_tokens=True)
            cut = min([text.find(s) for s in until if s and s in text], default=len(text))
            out.append(text[:cut])
            self.progress(n, len(requests))
        return out
