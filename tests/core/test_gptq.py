"""The GPTQ baseline (method gptq) on hand-made problems: against round-to-nearest and a plain column-by-column
GPTQ written here, act-order, lazy batches, row chunks, bit counts, bad settings."""

import pytest
import torch

from pbs2p.core.bits import SCALE_BITS, count_int_bits
from pbs2p.core.config import CompressionConfig, ConfigError
from pbs2p.core.gptq import IntCode, column_order, fit_grid
from pbs2p.core.refit import layer_error
from pbs2p.core.solver import compress_linear


def _problem(rows: int = 48, cols: int = 256, tokens: int = 2048, seed: int = 0):
    """Correlated inputs of very different scales per column (as in LLMs), one dead input."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) * 0.2 + torch.eye(cols)
    X = (torch.randn(tokens, cols, generator=g) @ mix) * (torch.rand(cols, generator=g) * 3 + 0.05)
    X[:, 5] = 0
    W = torch.randn(rows, cols, generator=g) * 0.05
    return W, 2.0 / tokens * X.T @ X


def _cfg(**kw) -> CompressionConfig:
    return CompressionConfig.from_options(method="gptq", **{"gptq_group_size": 64, **kw})


def _rtn(W: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    """Round-to-nearest on the same per-group min-max grid, no error compensation."""
    Q = torch.empty_like(W)
    for s in range(0, W.shape[1], gs):
        w = W[:, s : s + gs]
        scale, zero = fit_grid(w, bits, False, "fp16")
        q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
        Q[:, s : s + gs] = scale[:, None] * (q - zero[:, None])
    return Q


def _plain_gptq(W: torch.Tensor, H: torch.Tensor, bits: int, gs: int, damping: float) -> torch.Tensor:
    """GPTQ as the paper writes it, no lazy batches: every column's error is pushed onto all later columns at once;
    a group's grid is fitted when it starts. Natural column order."""
    W = W.clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damping * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        if j % gs == 0:
            scale, zero = fit_grid(W[:, j : j + gs], bits, False, "fp16")
        q = torch.clamp(torch.round(W[:, j] / scale) + zero, 0, 2**bits - 1)
        Q[:, j] = scale * (q - zero)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j + 1 :] -= err[:, None] * U[j, j + 1 :][None, :]
    return Q


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_layer_objective(bits: int, act_order: bool) -> None:
    W, H = _problem()
    res = compress_linear(W, H, 8, _cfg(gptq_bits=bits, gptq_act_order=act_order))
    W0 = W.clone()
    W0[:, 5] = 0  # a dead input costs nothing either way
    rtn = layer_error(W0, _rtn(W0, bits, 64), H)
    # at 2 bits in natural order GPTQ is known to gain little (errors pile onto the late, large columns)
    assert layer_error(W, res.weight, H) < (1.0 if bits == 2 and not act_order else 0.8) * rtn
    total = float(torch.einsum("rc,cd,rd->", W, H, W))
    assert res.rel_error == pytest.approx(layer_error(W, res.weight, H) / total, rel=1e-5)
    code = res.intcode
    assert code is not None and code.bits == bits and res.blocks == []
    assert int(code.codes.max()) <= 2**bits - 1 and torch.equal(code.dense(), res.weight)
    assert (code.g_idx is not None) == act_order


def test_error_falls_with_bits_and_four_bits_is_small() -> None:
    W, H = _problem()
    errs = [compress_linear(W, H, 8, _cfg(gptq_bits=b)).rel_error for b in (2, 3, 4)]
    assert errs[0] > errs[1] > errs[2]
    # a 4-bit grid of 15 steps over a group's range: relative output error well under 1 %
    assert errs[2] < 0.01


def test_lazy_batches_match_plain_gptq() -> None:
    """The lazy batch updates (also with groups that straddle two batches) compute plain GPTQ's result."""
    W, H = _problem()
    want = _plain_gptq(W, H, 3, 64, 0.01)
    for block_size in (256, 128, 48, 32):
        got = compress_linear(W, H, 8, _cfg(gptq_bits=3, gptq_act_order=False, block_size=block_size)).weight
        same = (got == want).float().mean()
        assert same > 0.995, block_size  # only float rounding of the update order may move a code by one step
        assert layer_error(W, got, H) == pytest.approx(layer_error(W, want, H), rel=1e-3)


