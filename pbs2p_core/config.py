"""The one compression config that travels everywhere: CLI / API -> job store -> Ray (as a dict) -> core.

Every ablation of ALGORITHM.md is a field here. `CompressionConfig.from_dict(cfg.to_dict()) == cfg`.
Validation happens once, in `__post_init__`, and every message says what to change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import Pbs2pError

CONFIG_VERSION = 1

Method = Literal["fp", "arb", "prune-binarize", "pbs2p"]
METHODS: tuple[str, ...] = ("fp", "arb", "prune-binarize", "pbs2p")
Allocation = Literal["cfs", "uniform"]
CfsScore = Literal["cosine", "error"]
SpboMode = Literal["aware", "fixed"]
MaskScore = Literal["obs", "wanda"]
# arb-x: α, μ against the calibration-weighted error r H_bb rᵀ; arb-obs: against the block's OBS loss ‖Err‖²
# (the conditional Hessian (U_bbᵀ U_bb)⁻¹: what later columns cannot compensate); arb-rc: α_row ⊙ α_col ⊙ B
ArbVariant = Literal["arb", "arb-x", "arb-obs", "arb-rc"]
Propagation = Literal["sequential", "independent"]
ScaleDtype = Literal["fp16", "bf16"]
# scales per row per column block: "full" = α, μ + salient α_s, μ_s, α_r, μ_r (6); "shared" = α, μ shared by
# all columns + the salient residual's α_r, μ_r (4); "lean" = α, μ + α_r (3)
ScaleLayout = Literal["full", "shared", "lean"]
SalientAllocation = Literal["block", "linear"]


@dataclass(frozen=True)
class NMPattern:
    """N:M semi-structured sparsity: N weights KEPT in every group of M consecutive input columns."""

    n: int
    m: int = 8

    def __post_init__(self) -> None:
        if self.m < 2 or self.m > 16:
            raise Pbs2pError(f"pattern group size M={self.m} is not supported; use M between 2 and 16, e.g. 6:8")
        if self.n >= self.m:
            raise Pbs2pError(
                f"pattern {self.n}:{self.m} keeps as many weights as the group has or more; "
                f"use N < M, e.g. 6:8 (or method 'arb' for dense binarization)"
            )
        if self.n < 1:
            raise Pbs2pError(f"pattern {self.n}:{self.m} keeps no weight; use 1 <= N < M, e.g. 6:8")

    @classmethod
    def parse(cls, text: str) -> NMPattern:
        try:
            n_s, m_s = text.split(":")
            n, m = int(n_s), int(m_s)
        except ValueError:
            raise Pbs2pError(f"pattern {text!r} is not N:M; write it as two integers, e.g. 6:8") from None
        return cls(n, m)

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def mask_bits_per_group(self) -> int:
        """Bits to store one group's mask: a rank code, or a bitmap when that is smaller."""
        return min(math.ceil(math.log2(math.comb(self.m, self.n))), self.m)


