"""Seeded tiny models of every supported family, a tokenizer that fits them, text and calibration ids."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from pbs2p.core.config import CompressionConfig

VOCAB = 256
SLIDING = 16  # < SEQLEN: sliding-window layers really differ from full-attention ones
SEQLEN = 32
WINDOWS = 6
BATCH = 4  # 6 windows -> batches of 4 and 2: per-batch-size block kwargs are exercised
PATTERN = "6:8"
WORDS = 200  # words of the tiny tokenizer (ids 1..200)

CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,
}


def tiny_config(family: str, layers: int = 2, hidden: int = 64) -> PretrainedConfig:
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        initializer_range=0.1,  # large enough that attention is far from uniform (mask bugs show)
    )
    if family == "mistral":
        kw["sliding_window"] = SLIDING
    if family.startswith("gemma"):
        kw.update(
            sliding_window=SLIDING,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        )
    config = CONFIGS[family](**kw)
    assert config.model_type == family
    return config


def make_model(path: Path, family: str = "llama", layers: int = 2, hidden: int = 64, seed: int = 0) -> Any:
    """A seeded random model of `family` saved as safetensors into `path`; returns it (fp32, eval)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, hidden), dtype=torch.float32).eval()
    model.save_pretrained(path)
    return model


def calib_ids(n: int = WINDOWS, seqlen: int = SEQLEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def tiny_job_config(**options: Any) -> CompressionConfig:
    """The config of the tiny models' tests: `calib_ids()`'s shape; `options` by flat option name."""
    base: dict[str, Any] = dict(pattern=PATTERN, calib_samples=WINDOWS, seqlen=SEQLEN, batch_size=BATCH)
    return CompressionConfig.from_options({**base, **options})


def save_tokenizer(path: Path) -> None:
    """Whitespace word-level tokenizer over w0..w199 (ids 1..200, [UNK] = 0): fits the 256-token vocab."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 1 for i in range(WORDS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def write_text(path: Path, docs: int = 4, words: int = 60) -> Path:
    """Seeded documents of the tiny tokenizer's words, separated by blank lines."""
    rng = random.Random(0)
    path.write_text("\n\n".join(" ".join(f"w{rng.randrange(WORDS)}" for _ in range(words)) for _ in range(docs)))
    return path


def word_tokenizer(bos: bool, words: int = 300) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over t0..t{words-1} (ids 2..); with bos=True it prepends <s> like LLaMA-2's."""
    vocab = {"[UNK]": 0, "<s>": 1, **{f"t{i}": i + 2 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]")
