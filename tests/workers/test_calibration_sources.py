"""Calibration sources (pbs2p_core/config.py `parse_calib`, workers/text.py): chat JSONL through the model's chat
template, weighted mixes of sources, deterministic windows, and every bad input refused with what to write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from pbs2p.core.config import CalibSource, CompressionConfig, ConfigError, parse_calib, window_counts
from pbs2p.core.errors import Pbs2pError
from pbs2p.testing.tiny import word_tokenizer
from pbs2p.workers.evaluation import EvalSpec
from pbs2p.workers.model_refs import check_text
from pbs2p.workers.text import (
    calibration_for,
    calibration_windows,
    load_documents,
    mixed_calibration_windows,
    read_documents,
    token_stream,
)

# roles as words of the word tokenizer (t0 system, t1 user, t2 assistant), each message closed by t3
ROLE_TEMPLATE = (
    "{% for m in messages %}{{ {'system': 't0', 'user': 't1', 'assistant': 't2'}[m['role']] }} "
    "{{ m['content'] }} t3 {% endfor %}"
)


def chat_tokenizer() -> Any:
    tok = word_tokenizer(bos=False)
    tok.chat_template = ROLE_TEMPLATE
    return tok


def words(first: int, count: int) -> str:
    return " ".join(f"t{first + i}" for i in range(count))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def chat_rows(n: int, first_word: int) -> list[dict[str, Any]]:
    """`n` conversations of words from `first_word` on (t150.. for a source apart from the text files' t10..)."""
    return [
        {
            "messages": [
                {"role": "user", "content": words(first_word + (i % 20), 5)},
                {"role": "assistant", "content": words(first_word + 50 + (i % 30), 8)},
            ]
        }
        for i in range(n)
    ]


# ------------------------------------------------------------------------------------------- the spelling


def test_one_source_and_a_weighted_mix_parse() -> None:
    assert parse_calib("wiki") == (CalibSource("wiki", 1.0),)
    assert parse_calib("/data/a.txt") == (CalibSource("/data/a.txt", 1.0),)
    assert parse_calib("/data/a.txt:1") == (CalibSource("/data/a.txt", 1.0),)
    assert parse_calib("wiki:0.7, /data/chat.jsonl:.3") == (
        CalibSource("wiki", 0.7),
        CalibSource("/data/chat.jsonl", 0.3),
    )
    assert [s.weight for s in parse_calib("a.txt:0.1,b.txt:0.2,c.txt:0.7")] == [0.1, 0.2, 0.7]  # float sum 1 + 2e-16


@pytest.mark.parametrize(
    ("calib", "words_of_the_fix"),
    [
        ("wiki,/data/chat.jsonl", "no weight; in a mix every source needs one"),
        ("wiki:0.5,/data/chat.jsonl", "'/data/chat.jsonl' has no weight"),
        ("wiki:0.7,/data/chat.jsonl:0.5", "the weights sum to 1.2, not 1"),
        ("wiki:0.5", "the weights sum to 0.5, not 1"),
        ("wiki:0,/data/chat.jsonl:1", "weights must be positive"),
        ("wiki:0.5,wiki:0.5", "named twice"),
        ("wiki:0.5,,a.txt:0.5", "empty source"),
        ("wiki:0.5,a.txt:0.5,", "empty source"),
        (":1", "no source before it"),
    ],
)
def test_bad_mixes_say_what_to_write(calib: str, words_of_the_fix: str) -> None:
    with pytest.raises(Pbs2pError, match=words_of_the_fix):
        parse_calib(calib)
    with pytest.raises(ConfigError) as caught:
        CompressionConfig.from_options(calib=calib)
    assert [e["field"] for e in caught.value.errors] == ["calib"]
    assert words_of_the_fix in caught.value.errors[0]["message"]


def test_window_counts_round_by_largest_remainder() -> None:
    mix = parse_calib("wiki:0.7,b.txt:0.3")
    assert window_counts(mix, 16) == (11, 5)  # 11.2, 4.8
    assert window_counts(mix, 10) == (7, 3)
    assert window_counts(parse_calib("a.txt:0.5,b.txt:0.5"), 3) == (2, 1)  # a tie goes to the source named first
    thirds = parse_calib("a.txt:0.333334,b.txt:0.333333,c.txt:0.333333")
    assert window_counts(thirds, 64) == (22, 21, 21) and sum(window_counts(thirds, 7)) == 7


def test_a_source_without_a_window_is_refused_at_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        CompressionConfig.from_options(calib="wiki:0.95,/data/chat.jsonl:0.05", calib_samples=8)
    assert caught.value.errors == [
        {
            "field": "calib",
            "message": "source '/data/chat.jsonl' at weight 0.05 gets none of the calib_samples=8 windows; "
            "raise its weight or calib_samples",
        }
    ]
    assert CompressionConfig.from_options(calib="wiki:0.95,/data/chat.jsonl:0.05", calib_samples=20).calib_sources


def test_evaluation_reads_one_source() -> None:
    assert EvalSpec(data="/data/eval.jsonl").data == "/data/eval.jsonl"
    for mix in ("wiki:0.5,/data/chat.jsonl:0.5", "wiki:1"):
        with pytest.raises(ValueError, match="weighted mixes are for calib"):
            EvalSpec(data=mix)


# ------------------------------------------------------------------------------------------- chat files


def test_conversations_render_through_the_chat_template(tmp_path: Path) -> None:
    f = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "system", "content": "t10"}, {"role": "user", "content": "t11 t12"}]},
            {"text": "t20 t21"},
            "",
            {"messages": [{"role": "user", "content": "t13"}, {"role": "assistant", "content": "t14", "id": 7}]},
        ],
    )
    tok = chat_tokenizer()
    docs = load_documents(str(f), "calib", tok)
    assert docs == ["t0 t10 t3 t1 t11 t12 t3 ", "t20 t21", "t1 t13 t3 t2 t14 t3 "]  # extra keys ("id") unread
    ids = token_stream(tok, docs).tolist()
    assert ids == [tok.convert_tokens_to_ids(w) for w in " ".join(docs).split()]


