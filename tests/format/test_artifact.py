"""The compressed artifact (format v1): bit packing, per-linear packing, writer, verification, loading,
bit accounting, dense export, bad artifacts. Tiny seeded models, CPU only."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from pbs2p.core.binarize import BlockCode, round_scale
from pbs2p.core.bits import count_bits
from pbs2p.core.config import CompressionConfig, NMPattern
from pbs2p.core.errors import ArtifactError, Pbs2pError
from pbs2p.core.format.bitpack import (
    decode_mask,
    encode_mask,
    pack_bits,
    pack_codes,
    rank_bits,
    rank_tables,
    unpack_bits,
)
from pbs2p.core.format.inspect import inspect_artifact
from pbs2p.core.format.linear import decode_linear, expected_tensors, pack_linear, unpack_linear
from pbs2p.core.format.loader import PackedLinear, dense_state_dict, load_artifact, verify_artifact
from pbs2p.core.format.manifest import FORMAT_VERSION, HF_INDEX_FILE, SEP, ST_DTYPES, hf_quantization_config
from pbs2p.core.format.writer import ArtifactWriter
from pbs2p.core.solver import LinearResult, compress_linear, nm_mask
from pbs2p.testing.artifacts import logits
from pbs2p.testing.cli import run_cli
from pbs2p.testing.tiny import calib_ids, make_model, save_tokenizer, tiny_job_config
from pbs2p.workers.local import compress_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ------------------------------------------------------------------------------------------ bit packing


@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 63, 64, 1001])
def test_pack_bits_round_trip(count: int) -> None:
    bits = torch.rand(count, generator=torch.Generator().manual_seed(count)) > 0.5
    packed = pack_bits(bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count / 8)
    assert torch.equal(unpack_bits(packed, count), bits)


def test_bit_order_is_lsb_first() -> None:
    bits = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], dtype=torch.bool)
    assert pack_bits(bits).tolist() == [0b00000001, 0b00000010]
    assert pack_codes(torch.tensor([5, 2]), 3).tolist() == [0b010101]  # 101 then 010, LSB first


@pytest.mark.parametrize(("m", "n"), [(8, 1), (8, 4), (8, 5), (8, 6), (8, 7), (4, 2), (2, 1), (16, 12)])
def test_rank_tables_are_a_bijection(m: int, n: int) -> None:
    rank_of, bitmap_of, bits_of, pos_of = rank_tables(m, n)
    assert bitmap_of.numel() == math.comb(m, n)
    assert torch.equal(bitmap_of, bitmap_of.sort().values)  # ascending
    pop = ((bitmap_of[:, None] >> torch.arange(m)) & 1).sum(1)
    assert bool((pop == n).all())
    assert torch.equal(bits_of, ((bitmap_of[:, None] >> torch.arange(m)) & 1).bool())  # bit j = column j
    assert bool(bits_of.gather(1, pos_of).all()) and bool((pos_of.diff(dim=1) > 0).all())  # kept, ascending
    assert torch.equal(rank_of[bitmap_of], torch.arange(bitmap_of.numel()))
    assert int((rank_of >= 0).sum()) == math.comb(m, n)
    assert rank_bits(m, n) == math.ceil(math.log2(math.comb(m, n))) == NMPattern(n, m).mask_bits_per_group


@pytest.mark.parametrize(("n", "bits"), [(4, 7), (5, 6), (6, 5), (7, 3)])
def test_rank_code_uses_ceil_log2_bits_per_group(n: int, bits: int) -> None:
    R, C = 32, 128
    mask = nm_mask(torch.randn(R, C, generator=torch.Generator().manual_seed(n)), n, 8)
    enc, data, ranks = encode_mask(mask, n, 8)
    assert enc == "rank" and data is not None and ranks is not None
    assert data.numel() == math.ceil(R * C // 8 * bits / 8)  # exactly ⌈log₂ C(8,N)⌉ bits per group
    assert torch.equal(decode_mask(enc, data, (R, C), n, 8), mask)


def test_irregular_mask_falls_back_to_bitmap() -> None:
    mask = torch.rand(8, 32, generator=torch.Generator().manual_seed(0)) > 0.3
    enc, data, ranks = encode_mask(mask, 6, 8)
    assert enc == "bitmap" and data is not None and ranks is None and data.numel() == 8 * 32 // 8
    assert torch.equal(decode_mask(enc, data, (8, 32), 6, 8), mask)
    assert encode_mask(torch.ones(4, 16, dtype=torch.bool), 8, 8) == ("none", None, None)


# ------------------------------------------------------------------------------------ one linear layer


def random_blocks(
    R: int, widths: list[int], n: int, m: int, salient: list[int], seed: int = 0, dtype: str = "fp16", rc: bool = False
) -> list[BlockCode]:
    """Random block codes with exactly n of every m kept (all kept when n == m), rounded scales."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for w, k in zip(widths, salient, strict=True):
        mask = nm_mask(torch.randn(R, w, generator=g), n, m) if n < m else torch.ones(R, w, dtype=torch.bool)
        sign = torch.rand(R, w, generator=g) > 0.5
        sal = torch.randperm(w, generator=g)[:k].sort().values
        sign2 = torch.rand(R, k, generator=g) > 0.5

        def s(size: int) -> torch.Tensor:
            return round_scale(torch.randn(size, generator=g), dtype)

        scales = {"alpha": s(R), "alpha_col": s(w)} if rc else {"alpha": s(R), "mu": s(R)}
        if k:
            scales.update(alpha_s=s(R), mu_s=s(R), alpha_r=s(R), mu_r=s(R))
        out.append(BlockCode(mask, sign, sal, sign2, scales))
    return out


