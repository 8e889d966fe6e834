"""Perplexity of a model directory or of a compressed artifact (loaded packed) on held-out text."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError
from transformers import AutoModelForCausalLM, AutoTokenizer

from pbs2p.core.config import parse_calib
from pbs2p.core.errors import Pbs2pError
from pbs2p.core.evaluate import perplexity
from pbs2p.core.format import is_artifact, load_artifact

from .text import eval_windows, load_documents


class EvalSpec(BaseModel):
    """Perplexity before and after compression, measured by the job on the packed artifact: the first `windows`
    windows of `seqlen` tokens of `data`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = Field("wiki", min_length=1, max_length=1024, description="'wiki' (held-out split) or a text file")
    seqlen: int = Field(512, ge=8, le=32768, description="tokens per window")
    windows: int | None = Field(40, ge=1, le=100000, description="windows evaluated (none: all that fit)")

    @field_validator("data")
    @classmethod
    def _one_source(cls, data: str) -> str:
        try:
            one = [s.source for s in parse_calib(data)] == [data.strip()]
        except Pbs2pError:
            one = False
        if not one:
            raise PydanticCustomError(
                "one_text_source",
                "evaluation reads one text source: 'wiki' or a .txt / .jsonl file (a path without commas); "
                "weighted mixes are for calib",
            )
        return data


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Pbs2pError("CUDA is not available on this machine; use --device cpu")


def evaluate_model(
    model_dir: Path,
    spec: EvalSpec,
    batch_size: int = 4,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Perplexity of the model (or verified artifact, decoded per forward) at `model_dir` on `spec`'s windows."""
    check_device(device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, bos = eval_windows(tok, load_documents(spec.data, "eval", tok), spec.seqlen, spec.windows)
    if is_artifact(model_dir):  # a pbs2p artifact: verified, packed linears decoded per forward
        lm: Any = load_artifact(model_dir, mode="packed", device=device)
    else:
        lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lm.to(device)
    res = perplexity(lm, ids, bos, batch_size=batch_size, device=device, progress=progress)
    return {**res.to_dict(), "data": spec.data}
