"""`calib` at the edges: chat JSONL and weighted mixes through the command line (a tiny model whose tokenizer has a
chat template, and one without) and through the API over real HTTP (422 naming config.calib at submit time)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from pbs2p.testing.artifacts import saved_report
from pbs2p.testing.cli import run_cli
from pbs2p.testing.servers import Service, running_service
from pbs2p.testing.tiny import make_model, save_tokenizer, write_text

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ("--calib-samples", "4", "--seqlen", "16", "--batch-size", "2")
# the tiny tokenizer knows w0..w199 only: roles as words (w0 system, w1 user, w2 assistant), w3 ends a message
TEMPLATE = (
    "{% for m in messages %}{{ {'system': 'w0', 'user': 'w1', 'assistant': 'w2'}[m['role']] }} "
    "{{ m['content'] }} w3 {% endfor %}"
)


def conversations(n: int) -> list[dict[str, Any]]:
    return [
        {
            "messages": [
                {"role": "user", "content": " ".join(f"w{10 + (i + j) % 90}" for j in range(6))},
                {"role": "assistant", "content": " ".join(f"w{100 + (i * 3 + j) % 90}" for j in range(10))},
            ]
        }
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Under one root: a tiny model with a chat template, one without, a .txt, a chat .jsonl and a bad one."""
    root = tmp_path_factory.mktemp("calib")
    make_model(root / "model")
    save_tokenizer(root / "model")
    tok = AutoTokenizer.from_pretrained(root / "model")
    tok.chat_template = TEMPLATE
    tok.save_pretrained(root / "model")
    make_model(root / "plain")
    save_tokenizer(root / "plain")
    bad = [*conversations(2), {"messages": [{"role": "bot", "content": "w1"}]}]
    return {
        "root": root,
        "model": root / "model",
        "plain": root / "plain",
        "txt": write_text(root / "calib.txt"),
        "chat": write_jsonl(root / "chat.jsonl", conversations(40)),
        "bad": write_jsonl(root / "bad.jsonl", bad),
    }


def one_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2 and err.startswith("pbs2p: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


# ------------------------------------------------------------------------------------------- command line


def test_cli_compresses_on_a_mix_and_evaluates_on_chat(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    calib = f"{files['txt']}:0.5,{files['chat']}:0.5"
    rc, stdout, err = run_cli(capsys, "compress", str(files["model"]), "-o", str(out), "--calib", calib, *SMALL)
    assert rc == 0, err
    report = saved_report(out)
    assert report["calib_tokens"] == 4 * 16 and report["config"]["calib"] == calib
    rc, stdout, err = run_cli(capsys, "eval", str(out), "--data", str(files["chat"]), "--seqlen", "16", "--json")
    assert rc == 0, err
    res = json.loads(stdout)
    # 40 conversations of 1 + 6 + 1 + 1 + 10 + 1 tokens, then windows of 16
    assert res["windows"] == 40 * 20 // 16 and res["ppl"] > 1


def test_cli_refuses_bad_calibration_in_one_line(
    tmp_path: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cases = [
        (("model", f"wiki:0.7,{files['chat']}:0.5"), ("--calib", "the weights sum to 1.2, not 1")),
        (("model", f"wiki,{files['chat']}"), ("--calib", "in a mix every source needs one")),
        (("model", str(files["bad"])), ("bad.jsonl line 3", "role 'bot'", "use one of system, user, assistant")),
        (("model", str(files["root"] / "none.jsonl")), ("none.jsonl does not exist",)),
        (("plain", str(files["chat"])), ("chat.jsonl line 1 is a conversation", "has no chat template")),
    ]
    for (model, calib), needles in cases:
        out = tmp_path / "o"
        rc, stdout, err = run_cli(capsys, "compress", str(files[model]), "-o", str(out), "--calib", calib, *SMALL)
        assert stdout == ""
        one_error(rc, err, *needles)
        assert not out.exists()


# ------------------------------------------------------------------------------------------- the API


@pytest.fixture(scope="module")
def svc(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with running_service(tmp_path_factory.mktemp("data"), files["root"]) as service:
        yield service


def test_api_checks_every_calibration_source_at_submit(svc: Service, files: dict[str, Path]) -> None:
    auth = svc.key("calib-tenant")
    outside = write_text(files["root"].parent / "outside.txt")
    cases = [
        (f"wiki:0.7,{files['chat']}:0.5", "the weights sum to 1.2, not 1"),
        (f"wiki:0.995,{files['chat']}:0.005", "gets none of the calib_samples=64 windows"),
        (str(files["bad"]), "bad.jsonl line 3: message 1 has role 'bot'; use one of system, user, assistant"),
        (f"wiki:0.5,{files['bad']}:0.5", "line 3"),
        (f"wiki:0.5,{outside}:0.5", "not under an allowed root"),
        (f"wiki:0.5,{files['root'] / 'none.jsonl'}:0.5", "does not exist"),
    ]
    with httpx.Client(base_url=svc.url, timeout=20) as client:
        for calib, words in cases:
            body = {"model": str(files["model"]), "config": {"calib": calib}}
            resp = client.post("/v1/jobs", json=body, headers=auth)
            assert resp.status_code == 422, resp.text
            problem = resp.json()
            assert [e["field"] for e in problem["errors"]] == ["config.calib"], problem
            assert words in problem["errors"][0]["message"], problem
        assert client.get("/v1/jobs", headers=auth).json()["jobs"] == []
        mix = f"wiki:0.7,{files['chat']}:0.3"
        body = {"model": str(files["model"]), "config": {"calib": mix}, "evaluate": {"data": str(files["chat"])}}
        resp = client.post("/v1/jobs", json=body, headers=auth)
        assert resp.status_code == 201, resp.text
        assert resp.json()["config"]["calib"] == mix
        body = {"model": str(files["model"]), "evaluate": {"data": mix}}
        resp = client.post("/v1/jobs", json=body, headers=auth)
        assert resp.status_code == 422 and "weighted mixes are for calib" in resp.text, resp.text
