"""The per-block pipeline (workers/pipeline.py) and the CLI on seeded tiny random models, CPU only."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from pbs2p_core.config import CompressionConfig
from pbs2p_core.errors import Pbs2pError
from pbs2p_core.families import FAMILIES, family_for
from pbs2p_core.format import (
    MANIFEST_FILE,
    TIMINGS_FILE,
    dense_state_dict,
    load_artifact,
    unpack_linear,
    verify_artifact,
)
from pbs2p_core.format.loader import iter_files
from service import cli
from workers.pipeline import BlockModel, CompressReport, compress_model

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
SLIDING = 16  # < SEQLEN: sliding-window layers really differ from full-attention ones
SEQLEN = 32
WINDOWS = 6
BATCH = 4  # 6 windows -> batches of 4 and 2: per-batch-size block kwargs are exercised
PATTERN = "6:8"

CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
    "gemma2": Gemma2Config,
    "gemma3_text": Gemma3TextConfig,
}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    """Tiny matmuls on a shared 2-core machine: one intra-op thread is ~20x faster than two contending."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_every_family_has_a_test_config() -> None:
    assert set(CONFIGS) == set(FAMILIES)


def tiny_config(family: str, layers: int = 2, hidden: int = 64) -> PretrainedConfig:
    kw: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        initializer_range=0.1,  # large enough that attention is far from uniform (mask bugs show)
    )
    if family == "mistral":
        kw["sliding_window"] = SLIDING
    if family.startswith("gemma"):
        kw.update(
            sliding_window=SLIDING,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        )
    config = CONFIGS[family](**kw)
    assert config.model_type == family
    return config


def make_model(path: Path, family: str = "llama", layers: int = 2, hidden: int = 64, seed: int = 0) -> Any:
    """A seeded random model of `family` saved as safetensors into `path`; returns it (fp32, eval)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers, hidden), dtype=torch.float32).eval()
    model.save_pretrained(path)
    return model


def calib_ids(n: int = WINDOWS, seqlen: int = SEQLEN, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def config(**kw: Any) -> CompressionConfig:
    base: dict[str, Any] = dict(pattern=PATTERN, calib_samples=WINDOWS, seqlen=SEQLEN, batch_size=BATCH)
    return CompressionConfig(**{**base, **kw})


def tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the artifact at `out` (verified), compressed linears decoded to their dense Ŵ."""
    return dense_state_dict(out)


def saved_report(out: Path) -> dict[str, Any]:
    return json.loads((out / MANIFEST_FILE).read_text())["report"]


@torch.no_grad()
def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(input_ids=b, use_cache=False).logits for b in ids.split(BATCH)])


def linear_names(model_type: str, layers: int) -> list[str]:
    fam = family_for(model_type)
    return [f"{fam.layer_prefix(i)}{name}.weight" for i in range(layers) for name in fam.linears]


def group_nonzeros(w: torch.Tensor, m: int) -> torch.Tensor:
    """Nonzeros in every group of m consecutive input columns, per row: (rows, in/m)."""
    return (w.reshape(w.shape[0], -1, m) != 0).sum(-1)


def stored_masks(out: Path) -> dict[str, torch.Tensor]:
    """The N:M masks the artifact stores, per compressed linear's weight name."""
    art = verify_artifact(out)
    masks = {}
    for _, _, packed in iter_files(art):
        for name, fields in packed.items():
            masks[name] = torch.cat([code.mask for code in unpack_linear(fields, art.linears[name])], 1)
    return masks


