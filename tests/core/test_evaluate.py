from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from pbs2p.core import evaluate
from pbs2p.core.errors import Pbs2pError
from pbs2p.core.evaluate import PerplexityResult, perplexity

VOCAB = 128


@pytest.fixture(scope="module")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(config).eval()


def windows(k: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (k, t), generator=torch.Generator().manual_seed(seed))


def reference_ppl(model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).double(), ids[:, 1:].reshape(-1))
    return math.exp(float(loss))


def test_matches_hand_computed_cross_entropy(tiny_model: LlamaForCausalLM) -> None:
    ids = windows(5, 33)
    result = perplexity(tiny_model, ids, bos=False)
    assert result.ppl == pytest.approx(reference_ppl(tiny_model, ids), rel=1e-6)
    assert result.nll == pytest.approx(math.log(result.ppl), rel=1e-12)
    assert (result.tokens, result.seqlen, result.windows, result.bos) == (5 * 32, 33, 5, False)
    # random init over 128 tokens: close to uniform, a sanity bound on the scale
    assert 0.5 * VOCAB < result.ppl < 2 * VOCAB


def test_batch_size_does_not_change_result(tiny_model: LlamaForCausalLM) -> None:
    ids = windows(7, 24, seed=2)
    results = [perplexity(tiny_model, ids, bos=True, batch_size=b) for b in (1, 2, 3, 7, 16)]
    for r in results[1:]:
        assert r.ppl == pytest.approx(results[0].ppl, rel=1e-6)
        assert r.tokens == 7 * 23


def test_chunked_loss_equals_unchunked(tiny_model: LlamaForCausalLM, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = windows(3, 40, seed=3)
    whole = perplexity(tiny_model, ids, bos=False)
    monkeypatch.setattr(evaluate, "_CE_CHUNK", 7)  # 39 targets -> chunks of 7 with a ragged tail
    chunked = perplexity(tiny_model, ids, bos=False)
    assert chunked.ppl == pytest.approx(whole.ppl, rel=1e-9)


def test_progress_and_mode_restored(tiny_model: LlamaForCausalLM) -> None:
    calls: list[tuple[int, int]] = []
    tiny_model.train()
    try:
        perplexity(tiny_model, windows(5, 8), bos=False, batch_size=2, progress=lambda i, k: calls.append((i, k)))
        assert tiny_model.training
    finally:
        tiny_model.eval()
    assert calls == [(2, 5), (4, 5), (5, 5)]


def test_to_dict_round_trip(tiny_model: LlamaForCausalLM) -> None:
    result = perplexity(tiny_model, windows(2, 8), bos=True)
    d = result.to_dict()
    assert set(d) == {"ppl", "nll", "tokens", "seqlen", "windows", "bos"}
    assert PerplexityResult(**d) == result


@pytest.mark.parametrize("shape", [(4,), (0, 8), (3, 1)])
def test_bad_windows_refused(tiny_model: LlamaForCausalLM, shape: tuple[int, ...]) -> None:
    with pytest.raises(Pbs2pError, match="shape"):
        perplexity(tiny_model, torch.zeros(shape, dtype=torch.long), bos=False)


def test_bad_batch_size_refused(tiny_model: LlamaForCausalLM) -> None:
    with pytest.raises(Pbs2pError, match="batch size"):
        perplexity(tiny_model, windows(2, 8), bos=False, batch_size=0)
