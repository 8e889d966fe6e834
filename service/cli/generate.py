"""`pbs2p generate ARTIFACT`: text from a compressed artifact, streamed token by token as it is generated.

`--prompt TEXT` continues the text as it is; `--chat` holds a conversation read from stdin (one user turn per line,
an empty line or end of input ends it), each turn rendered with the model's chat template. The artifact is
loaded packed (its linears stay 1-bit in memory) unless `--dense`; decoding follows the model's
generation_config.json (`--greedy` turns sampling off, `--seed` fixes it).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import IO, Any

import torch
from transformers import AutoTokenizer, GenerationConfig, TextStreamer

from pbs2p.core.errors import Pbs2pError
from pbs2p.core.format import load_artifact


def run_generate(
    artifact: Path,
    prompt: str | None,
    chat: bool,
    max_new_tokens: int,
    greedy: bool = False,
    seed: int = 0,
    dense: bool = False,
    device: str = "cpu",
    stdin: IO[str] | None = None,
) -> None:
    if max_new_tokens < 1:
        raise Pbs2pError("--max-new-tokens must be >= 1")
    if not chat and not prompt:
        raise Pbs2pError("give --prompt TEXT, or --chat for a conversation on stdin")
    model = load_artifact(artifact, mode="dense" if dense else "packed", device=device).eval()
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    if chat and not tokenizer.chat_template:
        raise Pbs2pError(
            f"the model of {artifact} has no chat template (tokenizer_config.json or chat_template.jinja); "
            f"use --prompt TEXT for plain continuation"
        )
    gen = _generation_config(artifact, max_new_tokens, greedy, tokenizer)
    torch.manual_seed(seed)
    if not chat:
        assert prompt is not None
        ids = tokenizer(prompt, return_tensors="pt").to(device)
        _stream(model, tokenizer, ids, gen)
        return
    history: list[dict[str, str]] = []
    turns = [prompt] if prompt else []
    stdin = stdin or sys.stdin
    while True:
        if not turns:
            print("> ", end="", file=sys.stderr, flush=True)
            line = stdin.readline()
            if not line.strip():
                return
            turns.append(line.strip())
        history.append({"role": "user", "content": turns.pop(0)})
        turn: Any = tokenizer.apply_chat_template(
            history, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        reply = _stream(model, tokenizer, turn.to(device), gen)
        history.append({"role": "assistant", "content": reply})


def _generation_config(artifact: Path, max_new_tokens: int, greedy: bool, tokenizer: Any) -> GenerationConfig:
    """The model's generation config (its file in the artifact, else transformers' defaults) with our limits."""
    try:
        gen = GenerationConfig.from_pretrained(artifact)
    except OSError:  # no generation_config.json
        gen = GenerationConfig()
    gen.max_new_tokens = max_new_tokens
    gen.max_length = None
    if greedy:
        gen.do_sample, gen.temperature, gen.top_p, gen.top_k = False, None, None, None
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return gen


def _stream(model: Any, tokenizer: Any, inputs: Any, gen: GenerationConfig) -> str:
    """Generate from `inputs`, printing each piece of text on stdout as it comes; returns the new text."""
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        out = model.generate(**inputs, generation_config=gen, streamer=streamer)
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