def assert_same_code(got: list[BlockCode], want: list[BlockCode]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.mask, b.mask)
        assert torch.equal(a.sign & a.mask, b.sign & b.mask)  # signs of kept weights only
        assert torch.equal(a.salient, b.salient.long())
        kept2 = b.mask[:, b.salient]
        assert torch.equal(a.sign2 & kept2, b.sign2 & kept2)
        assert a.scales.keys() == b.scales.keys()
        for k in b.scales:
            assert a.scales[k].dtype == b.scales[k].dtype and torch.equal(a.scales[k], b.scales[k]), k
        assert torch.equal(a.dense(), b.dense())


CASES = [
    (6, 8, [128, 128, 64], [8, 8, 8]),
    (5, 8, [128, 40], [8, 0]),  # last block shorter, one block without salient columns
    (4, 8, [128], [0]),
    (7, 8, [256, 24], [8, 3]),
    (8, 8, [128, 13], [8, 2]),  # dense (method arb): no mask stored; odd width
    (2, 4, [12, 12], [1, 2]),
]


@pytest.mark.parametrize(("n", "m", "widths", "salient"), CASES)
def test_pack_linear_round_trip(n: int, m: int, widths: list[int], salient: list[int]) -> None:
    blocks = random_blocks(24, widths, n, m, salient, seed=n * 100 + len(widths))
    packed, meta = pack_linear(blocks, n, m, 128)
    assert ("mask" in packed) == (n < m)
    assert ("sign2" in packed) == (sum(salient) > 0)
    assert meta["blocks"] == widths and meta["salient"] == salient and meta["shape"] == [24, sum(widths)]
    assert {k: (ST_DTYPES[v.dtype], list(v.shape)) for k, v in packed.items()} == expected_tensors(meta)
    meta = json.loads(json.dumps(meta))  # the layout travels through the manifest
    got = unpack_linear(packed, meta)
    assert_same_code(got, blocks)
    assert torch.equal(decode_linear(packed, meta), torch.cat([b.dense() for b in blocks], 1))
    # bits: what count_bits (the formula) says, up to the padding of the three bit streams' last bytes
    formula = count_bits(blocks, n, m, NMPattern(n, m).mask_bits_per_group if n < m else 0)
    total = formula.sign_bits + formula.residual_bits + formula.mask_bits + formula.scale_bits + formula.index_bits
    stored = sum(t.numel() * t.element_size() for t in packed.values()) * 8
    assert 0 <= stored - total < 8 * 3


