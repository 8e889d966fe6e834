"""The `pbs2p` command line on a seeded tiny model: compress, eval, and every kind of bad input."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from pbs2p.core.config import CompressionConfig
from pbs2p.core.format import load_artifact
from pbs2p.service.cli import commands as cli
from pbs2p.service.cli import progress
from pbs2p.service.cli.options import config_from_args
from pbs2p.testing.artifacts import saved_report
from pbs2p.testing.cli import run_cli
from pbs2p.testing.hub import model_files, serve_hub
from pbs2p.testing.tiny import VOCAB, make_model, save_tokenizer, write_text

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    make_model(root / "model")
    save_tokenizer(root / "model")
    return root / "model", write_text(root / "calib.txt")


SMALL = ("--calib-samples", "4", "--seqlen", "16", "--batch-size", "2")


def test_cli_defaults_are_the_configs() -> None:
    """`pbs2p compress` without options compresses with CompressionConfig's defaults (one place for them)."""
    args = cli.build_parser().parse_args(["compress", "smollm2-135m", "-o", "out"])
    assert config_from_args(args) == CompressionConfig()


def test_cli_compress_then_eval(
    tmp_path: Path, cli_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, text = cli_model
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "compress", str(model), "-o", str(out), "--calib", str(text), *SMALL)
    assert rc == 0, err
    assert stdout.strip() == str(out)
    assert "pattern 6:8" in err and "N per block" in err
    report = saved_report(out)
    assert report["calib_tokens"] == 4 * 16 and report["config"]["seqlen"] == 16
    assert (out / "tokenizer.json").is_file()

    rc, stdout, err = run_cli(capsys, "eval", str(out), "--data", str(text), "--seqlen", "16", "--json")
    assert rc == 0, err
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert res["seqlen"] == 16 and res["tokens"] == res["windows"] * 15 == (4 * 60 // 16) * 15
    assert res["ppl"] > 1 and res["ppl"] < 10 * VOCAB
    # the FP model loads through transformers: its own bar would be a second one beside the command's
    rc, stdout, err = run_cli(capsys, "eval", str(model), "--data", str(text), "--seqlen", "16", "--windows", "2")
    assert rc == 0, err
    assert "perplexity" in stdout
    bars = {part.split(":")[0].strip() for part in re.split(r"[\r\n]", err) if "%|" in part}
    assert bars == {"eval"}, err


def test_cli_compress_json_report(
    tmp_path: Path, cli_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, text = cli_model
    argv = ("compress", str(model), "-o", str(tmp_path / "out"), "--calib", str(text), "--json", *SMALL)
    rc, stdout, err = run_cli(capsys, *argv, "--method", "prune-binarize", "--pattern", "4:8")
    assert rc == 0, err
    report = json.loads(stdout)
    assert report["config"]["method"] == "prune-binarize" and report["config"]["allocation"] == "uniform"
    assert [b["n_keep"] for b in report["blocks"]] == [4, 4]
    # a pbs2p output directory may be overwritten
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0, err
    assert json.loads(stdout)["config"]["method"] == "pbs2p"


def test_cli_compresses_a_hub_id_at_a_revision_with_a_download_bar(
    tmp_path: Path, cli_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pbs2p compress org/name --revision v1` against a hub on loopback (HF_ENDPOINT): a bar counts the bytes, the
    manifest names the commit; a revision the hub lacks is one clear error."""
    model, text = cli_model
    with serve_hub() as hub:
        commit = hub.add_commit("org/tiny", model_files(model), refs=("main", "v1"))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("PBS2P_CACHE_DIR", str(tmp_path / "cache"))
        out = tmp_path / "out"
        rc, stdout, err = run_cli(capsys, "compress", "org/tiny", "--revision", "v1", "-o", str(out),
                                  "--calib", str(text), *SMALL)  # fmt: skip
        assert rc == 0, err
        assert "downloading" in err and "B/s" in err, err  # tqdm's bar in bytes
        manifest = json.loads(next(out.glob("manifest*.json")).read_text())
        assert manifest["source"]["model"] == "org/tiny" and manifest["source"]["commit"] == commit
        rc, stdout, err = run_cli(capsys, "compress", "org/tiny@v9", "-o", str(tmp_path / "o2"), *SMALL)
    assert_one_error(rc, err, "revision 'v9' of Hugging Face model org/tiny does not exist")


def assert_one_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2
    errors = [line for line in err.splitlines() if line.startswith("pbs2p: error:")]
    assert len(errors) == 1, err
    assert err.rstrip("\n").endswith(errors[0])  # the error is the last thing printed
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--pattern", "8:8"), ("pattern 8:8", "use N < M")),
        (("--pattern", "9:8"), ("pattern 9:8", "use N < M")),
        (("--pattern", "x"), ("'x' is not N:M", "e.g. 6:8")),
        (("--pattern", "6:8", "--spbo-steps", "5"), ("--spbo-steps:", "between 1 and M - N = 2")),
        (("--damping", "0"), ("--damping:", "greater than 0")),
        (("--arb-variant", "arb-rc"), ("--arb-variant:", "set salient_columns=0")),
    ],
)
def test_cli_bad_config(
    tmp_path: Path,
    cli_model: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    args: tuple[str, ...],
    needles: tuple[str, ...],
) -> None:
    model, text = cli_model
    rc, out, err = run_cli(capsys, "compress", str(model), "-o", str(tmp_path / "o"), "--calib", str(text), *args)
    assert out == ""
    assert err.count("\n") == 1  # nothing but the error
    assert_one_error(rc, err, *needles)
    assert not (tmp_path / "o").exists()


def test_cli_bad_model_or_data(
    tmp_path: Path, cli_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, text = cli_model
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    cases = [
        ((str(tmp_path / "missing"), "--calib", str(text)), ("does not exist", "config.json")),
        (("no-such-model", "--calib", str(text)), ("unknown model 'no-such-model'", "smollm2-135m")),
        ((str(model), "--calib", str(empty)), ("is empty", "give a file with text")),
    ]
    if not torch.cuda.is_available():
        cases.append(
            ((str(model), "--calib", str(text), "--device", "cuda"), ("CUDA is not available", "--device cpu"))
        )
    for args, needles in cases:
        rc, out, err = run_cli(capsys, "compress", *args, "-o", str(tmp_path / "o"), *SMALL)
        assert out == "" and err.count("\n") == 1, err
        assert_one_error(rc, err, *needles)
    rc, out, err = run_cli(capsys, "eval", str(tmp_path / "missing"), "--data", str(text))
    assert_one_error(rc, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_cli_in_features_not_divisible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_model(tmp_path / "model", hidden=36)
    save_tokenizer(tmp_path / "model")
    text = write_text(tmp_path / "calib.txt")
    rc, out, err = run_cli(
        capsys, "compress", str(tmp_path / "model"), "-o", str(tmp_path / "o"), "--calib", str(text), *SMALL
    )
    assert out == ""
    assert_one_error(rc, err, "in_features=36", "M=8")
    assert not (tmp_path / "o").exists()


def test_cli_refuses_foreign_output_dir(
    tmp_path: Path, cli_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, text = cli_model
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    rc, stdout, err = run_cli(capsys, "compress", str(model), "-o", str(out), "--calib", str(text), *SMALL)
    assert_one_error(rc, err, str(out), "not a pbs2p output", "empty or new directory")
    assert stdout == ""
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["notes.txt", "sub", "sub/data.bin"]
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "data.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial sibling left behind
    rc, stdout, err = run_cli(
        capsys, "compress", str(model), "-o", str(out / "notes.txt"), "--calib", str(text), *SMALL
    )
    assert_one_error(rc, err, "is a file", "directory")
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["notes.txt", "sub", "sub/data.bin"]


def test_cli_subprocess_exit_code(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "pbs2p.service.cli", "compress", str(tmp_path / "m"), "-o", str(tmp_path / "o")]
    proc = subprocess.run([*argv, "--pattern", "9:8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("pbs2p: error: --pattern: pattern 9:8") and proc.stderr.count("\n") == 1, proc.stderr


CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w1 {% endif %}"


@pytest.fixture(scope="module")
def chat_artifact(tmp_path_factory: pytest.TempPathFactory, cli_model: tuple[Path, Path]) -> Path:
    """The tiny model with a chat template (of its own words), compressed."""
    model, text = cli_model
    root = tmp_path_factory.mktemp("chat")
    shutil.copytree(model, root / "src")
    (root / "src" / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    rc = cli.main(["compress", str(root / "src"), "-o", str(root / "out"), "--calib", str(text), *SMALL])
    assert rc == 0
    return root / "out"


def greedy_words(artifact: Path, prompt_ids: list[int], n: int) -> list[str]:
    model = load_artifact(artifact).eval()  # dense: the same Ŵ the packed model decodes per call
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False)
    tokenizer = AutoTokenizer.from_pretrained(artifact)
    # decoded as the command's streamer decodes them (an id of the model's padded vocabulary decodes to nothing)
    return str(tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)).split()


def test_generate_streams_the_greedy_continuation_of_the_packed_model(
    chat_artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, stdout, err = run_cli(capsys, "generate", str(chat_artifact), "--prompt", "w5 w6", "--max-new-tokens", "6",
                              "--greedy")  # fmt: skip
    assert rc == 0, err
    tokenizer = AutoTokenizer.from_pretrained(chat_artifact)
    assert stdout.split() == greedy_words(chat_artifact, tokenizer("w5 w6")["input_ids"], 6)


def test_generate_chat_renders_each_turn_with_the_template(
    chat_artifact: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("w7 w8\n\n"))
    rc, stdout, err = run_cli(capsys, "generate", str(chat_artifact), "--chat", "--prompt", "w5",
                              "--max-new-tokens", "3", "--greedy")  # fmt: skip
    assert rc == 0, err
    first, second = stdout.strip().splitlines()  # two turns: --prompt, then the stdin line; the empty line ends it
    tokenizer = AutoTokenizer.from_pretrained(chat_artifact)
    ids = tokenizer("w5 w1")["input_ids"]  # the template: the turn, then the generation prompt "w1"
    assert first.split() == greedy_words(chat_artifact, ids, 3)
    ids = tokenizer(f"w5 {first.strip()} w7 w8 w1")["input_ids"]  # the history with the reply, then the new turn
    assert second.split() == greedy_words(chat_artifact, ids, 3)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (("--max-new-tokens", "0", "--prompt", "w1"), "--max-new-tokens must be >= 1"),
        ((), "give --prompt TEXT, or --chat"),
    ],
)
def test_generate_bad_options(
    chat_artifact: Path, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], needle: str
) -> None:
    rc, out, err = run_cli(capsys, "generate", str(chat_artifact), *argv)
    assert_one_error(rc, err, needle)


def test_generate_chat_needs_a_template(
    tmp_path: Path, cli_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, text = cli_model
    assert cli.main(["compress", str(model), "-o", str(tmp_path / "out"), "--calib", str(text), *SMALL]) == 0
    capsys.readouterr()
    rc, out, err = run_cli(capsys, "generate", str(tmp_path / "out"), "--chat")
    assert_one_error(rc, err, "has no chat template", "use --prompt TEXT")


def test_a_followed_job_shows_one_bar(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`pbs2p demo` / `jobs wait`: one bar for the job's blocks, kept across state changes (a requeued job that
    resumes moves the same bar), closed when the job is final; each state is printed once."""
    bars: list[progress.tqdm] = []

    class CountedBar(progress.tqdm):  # type: ignore[misc]
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, **kw)
            bars.append(self)

    monkeypatch.setattr(progress, "tqdm", CountedBar)
    follow = progress.JobBar()
    blocks = {"stage": "compress", "blocks": 3}
    for state, p in [
        ("QUEUED", {}),
        ("RUNNING", {"stage": "prepare"}),
        ("RUNNING", {**blocks, "block": 1}),
        ("QUEUED", {**blocks, "block": 1}),  # its runner died: back to the queue, resumed after block 1
        ("RUNNING", {**blocks, "block": 2}),
        ("RUNNING", {"stage": "evaluate"}),  # block 3's own event was folded into this one
        ("UPLOADING", {"stage": "upload"}),
        ("SUCCEEDED", {"stage": "done"}),
        ("SUCCEEDED", {"stage": "done"}),  # the final GET after the event stream ends
    ]:
        follow({"id": "j1", "state": state, "progress": p})
    assert len(bars) == 1 and bars[0].n == 3 and bars[0].total == 3
    assert follow.bar is None, "closed once the job is final"
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("job j1: ")] == [
        f"job j1: {s}" for s in ("QUEUED", "RUNNING", "QUEUED", "RUNNING", "UPLOADING", "SUCCEEDED")
    ]
