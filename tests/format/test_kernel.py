"""The packed CPU kernel (pbs2p_core/format/kernel.py + packed_kernel.cpp): its tile decode is bit-exactly
decode_linear, its fused GEMV and its tiled matmul equal F.linear(x, Ŵ) up to float rounding, for every layout
the artifact has; without a compiler PackedLinear falls back to the torch decode with one warning."""

from __future__ import annotations

import copy
import io
import json
import typing
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pbs2p.core.binarize import BlockCode, round_scale
from pbs2p.core.config import CompressionConfig
from pbs2p.core.format import kernel
from pbs2p.core.format.linear import decode_linear, pack_linear
from pbs2p.core.format.loader import PackedLinear
from pbs2p.core.solver import compress_linear, nm_mask


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert kernel.library() is not None, "the kernel must build where the tests run (g++ is on every machine)"


def blocks_for(
    R: int,
    widths: list[int],
    n: int,
    m: int,
    salient: list[int],
    layout: str = "full",
    dtype: str = "fp16",
    seed: int = 0,
) -> list[BlockCode]:
    """Random block codes: n of every m kept (all when n == m), the scales of `layout` (full, shared, lean, rc)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for w, k in zip(widths, salient, strict=True):
        mask = nm_mask(torch.randn(R, w, generator=g), n, m) if n < m else torch.ones(R, w, dtype=torch.bool)
        sign = torch.rand(R, w, generator=g) > 0.5
        sal = torch.randperm(w, generator=g)[:k].sort().values
        sign2 = torch.rand(R, k, generator=g) > 0.5

        def s(size: int) -> torch.Tensor:
            return round_scale(torch.randn(size, generator=g), dtype)

        scales = {"alpha": s(R), "alpha_col": s(w)} if layout == "rc" else {"alpha": s(R), "mu": s(R)}
        if k:
            scales["alpha_r"] = s(R)
            if layout == "full":
                scales.update(alpha_s=s(R), mu_s=s(R), mu_r=s(R))
            elif layout == "shared":
                scales["mu_r"] = s(R)
        out.append(BlockCode(mask, sign, sal, sign2, scales))
    return out


# (rows, block widths, n, m, salient per block, scale layout, scale dtype)
LAYOUTS = [
    (37, [128, 128, 64], 6, 8, [8, 8, 8], "full", "fp16"),  # rows not a multiple of the 16-row chunk
    (24, [128, 40], 5, 8, [8, 0], "full", "fp16"),  # last block shorter, one block without salient columns
    (48, [128], 4, 8, [0], "full", "fp16"),  # no salient columns: no sign2
    (33, [256, 24], 7, 8, [8, 3], "shared", "bf16"),
    (20, [128, 13], 8, 8, [8, 2], "lean", "fp16"),  # dense 1-bit: no mask stored; odd width
    (19, [12, 12, 8], 2, 4, [1, 2, 0], "full", "fp16"),  # m = 4: groups are not bytes
    (17, [96, 96], 3, 6, [4, 4], "shared", "fp16"),  # m = 6: groups straddle the 8-column chunks
    (21, [64, 32], 6, 8, [0, 0], "rc", "bf16"),  # ARB-RC: row x column scales
    (40, [120, 45], 10, 15, [5, 3], "full", "fp16"),  # m = 15: no sign table, bit deposit
    (18, [128, 64], 6, 8, [56, 8], "full", "fp16"),  # > 48 salient columns in a block: one at a time
]


def packed_layout(case: tuple[Any, ...]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    R, widths, n, m, salient, layout, dtype = case
    blocks = blocks_for(R, widths, n, m, salient, layout, dtype, seed=R)
    packed, meta = pack_linear(blocks, n, m, max(widths), scale_dtype=dtype)
    return packed, json.loads(json.dumps(meta))


def bitmap_layout() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    blocks = blocks_for(29, [64, 40], 6, 8, [4, 2], seed=5)
    g = torch.Generator().manual_seed(1)
    for b in blocks:
        b.mask = torch.rand(b.mask.shape, generator=g) > 0.4  # not N:M: a bitmap, rows keep different counts
    packed, meta = pack_linear(blocks, 6, 8, 64)
    assert meta["mask"] == "bitmap"
    return packed, json.loads(json.dumps(meta))


def solver_layout(variant: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    g = torch.Generator().manual_seed(2)
    W, X = torch.randn(40, 200, generator=g), torch.randn(256, 200, generator=g)
    cfg = CompressionConfig.from_options(pattern="6:8", block_size=64, arb_iters=2, **variant)
    res = compress_linear(W, X.T @ X / 256, 6, cfg)
    packed, meta = pack_linear(res, 6, 8, cfg.block_size, cfg.ablations.scale_dtype)
    return packed, json.loads(json.dumps(meta))


SOLVER = [{"scale_layout": x} for x in typing.get_args(CompressionConfig.model_fields["scale_layout"].annotation)]
SOLVER += [{"scale_dtype": "bf16"}, {"arb_variant": "arb-rc", "salient_columns": 0}]


def all_layouts() -> list[Any]:
    cases = [pytest.param(lambda c=c: packed_layout(c), id=f"{c[2]}:{c[3]}-{c[5]}-{c[6]}-R{c[0]}") for c in LAYOUTS]
    cases.append(pytest.param(bitmap_layout, id="bitmap"))
    cases += [pytest.param(lambda v=v: solver_layout(v), id="solver-" + "-".join(map(str, v.values()))) for v in SOLVER]
    return cases


def bound(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """A float32 rounding bound of x Ŵᵀ: a few ulps of sum |x| |Ŵ| per output (the sum's order differs)."""
    return 8 * torch.finfo(torch.float32).eps * (x.abs().double() @ W.abs().double().T) + 1e-30


@pytest.mark.parametrize("make", all_layouts())
def test_tile_decode_is_bit_exact(make: Any) -> None:
    packed, meta = make()
    plan = kernel.plan_for(meta, packed)
    assert plan is not None
    assert torch.equal(plan.dense(), decode_linear(packed, meta))


@pytest.mark.parametrize("make", all_layouts())
@pytest.mark.parametrize("rows", [1, 3, kernel.GEMV_ROWS, kernel.GEMV_ROWS + 1, 70])
def test_kernel_matmul_equals_decode_then_matmul(make: Any, rows: int) -> None:
    packed, meta = make()
    W = decode_linear(packed, meta)
    g = torch.Generator().manual_seed(rows)
    bias = torch.randn(W.shape[0], generator=g)
    mod = PackedLinear(meta, packed, bias)
    assert mod.kernel_plan() is not None
    x = torch.randn(rows, W.shape[1], generator=g)
    want = F.linear(x, W, bias)
    got = mod(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert bool(((got - want).abs().double() <= bound(x, W)).all())
    if rows > kernel.GEMV_ROWS:  # one tile of Ŵ and the same BLAS call: bit-exact
        assert torch.equal(got, want)
    x3 = x.reshape(1, rows, -1).to(torch.bfloat16)  # bf16 input: computed in float32, rounded once to bf16
    got16 = mod(x3)
    assert got16.dtype == torch.bfloat16 and got16.shape == (1, rows, W.shape[0])
    ref = F.linear(x3.float(), W, bias)
    tol = 2 * 2.0**-8 * ref.abs() + bound(x3.float().view(rows, -1), W).view(1, rows, -1).float()
    assert bool(((got16.float() - ref).abs() <= tol).all())


@pytest.fixture(scope="module")
def portable(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The library built without -march=native: the code paths of a CPU without AVX-512, AVX2, BMI2 or F16C."""
    lib = kernel.load_library(out_dir=tmp_path_factory.mktemp("portable"), native=False)
    assert lib is not None
    return lib


@pytest.mark.parametrize("make", all_layouts())
@pytest.mark.parametrize("rows", [1, 2, 4, 5])
def test_portable_build_gives_the_same_products(portable: Any, make: Any, rows: int) -> None:
    packed, meta = make()
    W = decode_linear(packed, meta)
    plan = kernel.KernelPlan(portable, meta, packed)
    assert torch.equal(plan.dense(), W)
    x = torch.randn(rows, W.shape[1], generator=torch.Generator().manual_seed(rows))
    assert bool(((plan.gemv(x) - x @ W.T).abs().double() <= bound(x, W)).all())


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_gemv_on_threads(threads: int) -> None:
    """Rows handed out to threads in chunks: every row written once, the same result on any thread count."""
    blocks = blocks_for(200, [128, 128, 64], 6, 8, [8, 8, 8], seed=7)  # 13 chunks of 16 rows, the last short
    packed, meta = pack_linear(blocks, 6, 8, 128)
    plan = kernel.plan_for(json.loads(json.dumps(meta)), packed)
    assert plan is not None
    W = decode_linear(packed, meta)
    x = torch.randn(3, W.shape[1], generator=torch.Generator().manual_seed(0))
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        plan.small = False  # the threads even for this small weight
        got = plan.gemv(x)
    finally:
        torch.set_num_threads(old)
    assert bool(((got - x @ W.T).abs().double() <= bound(x, W)).all())


def test_tiles_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight larger than one tile is decoded tile by tile into the reused buffer: the same product."""
    packed, meta = packed_layout(LAYOUTS[0])
    W = decode_linear(packed, meta)
    monkeypatch.setattr(kernel, "TILE_FLOATS", kernel.CHUNK * W.shape[1])  # 16 rows a tile: 3 tiles
    x = torch.randn(20, W.shape[1], generator=torch.Generator().manual_seed(0))
    got = PackedLinear(meta, packed)(x)
    assert bool(((got - x @ W.T).abs().double() <= bound(x, W)).all())


def test_plan_follows_the_buffers() -> None:
    """Buffers written in place (a state dict loaded into the module): the plan's offsets are rebuilt."""
    R, widths = 37, [128, 128, 64]
    blocks = blocks_for(R, widths, 6, 8, [8, 8, 8], seed=3)
    perm = torch.randperm(R, generator=torch.Generator().manual_seed(0))  # other rows: other sign2 offsets
    moved = [
        BlockCode(b.mask[perm], b.sign[perm], b.salient, b.sign2[perm], {k: v[perm] for k, v in b.scales.items()})
        for b in blocks
    ]
    (p1, meta), (p2, _) = pack_linear(blocks, 6, 8, 128), pack_linear(moved, 6, 8, 128)
    mod = PackedLinear(meta, p1)
    x = torch.randn(2, sum(widths), generator=torch.Generator().manual_seed(0))
    mod(x)
    mod.load_state_dict(PackedLinear(meta, p2).state_dict())  # copy_ into the same storage
    W2 = decode_linear(p2, meta)
    assert bool(((mod(x) - x @ W2.T).abs().double() <= bound(x, W2)).all())


def test_a_dtype_cast_keeps_the_packed_code() -> None:
    """`model.to(torch.bfloat16)`: the stored scales are not rounded again (Ŵ unchanged); the bias is cast."""
    packed, meta = packed_layout(LAYOUTS[0])
    bias = torch.randn(int(meta["shape"][0]), generator=torch.Generator().manual_seed(1))
    mod = PackedLinear(meta, packed, bias)
    W = mod.decode()
    mod.to(torch.bfloat16)
    assert {f: t.dtype for f, t in mod.packed().items()} == {f: t.dtype for f, t in packed.items()}
    assert torch.equal(mod.decode(), W) and mod.bias is not None and mod.bias.dtype == torch.bfloat16
    x = torch.randn(3, int(meta["shape"][1]), generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert mod(x).dtype == torch.bfloat16


def test_copies_and_pickles_build_their_own_plan() -> None:
    packed, meta = packed_layout(LAYOUTS[0])
    mod = PackedLinear(meta, packed)
    x = torch.randn(2, 320, generator=torch.Generator().manual_seed(0))
    y = mod(x)
    clone = copy.deepcopy(mod)
    assert clone._plan is None and torch.equal(clone(x), y)
    buf = io.BytesIO()
    torch.save(mod, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=False)(x), y)


def test_fallback_without_a_compiler(tmp_path: Path) -> None:
    with pytest.warns(RuntimeWarning, match="could not be built.*decode their weight in torch"):
        assert kernel.load_library(cxx=str(tmp_path / "no-such-c++"), out_dir=tmp_path / "build") is None
    packed, meta = packed_layout(LAYOUTS[0])
    W = decode_linear(packed, meta)
    mod = PackedLinear(meta, packed)
    x = torch.randn(3, W.shape[1], generator=torch.Generator().manual_seed(0))
    fast = mod(x)
    with use_kernel_off(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mod.kernel_plan() is None
        slow = mod(x)
    assert torch.equal(slow, F.linear(x, W))  # the torch path: decode, then F.linear
    assert bool(((fast - slow).abs().double() <= bound(x, W)).all())


def use_kernel_off() -> Any:
    return kernel.use_kernel(False)


def test_layouts_the_kernel_does_not_read_use_the_torch_decode() -> None:
    """A scale the kernel does not know (a newer layout) or another compute dtype: no plan, torch decodes."""
    blocks = blocks_for(16, [64], 6, 8, [4])
    packed, meta = pack_linear(blocks, 6, 8, 64)
    assert kernel.supported(meta)
    assert not kernel.supported({**meta, "compute_dtype": "float64"})
    assert not kernel.supported({**meta, "scales": {**meta["scales"], "gamma": meta["scales"]["alpha"]}})
    del meta["scales"]["mu_s"], packed["scale.mu_s"]  # alpha_s without mu_s: the kernel refuses the block
    assert kernel.plan_for(meta, packed) is None
