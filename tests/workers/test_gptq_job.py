"""A job of method gptq end to end through the one job path (`run_job`) on a seeded tiny model: calibration
text, the block pipeline, the artifact with integer codes, the loader, the evaluation, determinism."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import pbs2p.hf  # noqa: F401  # registers the quantizer for from_pretrained
from pbs2p.core.errors import Pbs2pError
from pbs2p.core.format import ArtifactWriter, PackedLinear, dense_state_dict, inspect_artifact, load_artifact
from pbs2p.core.format.manifest import read_manifest
from pbs2p.core.solver import compress_linear
from pbs2p.testing.artifacts import file_hashes, linear_names, logits, source_tensors, tensors
from pbs2p.testing.tiny import calib_ids, make_model, save_tokenizer, tiny_job_config, write_text
from pbs2p.workers.checkpoints import JobCheckpoint
from pbs2p.workers.evaluation import EvalSpec
from pbs2p.workers.job import JobSpec, run_job
from pbs2p.workers.report import BlockReport
from pbs2p.workers.settings import WorkerSettings
from pbs2p.workers.storage.local import LocalStorage

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    root = tmp_path_factory.mktemp("gptq")
    model = make_model(root / "src")
    save_tokenizer(root / "src")
    return root / "src", write_text(root / "calib.txt", docs=8), source_tensors(model)


def _job(tiny: tuple[Path, Path, dict[str, torch.Tensor]], out: Path, **options: object):
    src, text, _ = tiny
    cfg = tiny_job_config(**{"method": "gptq", "gptq_group_size": 32, "calib": str(text), **options})
    spec = JobSpec(str(src), cfg, evaluate=EvalSpec(data=str(text), seqlen=16, windows=4))
    return run_job(spec, out, WorkerSettings(cache_dir=out.parent / "cache"))


@pytest.mark.parametrize(("bits", "act_order"), [(4, False), (3, True), (2, True)])
def test_gptq_job_end_to_end(tiny, tmp_path: Path, bits: int, act_order: bool) -> None:
    src, _, source = tiny
    result = _job(tiny, tmp_path / "out", gptq_bits=bits, gptq_act_order=act_order)
    man = read_manifest(tmp_path / "out")
    assert man["format_version"] == 2 and man["config"]["method"] == "gptq"
    names = linear_names("llama", 2)
    assert sorted(man["linears"]) == sorted(names)
    for meta in man["linears"].values():
        assert meta["codec"] == "int" and meta["bits"] == bits and meta["act_order"] == act_order
    # the report's formula and the artifact's bytes agree on the bits (up to each stream's last byte)
    info = inspect_artifact(tmp_path / "out")
    assert info["total"]["paper_bits"] == bits == result.summary()["metrics"]["paper_bits"]
    true_bits = result.report.bits["true_bits"]
    assert bits < true_bits <= info["total"]["true_bits"] < true_bits + 0.01
    # a row of a group (natural order: its first 32 columns) decodes to at most 2^bits values
    got = tensors(tmp_path / "out")
    for name in names:
        w = got[name]
        assert not torch.equal(w, source[name])
        if not act_order:
            assert max(len(torch.unique(row)) for row in w[:, :32]) <= 2**bits
    # dense and packed loading compute with the same weights
    ids = calib_ids()
    dense, packed = load_artifact(tmp_path / "out"), load_artifact(tmp_path / "out", mode="packed")
    assert torch.equal(logits(dense, ids), logits(packed, ids))
    # transformers' from_pretrained (pbs2p.hf registered) keeps the integer codes packed, same logits
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert sum(isinstance(mod, PackedLinear) for mod in hf.modules()) == len(names)
    assert torch.equal(logits(hf, ids), logits(packed, ids))
    m = result.metrics
    assert m["ppl_after"] > 0 and m["eval_windows"] == 4


def test_more_bits_less_error(tiny, tmp_path: Path) -> None:
    errors = [_job(tiny, tmp_path / f"b{b}", gptq_bits=b).report.mean_rel_error for b in (2, 3, 4)]
    assert errors[0] > errors[1] > errors[2] > 0


def test_deterministic(tiny, tmp_path: Path) -> None:
    _job(tiny, tmp_path / "a", gptq_bits=3)
    _job(tiny, tmp_path / "b", gptq_bits=3)
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert len([n for n in a if n.startswith("pbs2p-block-")]) == 2 and a == b


def test_bad_settings_are_clear_errors_before_any_work(tiny, tmp_path: Path) -> None:
    for options, needle in ((dict(gptq_bits=5), "gptq_bits"), (dict(gptq_group_size=4), "gptq_group_size")):
        with pytest.raises(Pbs2pError, match=needle):
            _job(tiny, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_a_group_size_that_does_not_divide_the_inputs(tiny, tmp_path: Path) -> None:
    """Groups of 48 over 64 and 128 inputs: the last group of each row is shorter (16 and 32 columns)."""
    _job(tiny, tmp_path / "out", gptq_group_size=48, gptq_bits=3)
    man = read_manifest(tmp_path / "out")
    groups = {name.rsplit(".", 2)[-2]: meta["groups"] for name, meta in man["linears"].items()}
    assert groups["down_proj"] == 3 and groups["q_proj"] == 2
    assert inspect_artifact(tmp_path / "out")["total"]["paper_bits"] == 3


def test_checkpoint_round_trip_of_integer_codes(tmp_path: Path) -> None:
    """A Ray job checkpoints each block's linears packed as the artifact packs them and writes the artifact from
    the checkpoint (`load_packed` -> `write_packed_block`): the integer codes survive it bit-exactly."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 64, generator=g)
    cfg = tiny_job_config(method="gptq", gptq_bits=3, gptq_group_size=32)
    results = {
        f"model.layers.0.l{j}.weight": compress_linear(torch.randn(16, 64, generator=g), X.T @ X / 128, 8, cfg)
        for j in range(2)
    }
    tensors_ = {**{n: r.weight for n, r in results.items()}, "model.layers.0.norm.weight": torch.ones(64)}
    ckpt = JobCheckpoint(LocalStorage(tmp_path / "ckpt"), "job-1")
    ckpt.save_block(0, tensors_, results, BlockReport(0, 8, None, 0.0), cfg)
    plain, packed, _ = ckpt.load_packed(0)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    writer = ArtifactWriter(tmp_path / "out", tmp_path / "src", cfg)
    writer.write_packed_block(0, plain, packed)
    writer.finish({"config": cfg.to_dict()})
    dense = dense_state_dict(tmp_path / "out")
    assert all(torch.equal(dense[n], r.weight) for n, r in results.items())
    assert torch.equal(dense["model.layers.0.norm.weight"], torch.ones(64))
