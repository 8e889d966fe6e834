"""The integer codec of method gptq (format/intlinear.py): pack/unpack bit-exact, the bytes it stores, the
artifact it goes into (format version 2), bad layouts refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pbs2p.core.bits import count_int_bits
from pbs2p.core.config import CompressionConfig
from pbs2p.core.errors import ArtifactError
from pbs2p.core.format.inspect import inspect_artifact
from pbs2p.core.format.intlinear import expected_int_tensors, unpack_int
from pbs2p.core.format.linear import decode_linear, expected_tensors, pack_linear, unpack_linear
from pbs2p.core.format.loader import dense_state_dict, verify_artifact
from pbs2p.core.format.manifest import FORMAT_VERSION, nbytes
from pbs2p.core.format.writer import ArtifactWriter
from pbs2p.core.solver import LinearResult, compress_linear

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

SETTINGS = [(bits, act, sym) for bits in (2, 3, 4) for act in (False, True) for sym in (False, True)]


def _result(bits: int = 3, act_order: bool = True, sym: bool = False, rows: int = 24, cols: int = 192) -> LinearResult:
    g = torch.Generator().manual_seed(bits * 7 + rows)
    X = torch.randn(512, cols, generator=g) * (torch.rand(cols, generator=g) * 2 + 0.1)
    W = torch.randn(rows, cols, generator=g) * 0.05
    cfg = CompressionConfig.from_options(
        method="gptq", gptq_bits=bits, gptq_group_size=64, gptq_act_order=act_order, gptq_sym=sym
    )
    return compress_linear(W, 2.0 / 512 * X.T @ X, 8, cfg)


@pytest.mark.parametrize(("bits", "act_order", "sym"), SETTINGS)
def test_pack_unpack_is_bit_exact(bits: int, act_order: bool, sym: bool) -> None:
    res = _result(bits, act_order, sym)
    code = res.intcode
    assert code is not None
    fields, meta = pack_linear(res, 8, 8, 128)
    assert set(fields) == {"codes", "scale"} | ({"g_idx"} if act_order else set()) | (set() if sym else {"zero"})
    got = unpack_int(fields, meta)
    assert torch.equal(got.codes, code.codes) and torch.equal(got.zeros, code.zeros)
    assert torch.equal(got.scales, code.scales) and got.scales.dtype == torch.float32
    assert (got.g_idx is None) == (code.g_idx is None)
    if code.g_idx is not None:
        assert got.g_idx is not None and torch.equal(got.g_idx, code.g_idx)
    w = decode_linear(fields, meta)
    assert torch.equal(w, res.weight)  # bit-exact with the solver's Ŵ
    # the bytes are the code's bits, rounded up per stream to whole bytes
    stored = sum(nbytes(t) for t in fields.values()) * 8
    formula = count_int_bits(code)
    total = formula.sign_bits + formula.scale_bits + formula.index_bits
    assert total <= stored < total + 8 * len(fields)
    assert {k: (str(v[0]), v[1]) for k, v in expected_tensors(meta).items()} == {
        k: ("F16" if k == "scale" else "U8", [t.numel()]) for k, t in fields.items()
    }


def test_same_input_same_bytes() -> None:
    a, _ = pack_linear(_result(), 8, 8, 128)
    b, _ = pack_linear(_result(), 8, 8, 128)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bad_layouts_are_refused() -> None:
    fields, meta = pack_linear(_result(), 8, 8, 128)
    with pytest.raises(ArtifactError, match="codec 'int9' is not known"):
        expected_tensors({**meta, "codec": "int9"})
    with pytest.raises(ArtifactError, match="inconsistent"):
        expected_int_tensors({**meta, "groups": 5})
    with pytest.raises(ArtifactError, match="packed fields"):
        decode_linear({k: v for k, v in fields.items() if k != "zero"}, meta)
    with pytest.raises(ArtifactError, match="'codes' is"):
        decode_linear({**fields, "codes": fields["codes"][:-1]}, meta)
    bad = fields["g_idx"].clone()
    bad[:] = 255  # every 2-bit group index = 3, but there are 3 groups
    with pytest.raises(ArtifactError, match="group index 3 is out of range"):
        decode_linear({**fields, "g_idx": bad}, meta)
    with pytest.raises(ArtifactError, match="not block codes"):
        unpack_linear(fields, meta)


def test_artifact_with_integer_codes(tmp_path: Path) -> None:
    """The writer packs gptq results with the integer codec, says format version 2 (a version-1 reader refuses
    it instead of misreading it), and the loader decodes it bit-exactly; the bits are counted from the bytes."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    cfg = CompressionConfig.from_options(method="gptq", gptq_bits=3, gptq_group_size=64)
    w = ArtifactWriter(tmp_path / "out", tmp_path / "src", cfg)
    results = {f"b0.l{j}.weight": _result(3, j == 0, j == 1, rows=8 + 8 * j) for j in range(3)}
    w.write_block(0, dict.fromkeys(results, torch.zeros(1)), results)
    w.finish({"config": cfg.to_dict()})
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert man["format_version"] == 2 == FORMAT_VERSION
    assert {m["codec"] for m in man["linears"].values()} == {"int"}
    verify_artifact(tmp_path / "out")
    dense = dense_state_dict(tmp_path / "out")
    assert all(torch.equal(dense[n], r.weight) for n, r in results.items())
    info = inspect_artifact(tmp_path / "out")
    weights = sum(r.weight.numel() for r in results.values())
    assert info["total"]["weights"] == weights and info["total"]["paper_bits"] == 3
    bits = [count_int_bits(r.intcode) for r in results.values() if r.intcode is not None]
    formula = sum(b.true_bits * b.weights for b in bits) / weights
    assert 3 < info["total"]["true_bits"] == pytest.approx(formula, abs=0.02)
    assert [lay["pattern"] for lay in info["layers"]] == ["int3 g64 act", "int3 g64", "int3 g64"]
