"""The per-block pipeline (workers/local.py, block.py, plan.py, model_stream.py) on seeded tiny random models
of every family, CPU only."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pbs2p.core.errors import Pbs2pError
from pbs2p.core.families import FAMILIES
from pbs2p.core.format import MANIFEST_FILE, load_artifact
from pbs2p.testing.artifacts import (
    assert_nm,
    file_hashes,
    linear_names,
    logits,
    saved_report,
    source_tensors,
    tensors,
)
from pbs2p.testing.tiny import BATCH, CONFIGS, calib_ids, make_model, tiny_job_config
from pbs2p.workers.local import compress_model
from pbs2p.workers.model_stream import BlockModel

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_family_has_a_test_config() -> None:
    assert set(CONFIGS) == set(FAMILIES)


# ------------------------------------------------------------------------------------------- families


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fp_reproduces_the_model(tmp_path: Path, family: str) -> None:
    src = make_model(tmp_path / "src", family)
    ids = calib_ids()
    report = compress_model(tmp_path / "src", tmp_path / "out", tiny_job_config(method="fp"), ids)
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
    report = compress_model(tmp_path / "src", tmp_path / "out", tiny_job_config(), ids)
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
    assert saved["config"] == tiny_job_config().to_dict() and saved["config"]["allocation"] == "uniform"


# ------------------------------------------------------------------------------------ pipeline options


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("llama") / "src"
    return path, source_tensors(make_model(path))


def test_deterministic(tmp_path: Path, llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    src, _ = llama
    compress_model(src, tmp_path / "a", tiny_job_config(), calib_ids())
    compress_model(src, tmp_path / "b", tiny_job_config(), calib_ids())
    a, b = file_hashes(tmp_path / "a"), file_hashes(tmp_path / "b")
    assert len([n for n in a if n.startswith("pbs2p-block-")]) == 2 and a == b


def test_skip_modules(tmp_path: Path, llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    src, source = llama
    report = compress_model(src, tmp_path / "out", tiny_job_config(skip_modules=("*.mlp.down_proj",)), calib_ids())
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
    seq = compress_model(src, tmp_path / "seq", tiny_job_config(), calib_ids())
    ind = compress_model(src, tmp_path / "ind", tiny_job_config(propagation="independent"), calib_ids())
    assert_nm(tmp_path / "ind", ind, source)
    assert [b.n_keep for b in ind.blocks] == [b.n_keep for b in seq.blocks]  # CFS runs on the FP model
    a, b = tensors(tmp_path / "seq"), tensors(tmp_path / "ind")
    block0 = [n for n in linear_names("llama", 2) if n.startswith("model.layers.0.")]
    block1 = [n for n in linear_names("llama", 2) if n.startswith("model.layers.1.")]
    assert all(torch.equal(a[n], b[n]) for n in block0)  # same inputs for block 0
    assert any(not torch.equal(a[n], b[n]) for n in block1)


def test_true_sequential(tmp_path: Path, llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    src, source = llama
    # block tuning off: it tunes every linear of a block together, after the passes compared here
    one = compress_model(src, tmp_path / "one", tiny_job_config(block_tune_steps=0), calib_ids())
    seq = compress_model(src, tmp_path / "ts", tiny_job_config(block_tune_steps=0, true_sequential=True), calib_ids())
    assert_nm(tmp_path / "ts", seq, source)
    a, b = tensors(tmp_path / "one"), tensors(tmp_path / "ts")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(a[q], b[q])  # the first group sees the same FP inputs either way
    down = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(a[down], b[down])  # later groups are calibrated on compressed earlier ones
    assert [lr.name for lr in seq.blocks[0].linears] == [lr.name for lr in one.blocks[0].linears]


def test_cfs_allocation(tmp_path: Path) -> None:
    make_model(tmp_path / "src", layers=4)
    report = compress_model(tmp_path / "src", tmp_path / "out", tiny_job_config(allocation="cfs"), calib_ids())
    ns = [b.n_keep for b in report.blocks]
    assert len(ns) == 4 and sum(ns) == 4 * 6 and all(5 <= n <= 7 for n in ns)
    assert all(b.cosine is not None for b in report.blocks)
    assert all(lr.n_keep == b.n_keep for b in report.blocks for lr in b.linears)


def test_cfs_error_score(tmp_path: Path) -> None:
    """cfs_score="error": each block's output error is measured at N_t - 1, N_t, N_t + 1 on FP inputs, N per
    block minimises their sum with the exact average; the block weights written are the real compression's."""
    make_model(tmp_path / "src", layers=4)
    report = compress_model(tmp_path / "src", tmp_path / "out", tiny_job_config(cfs_score="error"), calib_ids())
    ns = [b.n_keep for b in report.blocks]
    assert sum(ns) == 4 * 6 and all(5 <= n <= 7 for n in ns)
    assert all(lr.n_keep == b.n_keep for b in report.blocks for lr in b.linears)
    again = compress_model(tmp_path / "src", tmp_path / "again", tiny_job_config(cfs_score="error"), calib_ids())
    assert [b.n_keep for b in again.blocks] == ns and file_hashes(tmp_path / "out") == file_hashes(tmp_path / "again")


def test_in_features_not_divisible_by_m(tmp_path: Path) -> None:
    make_model(tmp_path / "src", hidden=36)
    with pytest.raises(Pbs2pError, match=r"in_features=36 .*M=8"):
        compress_model(tmp_path / "src", tmp_path / "out", tiny_job_config(allocation="uniform"), calib_ids())
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no partial output left behind