def test_the_real_chat_template_of_smollm2(real_model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_model)
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    (doc,) = load_documents(str(f), "calib", tok)
    assert doc == tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    assert doc.startswith("<|im_start|>system\n") and "<|im_start|>user\nHi<|im_end|>\n" in doc
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert token_stream(tok, [doc]).tolist().count(im_start) == 2  # the markers are single special tokens


def test_a_model_without_a_chat_template_is_told_what_to_do(tmp_path: Path) -> None:
    f = write_jsonl(tmp_path / "chat.jsonl", [{"text": "t1"}, *chat_rows(1, 10)])
    with pytest.raises(Pbs2pError, match=r"chat\.jsonl line 2 is a conversation .* has no chat template") as caught:
        load_documents(str(f), "calib", word_tokenizer(bos=False))
    assert '{"text": ...} lines' in str(caught.value)
    with pytest.raises(Pbs2pError, match="needs the model's tokenizer"):
        load_documents(str(f), "calib")
    assert load_documents(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "t1"}])), "calib") == ["t1"]


def test_a_template_that_refuses_a_conversation_names_the_line(tmp_path: Path) -> None:
    tok = word_tokenizer(bos=False)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }} {% endfor %}"
    )
    f = write_jsonl(tmp_path / "c.jsonl", [*chat_rows(2, 10), {"messages": [{"role": "system", "content": "t1"}]}])
    with pytest.raises(Pbs2pError, match=r"line 3: the model's chat template refused the conversation \(no system"):
        load_documents(str(f), "calib", tok)


GOOD = json.dumps(chat_rows(1, 10)[0])


@pytest.mark.parametrize(
    ("line", "words_of_the_fix"),
    [
        ('{"messages": [', "is not valid JSON"),
        ('{"messages": "hello"}', '"messages" must be a non-empty list'),
        ('{"messages": []}', '"messages" must be a non-empty list'),
        ('{"messages": ["hello"]}', "message 1 is not an object"),
        ('{"messages": [{"content": "t1"}]}', "message 1 has no role;"),
        ('{"messages": [{"role": "user", "content": "t1"}, {"role": "user"}]}', "message 2 has no content;"),
        ('{"messages": [{}]}', "message 1 has no role and no content"),
        ('{"messages": [{"role": "bot", "content": "t1"}]}', "role 'bot'; use one of system, user, assistant"),
        ('{"messages": [{"role": "user", "content": [{"type": "text"}]}]}', "content that is not a string"),
        ('{"messages": [], "text": "t1"}', 'has both "text" and "messages"'),
        ('{"txt": "t1"}', 'has no "text" or "messages" field'),
        ('{"text": 3}', '"text" that is not a string'),
    ],
)
def test_bad_chat_lines_name_the_line_and_the_fix(tmp_path: Path, line: str, words_of_the_fix: str) -> None:
    f = write_jsonl(tmp_path / "c.jsonl", [GOOD, "", line])
    with pytest.raises(Pbs2pError, match="line 3") as caught:
        read_documents(str(f), "calib")  # checked without a tokenizer: what the API does at submit time
    assert words_of_the_fix in str(caught.value)
    with pytest.raises(Pbs2pError, match="line 3"):
        check_text(str(f), None)