def test_pack_linear_arb_rc_bf16_and_any_scale_names() -> None:
    """Scales are stored generically: any name, per row, per column or absent in some blocks, bf16 too."""
    blocks = random_blocks(16, [64, 32], 6, 8, [0, 0], dtype="bf16", rc=True)
    packed, meta = pack_linear(blocks, 6, 8, 64, scale_dtype="bf16")
    assert meta["scales"]["alpha_col"] == {"dtype": "BF16", "layout": "col"}
    assert packed["scale.alpha"].dtype == torch.bfloat16
    assert_same_code(unpack_linear(packed, meta), blocks)
    blocks = random_blocks(16, [64, 64, 32], 6, 8, [4, 0, 2], seed=3)
    blocks[0].scales["shared_mu"] = round_scale(torch.randn(1), "fp16")  # a new layout: one value, block 0 only
    del blocks[2].scales["mu_s"]  # and a salient layout without mu_s (dense() is not called here)
    packed, meta = pack_linear(blocks, 6, 8, 64)
    assert meta["scales"]["shared_mu"]["layout"] == [[1], None, None]
    assert meta["scales"]["mu_s"]["layout"] == [[16], None, None]
    got = unpack_linear(packed, json.loads(json.dumps(meta)))
    for a, b in zip(got, blocks, strict=True):
        assert a.scales.keys() == b.scales.keys()
        assert all(torch.equal(a.scales[k], b.scales[k]) for k in b.scales)


def test_pack_linear_irregular_mask_is_a_bitmap() -> None:
    blocks = random_blocks(16, [64, 32], 6, 8, [4, 2], seed=5)
    g = torch.Generator().manual_seed(1)
    for b in blocks:
        b.mask = torch.rand(b.mask.shape, generator=g) > 0.4  # not N:M
    packed, meta = pack_linear(blocks, 6, 8, 64)
    assert meta["mask"] == "bitmap" and packed["mask"].numel() == 16 * 96 // 8
    assert_same_code(unpack_linear(packed, meta), blocks)


def test_unknown_or_missing_scales_are_refused_by_the_decoder() -> None:
    """A scale layout this pbs2p's decoder does not know (from a newer pbs2p) is an error, never ignored."""
    blocks = random_blocks(16, [64], 6, 8, [4])
    blocks[0].scales["gamma"] = round_scale(torch.randn(16), "fp16")
    packed, meta = pack_linear(blocks, 6, 8, 64)
    with pytest.raises(ArtifactError, match=r"stores scales \['gamma'\] that this pbs2p does not decode"):
        decode_linear(packed, meta)
    del blocks[0].scales["gamma"], blocks[0].scales["mu_s"]
    packed, meta = pack_linear(blocks, 6, 8, 64)
    with pytest.raises(ArtifactError, match="cannot be decoded with its scales"):
        decode_linear(packed, meta)


def test_pack_linear_refuses_unrounded_scales() -> None:
    blocks = random_blocks(8, [16], 6, 8, [0])
    blocks[0].scales["alpha"] = torch.full((8,), 1 / 3)  # not an fp16 value
    with pytest.raises(Pbs2pError, match="alpha.*not exactly representable in fp16"):
        pack_linear(blocks, 6, 8, 16)


@pytest.mark.parametrize("n", [6, 5, 4])
def test_mask_and_signs_cost_at_most_1_375_bits(n: int) -> None:
    """ALGORITHM.md's rank-code arithmetic: signs N/M + ⌈log₂ C(8,N)⌉/8 <= 1.375 bit/weight before scales."""
    blocks = random_blocks(256, [128] * 4, n, 8, [0] * 4, seed=n)
    packed, _ = pack_linear(blocks, n, 8, 128)
    bits = (packed["mask"].numel() + packed["sign"].numel()) * 8 / (256 * 512)
    assert bits <= 1.375
    assert bits == n / 8 + rank_bits(8, n) / 8


def _solver_variants() -> list[dict[str, Any]]:
    """Every scale layout and dtype the config offers (the packer must not care which), and ARB-RC."""
    out: list[dict[str, Any]] = [{"scale_dtype": "bf16"}, {"arb_variant": "arb-rc", "salient_columns": 0}]
    layouts = typing.get_args(CompressionConfig.model_fields["scale_layout"].annotation)
    return out + [{"scale_layout": x} for x in layouts]