@dataclass(frozen=True)
class CompressionConfig:
    """What to compute. Field names match the CLI options (snake_case) and the API's `config` body."""

    method: Method = "pbs2p"
    pattern: NMPattern = field(default_factory=lambda: NMPattern(6, 8))
    # SPBO: tau steps (None -> M - N, one pruned weight per group per step); "aware" re-ranks each
    # step by the binarization-aware cost, "fixed" is the ablation (OBS prune set split into steps).
    spbo_steps: int | None = None
    spbo_mode: SpboMode = "aware"
    # N per transformer block: "uniform" (N_t everywhere, the default: CFS measured no better on the real model
    # over three seeds, README) or "cfs" (the paper's coarse stage: N_l in N_t ± cfs_spread, average kept exactly)
    allocation: Allocation = "uniform"
    # block importance: "cosine" (1 / cos(h_in, h_out), the paper's) or "error" (each block's measured output
    # error under a quick one-shot compression at every candidate N; N_l chosen to minimise their sum)
    cfs_score: CfsScore = "cosine"
    cfs_spread: int = 1  # N_l in [N_t - spread, N_t + spread]
    cfs_samples: int = 16  # calibration windows the coarse stage's FP pass uses
    mask_score: MaskScore = "obs"  # prune-binarize mask (and the fixed-split ablation)
    block_size: int = 128  # GPTQ column block
    damping: float = 0.01
    arb_iters: int = 15
    arb_variant: ArbVariant = "arb"
    # per column block (on average), second-order residual; 0 turns it off. 16 measured 441 perplexity against
    # 703 for 8 over three seeds on the real model, for 0.08 bit more (README, Results)
    salient_columns: int = 16
    salient_search: tuple[int, ...] = ()  # candidates searched per block by block error; () = fixed
    # "block": salient_columns in every column block; "linear": the same budget spread over the linear's
    # columns of highest OBS score, wherever they are
    salient_allocation: SalientAllocation | None = None  # None -> "linear" ("block" with salient_search)
    column_feedback: bool = False  # GPTQ per-column error feedback inside a column block
    # once masks and signs are chosen, solve every scale of the linear jointly against ||(W - W')X||^2
    # (pbs2p_core/refit.py): no extra bits; False is the ablation (each block's ARB scales as fitted)
    scale_refit: bool = True
    # report, per linear, the error one-shot prune-then-binarize gets on the same weights ("before SPBO");
    # costs one extra fit per column block, changes nothing in the compressed weights
    spbo_report: bool = False
    scale_dtype: ScaleDtype = "fp16"  # storage precision of alpha/mu (the model uses the rounded values)
    scale_layout: ScaleLayout = "full"
    skip_modules: tuple[str, ...] = ()  # fnmatch patterns of linear names left uncompressed
    propagation: Propagation = "sequential"
    true_sequential: bool = False  # within a block, calibrate each group of linears on the compressed earlier ones
    calib: str = "wiki"
    calib_samples: int = 64
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8  # calibration windows per forward pass
    device: str = "cpu"
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise Pbs2pError(msg)

        if self.version != CONFIG_VERSION:
            fail(f"config version {self.version} is not supported by this pbs2p; use version {CONFIG_VERSION}")
        if self.method not in METHODS:
            fail(f"unknown method {self.method!r}; use one of {', '.join(METHODS)}")
        if not isinstance(self.pattern, NMPattern):
            object.__setattr__(self, "pattern", NMPattern.parse(str(self.pattern)))
        prune = self.pattern.m - self.pattern.n
        if self.spbo_steps is not None and not 1 <= self.spbo_steps <= prune:
            fail(f"spbo_steps={self.spbo_steps} must be between 1 and M - N = {prune} for pattern {self.pattern}")
        if self.salient_allocation is None:
            object.__setattr__(self, "salient_allocation", "block" if self.salient_search else "linear")
        for name, allowed in (
            ("allocation", ("cfs", "uniform")),
            ("cfs_score", ("cosine", "error")),
            ("spbo_mode", ("aware", "fixed")),
            ("mask_score", ("obs", "wanda")),
            ("arb_variant", ("arb", "arb-x", "arb-obs", "arb-rc")),
            ("propagation", ("sequential", "independent")),
            ("scale_dtype", ("fp16", "bf16")),
            ("scale_layout", ("full", "shared", "lean")),
            ("salient_allocation", ("block", "linear")),
        ):
            if getattr(self, name) not in allowed:
                fail(f"{name}={getattr(self, name)!r} is not known; use one of {', '.join(allowed)}")
        if self.block_size < self.pattern.m or self.block_size % self.pattern.m:
            fail(f"block_size={self.block_size} must be a positive multiple of M={self.pattern.m}, e.g. 128")
        if not 0 < self.damping < 10:
            fail(f"damping={self.damping} must be in (0, 10); 0.01 is the usual value")
        if not 1 <= self.arb_iters <= 1000:
            fail(f"arb_iters={self.arb_iters} must be between 1 and 1000; 15 is the default")
        object.__setattr__(self, "salient_search", tuple(int(c) for c in self.salient_search))
        object.__setattr__(self, "skip_modules", tuple(str(p) for p in self.skip_modules))
        for k in (self.salient_columns, *self.salient_search):
            if not 0 <= k <= self.block_size // 2:
                fail(f"salient column count {k} must be between 0 and block_size/2 = {self.block_size // 2}")
        if self.salient_search and self.salient_allocation == "linear":
            fail("salient_search picks a count per block; use it with salient_allocation='block'")
        if self.arb_variant == "arb-rc" and (self.salient_columns or self.salient_search):
            fail("arb_variant 'arb-rc' has no salient residual; set salient_columns=0")
        if self.cfs_spread < 0:
            fail(f"cfs_spread={self.cfs_spread} must be >= 0")
        if self.calib_samples < 1 or self.cfs_samples < 1 or self.seqlen < 8 or self.batch_size < 1:
            fail("calib_samples, cfs_samples and batch_size must be >= 1 and seqlen >= 8")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            fail(f"device {self.device!r} is not known; use cpu or cuda (or cuda:N)")

    @property
    def tau(self) -> int:
        """SPBO steps actually used (1 for prune-binarize: prune once, then binarize)."""
        if self.method == "prune-binarize":
            return 1
        return self.spbo_steps or (self.pattern.m - self.pattern.n)

    @property
    def prunes(self) -> bool:
        return self.method in ("prune-binarize", "pbs2p")

    def replace(self, **changes: Any) -> CompressionConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["pattern"] = str(self.pattern)
        d["salient_search"] = list(self.salient_search)
        d["skip_modules"] = list(self.skip_modules)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompressionConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise Pbs2pError(f"unknown config field(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        d = dict(data)
        if "pattern" in d and not isinstance(d["pattern"], NMPattern):
            d["pattern"] = NMPattern.parse(str(d["pattern"]))
        for key in ("salient_search", "skip_modules"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)