# ------------------------------------------------------------------------------------------- the windows


def mix_files(tmp_path: Path) -> tuple[Path, Path]:
    """A .txt of words t10..t109 and a chat .jsonl of words t150..t279 (and the roles' t0..t3): disjoint, so each
    window shows which source it came from."""
    txt = tmp_path / "text.txt"
    txt.write_text("\n\n".join(words(10 + (i * 7) % 60, 40) for i in range(30)), encoding="utf-8")
    return txt, write_jsonl(tmp_path / "chat.jsonl", chat_rows(60, 150))


def from_chat(window: torch.Tensor) -> bool:
    ids = set(window.tolist())
    chat = {i for i in ids if i >= 150 + 2} | {2, 3, 4, 5}  # t150.. and the role words t0..t3 (id = t + 2)
    assert ids <= chat or not ids & chat, "a window mixes two sources"
    return ids <= chat


def test_a_mix_gives_each_source_its_share_interleaved(tmp_path: Path) -> None:
    txt, chat = mix_files(tmp_path)
    tok = chat_tokenizer()
    mix = parse_calib(f"{txt}:0.7,{chat}:0.3")
    w = mixed_calibration_windows(tok, mix, n=20, seqlen=16, seed=0)
    assert w.shape == (20, 16)
    sources = [from_chat(row) for row in w]
    assert sources.count(True) == 6 and sources.count(False) == 14
    assert sources != sorted(sources) and sources != sorted(sources, reverse=True)  # interleaved, not in blocks
    again = mixed_calibration_windows(tok, mix, n=20, seqlen=16, seed=0)
    assert torch.equal(w, again)
    assert not torch.equal(w, mixed_calibration_windows(tok, mix, n=20, seqlen=16, seed=1))


def test_one_source_keeps_the_windows_it_had(tmp_path: Path) -> None:
    txt, _ = mix_files(tmp_path)
    tok = chat_tokenizer()
    expected = calibration_windows(tok, load_documents(str(txt), "calib"), 8, 16, 3)
    assert torch.equal(mixed_calibration_windows(tok, parse_calib(str(txt)), 8, 16, 3), expected)


def test_same_config_and_data_give_the_same_windows(tmp_path: Path) -> None:
    """calibration_for from a model directory's saved tokenizer (its chat template saved with it)."""
    txt, chat = mix_files(tmp_path)
    model_dir = tmp_path / "model"
    chat_tokenizer().save_pretrained(model_dir)
    cfg = CompressionConfig.from_options(calib=f"{chat}:0.5,{txt}:0.5", calib_samples=12, seqlen=16, seed=5)
    first = calibration_for(model_dir, cfg)
    assert torch.equal(first, calibration_for(model_dir, CompressionConfig.from_dict(cfg.to_dict())))
    assert [from_chat(row) for row in first].count(True) == 6
    only_chat = calibration_for(model_dir, cfg.replace(calib=str(chat)))
    assert all(from_chat(row) for row in only_chat)


def test_a_source_too_short_for_its_windows_is_named(tmp_path: Path) -> None:
    txt, _ = mix_files(tmp_path)
    short = write_jsonl(tmp_path / "short.jsonl", chat_rows(1, 150))
    with pytest.raises(Pbs2pError, match=rf"calibration source '{short}': calibration text has 17 tokens"):
        mixed_calibration_windows(chat_tokenizer(), parse_calib(f"{txt}:0.5,{short}:0.5"), 4, 32, 0)


# ------------------------------------------------------------------------------------------- the edge


def test_check_text_checks_every_source_of_a_mix(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    txt, chat = mix_files(root)
    good = f"wiki:0.4,{txt}:0.3,{chat}:0.3"
    assert check_text(good, [root]) == good
    assert check_text(good, None) == good
    with pytest.raises(Pbs2pError, match="does not exist"):
        check_text(f"wiki:0.5,{root / 'none.jsonl'}:0.5", None)
    with pytest.raises(Pbs2pError, match="does not exist on the service"):
        check_text(f"wiki:0.5,{root / 'none.jsonl'}:0.5", [root])
    with pytest.raises(Pbs2pError, match="not under an allowed root"):
        check_text(f"{txt}:0.5,/etc/hostname.txt:0.5", [root])
    with pytest.raises(Pbs2pError, match=r"must be \.txt"):
        check_text(f"{txt}:0.5,{root}:0.5", None)
    with pytest.raises(Pbs2pError, match="sum to 0.6"):
        check_text(f"{txt}:0.3,{chat}:0.3", None)