@pytest.mark.parametrize("variant", _solver_variants(), ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_solver_codes_round_trip(variant: dict[str, Any]) -> None:
    """The codes compress_linear really produces (each scale layout, dtype, ARB variant) pack bit-exactly."""
    g = torch.Generator().manual_seed(1)
    W, X = torch.randn(48, 192, generator=g), torch.randn(256, 192, generator=g)
    cfg = CompressionConfig.from_options(pattern="5:8", block_size=128, arb_iters=3, **variant)
    res = compress_linear(W, X.T @ X / 256, 5, cfg)
    packed, meta = pack_linear(res, 5, 8, cfg.block_size, cfg.ablations.scale_dtype)
    assert meta["blocks"] == [128, 64]
    assert torch.equal(decode_linear(packed, json.loads(json.dumps(meta))), res.weight)
    formula = count_bits(res.blocks, 5, 8, NMPattern(5, 8).mask_bits_per_group)
    total = formula.sign_bits + formula.residual_bits + formula.mask_bits + formula.scale_bits + formula.index_bits
    assert 0 <= sum(t.numel() * t.element_size() for t in packed.values()) * 8 - total < 8 * 3


def test_packed_linear_is_small_and_exact() -> None:
    """256x512 at 6:8 with the salient residual on: resident < 1/4 of fp16, output equal to F.linear(Ŵ)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(256, 512, generator=g)
    X = torch.randn(1024, 512, generator=g)
    cfg = CompressionConfig.from_options(pattern="6:8", salient_columns=8, arb_iters=5)
    res = compress_linear(W, X.T @ X / 1024, 6, cfg)
    packed, meta = pack_linear(res, 6, 8, cfg.block_size)
    bias = torch.randn(256, generator=g)
    mod = PackedLinear(meta, packed, bias)
    assert mod.resident_bytes() < 256 * 512 * 2 / 4
    assert sum(b.numel() * b.element_size() for b in mod.buffers()) == mod.resident_bytes()
    assert torch.equal(mod.decode(check=True), res.weight)
    x = torch.randn(3, 5, 512, generator=g)
    assert torch.equal(mod(x), torch.nn.functional.linear(x, res.weight, bias))


# ------------------------------------------------------------------------------ a compressed tiny model


@dataclass
class Compressed:
    src: Path
    out: Path
    reference: Any  # the source model with the in-memory compressed weights (what the pipeline computed)
    results: dict[str, LinearResult]
    report: Any


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Compressed:
    root = tmp_path_factory.mktemp("artifact")
    model = make_model(root / "src")
    save_tokenizer(root / "src")
    captured: dict[str, torch.Tensor] = {}
    results: dict[str, LinearResult] = {}
    original = ArtifactWriter.write_block

    def spy(self: ArtifactWriter, index: int, tensors: dict[str, torch.Tensor], res: dict[str, Any]) -> None:
        captured.update({k: v.detach().clone() for k, v in tensors.items()})
        results.update(res)
        original(self, index, tensors, res)

    ArtifactWriter.write_block = spy  # type: ignore[method-assign]
    try:
        report = compress_model(root / "src", root / "out", tiny_job_config(), calib_ids())
    finally:
        ArtifactWriter.write_block = original  # type: ignore[method-assign]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(results) <= set(captured)
    state.update(captured)
    model.load_state_dict(state)
    return Compressed(root / "src", root / "out", model, results, report)


def test_artifact_layout_and_manifest(compressed: Compressed) -> None:
    out = compressed.out
    names = sorted(p.name for p in out.iterdir())
    copied = {p.name for p in compressed.src.iterdir() if not p.name.endswith(".safetensors")}
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= copied
    shards = {"pbs2p-block-00000-000.safetensors", "pbs2p-block-00001-000.safetensors", "pbs2p-rest-000.safetensors"}
    assert set(names) == copied | shards | {"manifest.json", "timings.json", HF_INDEX_FILE}
    # the source's config, with what transformers needs to load it packed (pbs2p.hf)
    source_config = json.loads((compressed.src / "config.json").read_text())
    assert json.loads((out / "config.json").read_text()) == {
        **source_config,
        "quantization_config": hf_quantization_config(),
    }
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == "pbs2p-artifact" and man["format_version"] == 1
    assert man["config"] == tiny_job_config().to_dict() == man["report"]["config"]
    assert set(man["files"]) == set(names) - {"manifest.json", "timings.json"}
    for fname, info in man["files"].items():
        data = (out / fname).read_bytes()
        assert info == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert set(man["linears"]) == set(compressed.results)
    for b in compressed.report.blocks:
        for lr in b.linears:
            meta = man["linears"][f"{lr.name}.weight"]
            assert meta["n_keep"] == b.n_keep == lr.n_keep and meta["m"] == 8
            assert meta["mask"] == "rank" and meta["shape"] == list(lr.shape)
    # packed tensors never hold a dense weight: no float tensor of a compressed linear's shape
    for fname in man["files"]:
        if fname.endswith(".safetensors"):
            for name, t in load_file(out / fname).items():
                assert name.split(SEP)[0] not in compressed.results or t.dim() == 1, name


def test_decoded_weights_are_bit_exact(compressed: Compressed) -> None:
    dense = dense_state_dict(compressed.out)
    for name, res in compressed.results.items():
        assert torch.equal(dense[name], res.weight), name
    for name, t in compressed.reference.state_dict().items():
        if name in dense:
            assert torch.equal(dense[name], t), name


@pytest.mark.parametrize("mode", ["dense", "packed"])
def test_load_gives_the_in_memory_logits(compressed: Compressed, mode: str) -> None:
    ids = calib_ids()
    model = load_artifact(compressed.out, mode=mode)
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == (len(compressed.results) if mode == "packed" else 0)
    assert torch.equal(logits(model, ids), logits(compressed.reference, ids))
    if mode == "packed":
        resident = sum(m.resident_bytes() for m in packed)
        fp16 = sum(m.in_features * m.out_features * 2 for m in packed)
        assert resident < fp16 / 4


def test_inspect_counts_the_bytes_written(compressed: Compressed) -> None:
    info = inspect_artifact(compressed.out)
    man = json.loads((compressed.out / "manifest.json").read_text())
    stored: dict[str, int] = {}
    for fname in man["files"]:
        if fname.endswith(".safetensors"):
            with safe_open(compressed.out / fname, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118
                    t = f.get_tensor(name)
                    base = name.split(SEP)[0]
                    if SEP in name:
                        stored[base] = stored.get(base, 0) + t.numel() * t.element_size()
    formula = {f"{lr.name}.weight": lr.bits for b in compressed.report.blocks for lr in b.linears}
    assert len(info["layers"]) == len(compressed.results) == len(stored)
    for lay in info["layers"]:
        name = lay["name"] + ".weight"
        R, C = compressed.results[name].weight.shape
        assert lay["weights"] == R * C and lay["bytes"] == stored[name]
        assert lay["true_bits"] == stored[name] * 8 / (R * C)
        assert lay["ratio_fp16"] == pytest.approx(16 / lay["true_bits"])
        # agrees with bits.py's formula within the padding of the mask, sign and residual streams
        assert 0 <= stored[name] * 8 - formula[name]["true_bits"] * R * C < 8 * 3
        assert lay["paper_bits"] == pytest.approx(formula[name]["paper_bits"])
    t = info["total"]
    assert t["true_bits"] == sum(stored.values()) * 8 / t["weights"]
    assert 0 < t["true_bits"] - compressed.report.bits["true_bits"] < 8 * 3 * len(stored) / t["weights"]
    assert t["paper_bits"] == pytest.approx(compressed.report.bits["paper_bits"])


def test_cli_inspect(compressed: Compressed, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "inspect", str(compressed.out))
    assert rc == 0, err
    assert "model.layers.0.self_attn.q_proj" in out and "true bits" in out and "total (14 compressed linears)" in out
    rc, out, err = run_cli(capsys, "inspect", str(compressed.out), "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["total"]["true_bits"] == inspect_artifact(compressed.out)["total"]["true_bits"]


def test_export_dense_loads_in_plain_transformers(
    compressed: Compressed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run_cli(capsys, "export-dense", str(compressed.out), "-o", str(tmp_path / "dense"))
    assert rc == 0, err
    assert out.strip() == str(tmp_path / "dense")
    assert not (tmp_path / "dense" / "manifest.json").exists() and (tmp_path / "dense" / "tokenizer.json").is_file()
    dense = tmp_path / "dense"
    # the source model's dtype and layout: one weights file (the source has one), no index
    config = json.loads((dense / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config  # dense: not a pbs2p model
    assert not (dense / HF_INDEX_FILE).exists()
    assert sorted(p.name for p in dense.glob("model*")) == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32).eval()
    ids = calib_ids()
    assert torch.equal(logits(model, ids), logits(compressed.reference, ids))
    rc, out, err = run_cli(capsys, "export-dense", str(compressed.out), "-o", str(dense))
    assert rc == 2 and "not empty" in err


def test_export_dense_in_bf16_shards_with_ordinary_modes(
    compressed: Compressed, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bf16"
    argv = ("export-dense", str(compressed.out), "-o", str(out), "--dtype", "bfloat16", "--max-shard-size", "40kB")
    rc, stdout, err = run_cli(capsys, *argv)
    assert rc == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert all((out / s).stat().st_size <= 40_000 + 4096 or len(load_file(out / s)) == 1 for s in shards)
    want = dense_state_dict(compressed.out)
    got = {k: v for s in shards for k, v in load_file(out / s).items()}
    assert got.keys() == want.keys() and index["metadata"]["total_size"] == sum(t.nbytes for t in got.values())
    for k, t in want.items():
        assert torch.equal(got[k], t.to(torch.bfloat16) if t.is_floating_point() else t), k
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)  # transformers reads the dtype from config.json
    assert model.dtype == torch.bfloat16
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [("--dtype", "int8", "invalid choice: 'int8'"), ("--max-shard-size", "big", "'big' is no size")],
)
def test_export_dense_bad_options(
    compressed: Compressed, tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, needle: str
) -> None:
    with pytest.raises(SystemExit) as info:
        run_cli(capsys, "export-dense", str(compressed.out), "-o", str(tmp_path / "x"), option, value)
    assert info.value.code == 2 and needle in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_artifact_is_not_a_compression_source(compressed: Compressed, tmp_path: Path) -> None:
    with pytest.raises(Pbs2pError, match="is a compressed pbs2p artifact"):
        compress_model(compressed.out, tmp_path / "again", tiny_job_config(), calib_ids())


def test_deterministic(compressed: Compressed, tmp_path: Path) -> None:
    """Same config, model and calibration: every verified file is byte-identical, the manifest included
    (wall-clock timings live in timings.json, outside the verified content)."""
    compress_model(compressed.src, tmp_path / "again", tiny_job_config(), calib_ids())
    a, b = compressed.out, tmp_path / "again"
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        if p.name != "timings.json":
            assert p.read_bytes() == (b / p.name).read_bytes(), p.name
    assert "seconds" not in (a / "manifest.json").read_text()
    assert json.loads((a / "timings.json").read_text())["seconds"] > 0


# ---------------------------------------------------------------------------------------- bad artifacts


def _rewrite(out: Path, fname: str, tensors: dict[str, torch.Tensor], table: bool) -> None:
    """Replace a tensor file and fix its size and sha256 in the manifest (and its tensor table if asked)."""
    save_file(tensors, out / fname, metadata={"format": "pt"})
    man = json.loads((out / "manifest.json").read_text())
    data = (out / fname).read_bytes()
    man["files"][fname] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    if table:
        for k, v in tensors.items():
            man["tensors"][k]["shape"] = list(v.shape)
    (out / "manifest.json").write_text(json.dumps(man))


def flip_byte(out: Path) -> str:
    p = out / "pbs2p-block-00000-000.safetensors"
    data = bytearray(p.read_bytes())
    data[len(data) - 100] ^= 0x10
    p.write_bytes(bytes(data))
    return "pbs2p-block-00000-000.safetensors fails its sha256 check"


def truncate(out: Path) -> str:
    p = out / "pbs2p-rest-000.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    return "pbs2p-rest-000.safetensors has"


def missing_file(out: Path) -> str:
    (out / "pbs2p-block-00001-000.safetensors").unlink()
    return "pbs2p-block-00001-000.safetensors is missing"


def missing_config(out: Path) -> str:
    (out / "config.json").unlink()
    return "config.json is missing"


def newer_version(out: Path) -> str:
    man = json.loads((out / "manifest.json").read_text())
    man["format_version"] = FORMAT_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(man))
    return f"manifest.json is format version {FORMAT_VERSION + 1}, written by a newer pbs2p"


def missing_manifest(out: Path) -> str:
    (out / "manifest.json").unlink()
    return "manifest.json is missing"


def bad_json(out: Path) -> str:
    (out / "manifest.json").write_text('{"format": "pbs2p-artifact", ')
    return "manifest.json is not valid JSON"


def wrong_shape_in_file(out: Path) -> str:
    fname = "pbs2p-block-00000-000.safetensors"
    ts = load_file(out / fname)
    ts["model.layers.0.input_layernorm.weight"] = ts["model.layers.0.input_layernorm.weight"][:32].clone()
    _rewrite(out, fname, ts, table=False)
    return f"{fname}: tensor 'model.layers.0.input_layernorm.weight' is F32 [32]"


def wrong_packed_shape(out: Path) -> str:
    fname = "pbs2p-block-00001-000.safetensors"
    ts = load_file(out / fname)
    name = "model.layers.1.mlp.up_proj.weight:sign"
    ts[name] = ts[name][:-3].clone()
    _rewrite(out, fname, ts, table=True)
    return f"{fname}: tensor {name} is U8"


def wrong_shape_for_model(out: Path) -> str:
    fname = "pbs2p-rest-000.safetensors"
    ts = load_file(out / fname)
    ts["model.norm.weight"] = torch.ones(65)
    _rewrite(out, fname, ts, table=True)
    return f"{fname}: tensor 'model.norm.weight' has shape [65], the model's config.json implies [64]"


BAD = [flip_byte, truncate, missing_file, missing_config, newer_version, missing_manifest, bad_json,
       wrong_shape_in_file, wrong_packed_shape]  # fmt: skip


@pytest.mark.parametrize("damage", BAD, ids=lambda f: f.__name__)
def test_bad_artifact_is_a_clear_error(compressed: Compressed, tmp_path: Path, damage: Any) -> None:
    out = tmp_path / "art"
    shutil.copytree(compressed.out, out)
    needle = damage(out)
    for fn in (verify_artifact, load_artifact, inspect_artifact, dense_state_dict):
        with pytest.raises(ArtifactError) as exc:
            fn(out)
        assert needle in str(exc.value), str(exc.value)
        assert str(out) in str(exc.value)


def test_wrong_shape_for_the_model_config(compressed: Compressed, tmp_path: Path) -> None:
    out = tmp_path / "art"
    shutil.copytree(compressed.out, out)
    needle = wrong_shape_for_model(out)
    verify_artifact(out)  # consistent with its own manifest ...
    for mode in ("dense", "packed"):
        with pytest.raises(ArtifactError) as exc:  # ... but not with the model it claims to be
            load_artifact(out, mode=mode)
        assert needle in str(exc.value)


def test_cli_reports_a_bad_artifact(compressed: Compressed, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "art"
    shutil.copytree(compressed.out, out)
    flip_byte(out)
    for argv in (("inspect", str(out)), ("eval", str(out), "--seqlen", "16"), ("export-dense", str(out), "-o", "x")):
        rc, stdout, err = run_cli(capsys, *argv)
        assert rc == 2 and stdout == ""
        assert err.startswith("pbs2p: error: ") and "fails its sha256 check" in err and str(out) in err


# ------------------------------------------------------------------------------------ writer on its own


def _result(blocks: list[BlockCode], n: int) -> LinearResult:
    w = torch.cat([b.dense() for b in blocks], 1)
    return LinearResult(w, blocks, n, 0.0, 0.01, 0)


def test_writer_shards_above_the_limit(tmp_path: Path) -> None:
    """A small size limit splits a block over several files (a linear's tensors stay together); the memory
    bound holds: each block is written when it arrives."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    cfg = CompressionConfig.from_options(pattern="6:8", block_size=64)
    w = ArtifactWriter(tmp_path / "out", tmp_path / "src", cfg, shard_bytes=2048)
    want: dict[str, torch.Tensor] = {}
    for i in range(2):
        codes = [random_blocks(32, [64, 64], 6, 8, [4, 2], seed=10 * i + j) for j in range(3)]
        res = {f"b{i}.l{j}.weight": _result(c, 6) for j, c in enumerate(codes)}
        ts = {k: r.weight for k, r in res.items()} | {f"b{i}.norm.weight": torch.randn(32)}
        w.write_block(i, ts, res)
        want.update(ts)
        assert len(list(w.tmp.glob(f"pbs2p-block-{i:05d}-*.safetensors"))) >= 2  # written now, sharded
    w.write_rest({"embed.weight": torch.randn(10, 32)})
    want["embed.weight"] = load_file(w.tmp / "pbs2p-rest-000.safetensors")["embed.weight"]
    w.finish({"config": cfg.to_dict(), "model_type": "test", "blocks": []})
    art = verify_artifact(tmp_path / "out")
    assert len(art.tensor_files()) >= 5
    for name, meta in art.linears.items():  # every packed field of a linear is in the linear's file
        files = {art.manifest["tensors"][f"{name}{SEP}{f}"]["file"] for f in expected_tensors(meta)}
        assert files == {meta["file"]}
    got = dense_state_dict(tmp_path / "out")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_writer_abort_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    w = ArtifactWriter(tmp_path / "out", tmp_path / "src")
    w.write_rest({"x": torch.zeros(3)})
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