def test_act_order_visits_columns_by_descending_hessian_diagonal() -> None:
    W, H = _problem()
    res = compress_linear(W, H, 8, _cfg(gptq_bits=3, gptq_act_order=True))
    code = res.intcode
    assert code is not None and code.g_idx is not None
    order = torch.argsort(torch.diag(H), descending=True, stable=True)
    assert torch.equal(order, column_order(H, True))
    rank = torch.argsort(order)  # the position of every column in the visiting order
    assert torch.equal(code.g_idx, rank // 64)
    assert (torch.bincount(code.g_idx) == 64).all()
    # the first group holds the columns of largest diag(H)
    assert set(torch.nonzero(code.g_idx == 0).flatten().tolist()) == set(order[:64].tolist())
    plain = compress_linear(W, H, 8, _cfg(gptq_bits=3, gptq_act_order=False))
    # columns of very different input scales: quantizing the important ones first, while the unimportant ones can
    # still absorb their errors, is what act-order is for
    assert res.rel_error < 0.8 * plain.rel_error


def test_row_chunks_give_the_same_result() -> None:
    W, H = _problem(rows=40)
    whole = compress_linear(W, H, 8, _cfg(gptq_bits=3, row_chunk=256))
    parts = compress_linear(W, H, 8, _cfg(gptq_bits=3, row_chunk=16))
    assert parts.intcode is not None and parts.intcode.codes.shape == (40, 256)
    assert (whole.weight == parts.weight).float().mean() > 0.999
    assert parts.rel_error == pytest.approx(whole.rel_error, rel=1e-4)


def test_deterministic() -> None:
    W, H = _problem()
    a, b = (compress_linear(W, H, 8, _cfg(gptq_bits=2)) for _ in range(2))
    assert a.intcode is not None and b.intcode is not None
    assert torch.equal(a.weight, b.weight) and torch.equal(a.intcode.codes, b.intcode.codes)


def test_symmetric_grid_and_dead_inputs() -> None:
    W, H = _problem()
    res = compress_linear(W, H, 8, _cfg(gptq_bits=4, gptq_sym=True))
    code = res.intcode
    assert code is not None and (code.zeros == 8).all()
    assert (res.weight[:, 5] == 0).all()  # a dead input decodes to exactly 0
    asym = compress_linear(W, H, 8, _cfg(gptq_bits=4)).rel_error
    assert res.rel_error < 2 * asym


def test_bit_count() -> None:
    W, H = _problem()
    for act_order, sym in ((False, False), (True, False), (True, True)):
        code = compress_linear(W, H, 8, _cfg(gptq_bits=3, gptq_act_order=act_order, gptq_sym=sym)).intcode
        assert isinstance(code, IntCode)
        c = count_int_bits(code)
        R, C, G = 48, 256, 4
        assert c.weights == R * C and c.paper_bits == 3
        assert c.scale_bits == R * G * (SCALE_BITS + (0 if sym else 3))
        assert c.index_bits == (C * 2 if act_order else 0)
        assert c.true_bits == pytest.approx(3 + (SCALE_BITS + (0 if sym else 3)) / 64 + c.index_bits / (R * C))


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(gptq_bits=5), "gptq_bits"),
        (dict(gptq_bits=1), "gptq_bits"),
        (dict(gptq_group_size=4), "gptq_group_size"),
        (dict(gptq_act_order="yes"), "gptq_act_order"),
    ],
)
def test_bad_settings_name_their_field(options: dict, field: str) -> None:
    with pytest.raises(ConfigError) as exc:
        CompressionConfig.from_options(method="gptq", **options)
    assert [e["field"] for e in exc.value.errors] == [field]


@pytest.mark.parametrize("act_order", [False, True])
def test_a_group_size_that_does_not_divide_the_inputs_leaves_a_shorter_last_group(act_order: bool) -> None:
    """576 = 4 x 128 + 64 (SmolLM2-135M): as in the reference, the last group of a row is shorter."""
    W, H = _problem(cols=200)
    res = compress_linear(W, H, 8, _cfg(gptq_bits=3, gptq_act_order=act_order, block_size=48))
    code = res.intcode
    assert code is not None and code.groups == 4 and torch.equal(code.dense(), res.weight)
    assert torch.bincount(code.group_of()).tolist() == [64, 64, 64, 8]
    if not act_order:
        want = _plain_gptq(W, H, 3, 64, 0.01)
        assert (res.weight == want).float().mean() > 0.995
    c = count_int_bits(code)
    assert c.scale_bits == 48 * 4 * (SCALE_BITS + 3)