def assert_nm(out: Path, report: CompressReport, source: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    """Every compressed linear stores exactly its block's N in every group of 8; the decoded weights have at most
    N nonzeros per group (a kept weight may decode to exactly 0, e.g. where its row's alpha B + mu is 0)."""
    got = tensors(out)
    masks = stored_masks(out)
    checked = 0
    for b in report.blocks:
        compressed = {lr.name: lr for lr in b.linears}
        for name in linear_names(report.model_type, len(report.blocks)):
            if not name.startswith(family_for(report.model_type).layer_prefix(b.index)) or any(s in name for s in skip):
                continue
            assert name.removesuffix(".weight") in compressed, name
            assert compressed[name.removesuffix(".weight")].n_keep == b.n_keep
            counts = group_nonzeros(got[name], 8)
            assert int(counts.max()) <= b.n_keep, name
            assert (group_nonzeros(masks[name], 8) == b.n_keep).all(), name
            assert not torch.equal(got[name], source[name]), name
            checked += 1
    assert checked == sum(len(b.linears) for b in report.blocks) > 0


def source_tensors(model: Any) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp_reproduces_the_model(tmp_path: Path, family: str) -> None:
    src = make_model(tmp_path / "src", family)
    ids = calib_ids()
    report = compress_model(tmp_path / "src", tmp_path / "out", config(method="fp"), ids)
    assert (tmp_path / "out" / MANIFEST_FILE).is_file()
    assert [b.n_keep for b in report.blocks] == [8, 8] and all(not b.linears for b in report.blocks)
    out = load_artifact(tmp_path / "out")
    assert float((logits(out, ids) - logits(src, ids)).abs().max()) < 1e-4


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_block_by_block_propagation_matches_the_model(tmp_path: Path, family: str) -> None:
    """The captured block-0 inputs and per-block kwargs (masks, rotary, sliding vs full) give, block by block,
    the hidden states of the real forward pass, for every batch size (the last batch is smaller)."""
    src = make_model(tmp_path / "src", family)
    ids = calib_ids()
    layers = getattr(getattr(src, FAMILIES[family].base), FAMILIES[family].layers)
    want: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [
        layer.register_forward_hook(
            lambda mod, inp, out, i=i: want[i].append(out[0] if isinstance(out, tuple) else out)
        )
        for i, layer in enumerate(layers)
    ]
    with torch.no_grad():
        for b in ids.split(BATCH):
            src(input_ids=b, use_cache=False)
    for h in hooks:
        h.remove()
    bm = BlockModel(tmp_path / "src")
    store = bm.capture(ids, BATCH)
    assert [x.shape[0] for x in store.inputs] == [4, 2]
    xs = store.inputs
    for i in range(bm.num_blocks):
        xs = bm.run_block(i, bm.load_block(i), xs, store)
        bm.unload_block(i)
        for got, ref in zip(xs, want[i], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_pbs2p_keeps_n_of_m(tmp_path: Path, family: str) -> None:
    src = make_model(tmp_path / "src", family)
    source = source_tensors(src)
    ids = calib_ids()
    report = compress_model(tmp_path / "src", tmp_path / "out", config(), ids)
    assert all(5 <= b.n_keep <= 7 for b in report.blocks)
    assert_nm(tmp_path / "out", report, source)
    got = tensors(tmp_path / "out")
    linears = set(linear_names(family, 2))
    for name, t in got.items():  # norms, biases, embeddings: as stored
        if name not in linears:
            assert torch.equal(t, source[name]), name
    dense, packed = (logits(load_artifact(tmp_path / "out", mode=mode), ids) for mode in ("dense", "packed"))
    assert torch.isfinite(packed).all()
    assert torch.equal(dense, packed)  # the packed modules compute with exactly the stored weights
    saved = saved_report(tmp_path / "out")
    assert saved["blocks"][0]["n_keep"] == report.blocks[0].n_keep
    assert saved["config"] == config().to_dict() and saved["config"]["allocation"] == "uniform"


# ------------------------------------------------------------------------------------ pipeline options


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("llama") / "src"
    return path, source_tensors(make_model(path))


def file_hashes(out: Path) -> dict[str, str]:
    """sha256 of every file of the artifact, the manifest included (wall-clock times are in timings.json)."""
    files = [f for f in sorted(out.iterdir()) if f.name != TIMINGS_FILE]
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def test_deterministic(tmp_path: Path, llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    src, _ = llama
    compress_model(src, tmp_path / "a", config(), calib_ids())
    compress_model(src, tmp_path / "b", config(), calib_ids())
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert len([n for n in a if n.startswith("pbs2p-block-")]) == 2 and a == b


def test_skip_modules(tmp_path: Path, llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    src, source = llama
    report = compress_model(src, tmp_path / "out", config(skip_modules=("*.mlp.down_proj",)), calib_ids())
    got = tensors(tmp_path / "out")
    for i in range(2):
        name = f"model.layers.{i}.mlp.down_proj.weight"
        assert torch.equal(got[name], source[name])
        assert [lr.name.split(".", 3)[-1] for lr in report.blocks[i].linears] == [
            n for n in FAMILIES["llama"].linears if n != "mlp.down_proj"
        ]
    assert_nm(tmp_path / "out", report, source, skip=("down_proj",))


def test_independent_propagation(tmp_path: Path, llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    src, source = llama
    seq = compress_model(src, tmp_path / "seq", config(), calib_ids())
    ind = compress_model(src, tmp_path / "ind", config(propagation="independent"), calib_ids())
    assert_nm(tmp_path / "ind", ind, source)
    assert [b.n_keep for b in ind.blocks] == [b.n_keep for b in seq.blocks]  # CFS runs on the FP model
    a, b = tensors(tmp_path / "seq"), tensors(tmp_path / "ind")
    block0 = [n for n in linear_names("llama", 2) if n.startswith("model.layers.0.")]
    block1 = [n for n in linear_names("llama", 2) if n.startswith("model.layers.1.")]
    assert all(torch.equal(a[n], b[n]) for n in block0)  # same inputs for block 0
    assert any(not torch.equal(a[n], b[n]) for n in block1)


def test_true_sequential(tmp_path: Path, llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    src, source = llama
    one = compress_model(src, tmp_path / "one", config(), calib_ids())
    seq = compress_model(src, tmp_path / "ts", config(true_sequential=True), calib_ids())
    assert_nm(tmp_path / "ts", seq, source)
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "ts")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[q], b[q])  # the first group sees the same FP inputs either way
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(a[down], b[down])  # later groups are calibrated on compressed earlier ones
    assert [lr.name for lr in seq.blocks[0].linears] == [lr.name for lr in one.blocks[0].linears]


def test_cfs_allocation(tmp_path: Path) -> None:
    make_model(tmp_path / "src", layers=4)
    report = compress_model(tmp_path / "src", tmp_path / "out", config(allocation="cfs"), calib_ids())
    ns = [b.n_keep for b in report.blocks]
    assert len(ns) == 4 and sum(ns) == 4 * 6 and all(5 <= n <= 7 for n in ns)
    assert all(b.cosine is not None for b in report.blocks)
    assert all(lr.n_keep == b.n_keep for b in report.blocks for lr in b.linears)


def test_cfs_error_score(tmp_path: Path) -> None:
    """cfs_score="error": each block's output error is measured at N_t - 1, N_t, N_t + 1 on FP inputs, N per
    block minimises their sum with the exact average; the block weights written are the real compression's."""
    make_model(tmp_path / "src", layers=4)
    report = compress_model(tmp_path / "src", tmp_path / "out", config(cfs_score="error"), calib_ids())
    ns = [b.n_keep for b in report.blocks]
    assert sum(ns) == 4 * 6 and all(5 <= n <= 7 for n in ns)
    assert all(lr.n_keep == b.n_keep for b in report.blocks for lr in b.linears)
    again = compress_model(tmp_path / "src", tmp_path / "again", config(cfs_score="error"), calib_ids())
    assert [b.n_keep for b in again.blocks] == ns and file_hashes(tmp_path / "out") == file_hashes(tmp_path / "again")


def test_in_features_not_divisible_by_m(tmp_path: Path) -> None:
    make_model(tmp_path / "src", hidden=36)
    with pytest.raises(Pbs2pError, match=r"in_features=36 .*M=8"):
        compress_model(tmp_path / "src", tmp_path / "out", config(allocation="uniform"), calib_ids())
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no partial output left behind


# ------------------------------------------------------------------------------------------------ CLI

WORDS = 200


def save_tokenizer(path: Path) -> None:
    """Whitespace word-level tokenizer over w0..w199 (ids 1..200, [UNK] = 0): fits the 256-token vocab."""
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{f"w{i}": i + 1 for i in range(WORDS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)


def write_text(path: Path, docs: int = 4, words: int = 60) -> Path:
    rng = random.Random(0)
    path.write_text("\n\n".join(" ".join(f"w{rng.randrange(WORDS)}" for _ in range(words)) for _ in range(docs)))
    return path


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    make_model(root / "model")
    save_tokenizer(root / "model")
    return root / "model", write_text(root / "calib.txt")


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


SMALL = ("--calib-samples", "4", "--seqlen", "16", "--batch-size", "2")


def test_cli_defaults_are_the_configs() -> None:
    """`pbs2p compress` without options compresses with CompressionConfig's defaults (one place for them)."""
    args = cli.build_parser().parse_args(["compress", "smollm2-135m", "-o", "out"])
    assert cli.config_from_args(args) == CompressionConfig()


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
        (("--pattern", "6:8", "--spbo-steps", "5"), ("spbo_steps=5", "between 1 and M - N = 2")),
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
    argv = [sys.executable, "-m", "service.cli", "compress", str(tmp_path / "m"), "-o", str(tmp_path / "o")]
    proc = subprocess.run([*argv, "--pattern", "9:8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("pbs2p: error: pattern 9:8") and proc.stderr.count("\n") == 1, proc.stderr
