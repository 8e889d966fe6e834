"""Perplexity of a model directory or of a compressed artifact (loaded packed) on held-out text; zero-shot task
accuracy through lm-evaluation-harness (the `tasks` extra) on the same loaded model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError
from transformers import AutoModelForCausalLM, AutoTokenizer

from pbs2p.core.config import parse_calib
from pbs2p.core.errors import Pbs2pError, requires_extra
from pbs2p.core.evaluate import perplexity
from pbs2p.core.format import is_artifact, load_artifact

from .text import eval_windows, load_documents

# an lm-eval task name (arc_easy, hellaswag, a task of the tasks dir)
TaskName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")]
TASKS_DOC = "zero-shot tasks of lm-evaluation-harness whose data is on the machine, e.g. arc_easy, hellaswag"


class EvalSpec(BaseModel):
    """Perplexity before and after compression, measured by the job on the packed artifact: the first `windows`
    windows of `seqlen` tokens of `data`; and the zero-shot accuracy on `tasks` (lm-evaluation-harness)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: str = Field("wiki", min_length=1, max_length=1024, description="'wiki' (held-out split) or a text file")
    seqlen: int = Field(512, ge=8, le=32768, description="tokens per window")
    windows: int | None = Field(40, ge=1, le=100000, description="windows evaluated (none: all that fit)")
    tasks: list[TaskName] = Field([], max_length=32, description=TASKS_DOC)  # pydantic copies the default
    tasks_limit: int | None = Field(None, ge=1, le=1000000, description="examples per task (none: all)")

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

    @field_validator("tasks")
    @classmethod
    def _unique(cls, tasks: list[str]) -> list[str]:
        if len(set(tasks)) != len(tasks):
            raise PydanticCustomError(
                "unique_tasks", "each task once: {dup}", {"dup": sorted({t for t in tasks if tasks.count(t) > 1})}
            )
        return tasks


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise Pbs2pError("CUDA is not available on this machine; use --device cpu")


def check_tasks(names: list[str], tasks_dir: Path | None) -> None:
    """Every task name has its data on this machine (else a Pbs2pError listing the ones that have); needs the
    `tasks` extra."""
    if not names:
        return
    with requires_extra("tasks", "zero-shot tasks"):
        from .tasks import check_tasks as check  # extra: tasks

    check(names, tasks_dir)


def load_for_eval(model_dir: Path, device: str = "cpu") -> Any:
    """The model at `model_dir` as evaluated: an artifact verified and loaded packed, a model directory dense fp32."""
    if is_artifact(model_dir):  # a pbs2p artifact: verified, packed linears decoded per forward
        return load_artifact(model_dir, mode="packed", device=device)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.to(device)


def evaluate_tasks(
    model_dir: Path,
    names: list[str],
    tasks_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of the model (or packed artifact) at `model_dir` on the tasks `names` (the `tasks`
    extra): {"tasks": {task: {"acc": ..., "acc_norm": ..., "examples": n}}, "data": ..., "lm_eval": version}."""
    check_device(device)
    with requires_extra("tasks", "zero-shot tasks"):
        from .tasks import run_tasks  # extra: tasks

    tok = AutoTokenizer.from_pretrained(model_dir)
    return run_tasks(load_for_eval(model_dir, device), tok, names, tasks_dir, limit, batch_size, device, progress)


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
    res = perplexity(
        load_for_eval(model_dir, device), ids, bos, batch_size=batch_size, device=device, progress=progress
    )
    return {**res.to_dict(), "data": spec.data}
