"""The one compression config that travels everywhere: CLI / API -> job store -> Ray (as a dict) -> core.

`CompressionConfig` is the single source of truth for a job's options: each field's type, bounds, default and
help text live here, and the CLI options (`service/cli/options.py`), the HTTP request schema (OpenAPI) and the
dashboard form are generated from it. The method's main knobs are top-level fields; the ablations and
diagnostics of ALGORITHM.md sit in the nested `ablations` section. Every validation error carries the field's
path (`ablations.spbo_mode`), from pydantic's validators or from the cross-field checks below.

Versioned: version 2 nests the ablations; a version-1 dict (flat) is migrated on read.
`CompressionConfig.from_dict(cfg.to_dict()) == cfg`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, GetJsonSchemaHandler, model_validator
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError, core_schema

from .errors import Pbs2pError

CONFIG_VERSION = 2
# block tuning (workers/blocktune.py): the default Adam steps per block of method pbs2p (README, quality tables)
TUNE_STEPS = 24

Method = Literal["fp", "arb", "prune-binarize", "pbs2p", "gptq"]
METHODS: tuple[str, ...] = get_args(Method)
Allocation = Literal["uniform", "cfs"]
CfsScore = Literal["cosine", "error"]
SpboMode = Literal["aware", "fixed"]
MaskScore = Literal["obs", "wanda"]
ArbVariant = Literal["arb", "arb-x", "arb-obs", "arb-rc"]
Propagation = Literal["sequential", "independent"]
ScaleDtype = Literal["fp16", "bf16"]
ScaleLayout = Literal["full", "shared", "lean"]
SalientAllocation = Literal["block", "linear"]


class ConfigError(Pbs2pError):
    """A config that does not validate. `errors` lists each problem as {"field": dotted path, "message"}."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field']}: {e['message']}" for e in errors))


def field_errors(exc: PydanticValidationError, skip: int = 0) -> list[dict[str, str]]:
    """pydantic's errors as {"field": dotted path (minus `skip` leading parts), "message"}."""
    return [{"field": ".".join(str(p) for p in e["loc"][skip:]), "message": error_message(e)} for e in exc.errors()]


def error_message(error: Any) -> str:
    """pydantic's message for one error, with what to do where it does not say."""
    if error["type"] == "extra_forbidden":
        return "unknown field; remove it or check its spelling (the fields are listed at /docs)"
    return str(error["msg"])


@dataclass(frozen=True)
class NMPattern:
    """N:M semi-structured sparsity: N weights KEPT in every group of M consecutive input columns.

    In a config it is written as the string "N:M" (e.g. "6:8")."""

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

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        def validate(value: Any) -> NMPattern:
            if isinstance(value, NMPattern):
                return value
            if not isinstance(value, str):
                raise PydanticCustomError("nm_pattern", "write the pattern as a string N:M, e.g. 6:8")
            try:
                return cls.parse(value)
            except Pbs2pError as exc:
                raise PydanticCustomError("nm_pattern", str(exc)) from None

        return core_schema.no_info_plain_validator_function(
            validate, serialization=core_schema.plain_serializer_function_ser_schema(str)
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> Any:
        return {"type": "string", "pattern": r"^[0-9]{1,2}:[0-9]{1,2}$", "examples": ["6:8"]}


@dataclass(frozen=True)
class CalibSource:
    """One calibration text source ('wiki' or a .txt / .jsonl file) and its share of the calibration windows."""

    source: str
    weight: float


CALIB_EXAMPLE = "wiki:0.7,/data/chat.jsonl:0.3"
# a source's weight is a trailing ':NUMBER' (a path or 'wiki' before it); 's3://...' or 'C:x' end otherwise
_WEIGHTED_SOURCE = re.compile(r"^(?P<source>.*?):(?P<weight>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)$")
_WEIGHT_SUM_TOLERANCE = 1e-6


def parse_calib(text: str) -> tuple[CalibSource, ...]:
    """`calib` as its sources: one source (weight 1), or a weighted mix `SOURCE:WEIGHT,SOURCE:WEIGHT,...` whose
    weights are positive and sum to 1 (so a path in `calib` cannot contain a comma). Pbs2pError saying what to
    write otherwise."""
    parts = [part.strip() for part in text.split(",")]
    if any(not part for part in parts):
        raise Pbs2pError(f"{text!r} has an empty source (a stray comma); write SOURCE or a mix like {CALIB_EXAMPLE}")
    matches = [_WEIGHTED_SOURCE.match(part) for part in parts]
    if len(parts) == 1 and matches[0] is None:
        return (CalibSource(parts[0], 1.0),)
    sources: list[CalibSource] = []
    for part, match in zip(parts, matches, strict=True):
        if match is None:
            raise Pbs2pError(
                f"source {part!r} has no weight; in a mix every source needs one, e.g. {CALIB_EXAMPLE} "
                f"(a path in calib cannot contain a comma)"
            )
        source, weight = match["source"].strip(), float(match["weight"])
        if not source:
            raise Pbs2pError(f"weight {match['weight']} has no source before it; write SOURCE:WEIGHT, e.g. wiki:0.7")
        if weight <= 0:
            raise Pbs2pError(
                f"source {source!r} has weight {match['weight']}; weights must be positive (leave the source out)"
            )
        if any(s.source == source for s in sources):
            raise Pbs2pError(f"source {source!r} is named twice; give each source once, with its whole weight")
        sources.append(CalibSource(source, weight))
    total = math.fsum(s.weight for s in sources)
    if abs(total - 1) > _WEIGHT_SUM_TOLERANCE:
        raise Pbs2pError(f"the weights sum to {total:g}, not 1; make them add up to 1, e.g. {CALIB_EXAMPLE}")
    return tuple(sources)


def window_counts(sources: tuple[CalibSource, ...], windows: int) -> tuple[int, ...]:
    """How many of `windows` calibration windows each source gives: the largest-remainder rounding of
    weight x windows (ties to the source named first), so the counts sum to `windows`."""
    shares = [s.weight * windows for s in sources]
    counts = [math.floor(x) for x in shares]
    by_remainder = sorted(range(len(sources)), key=lambda i: (-(shares[i] - counts[i]), i))
    for i in by_remainder[: windows - sum(counts)]:
        counts[i] += 1
    return tuple(counts)


# strict: a JSON body's `0` is no boolean and "3" no integer (the command line, whose values are strings, asks
# for lax parsing explicitly: `from_options(..., strict=False)`); lists still read as tuples
_FROZEN = ConfigDict(frozen=True, extra="forbid", strict=True)
Count = Annotated[int, Field(ge=0, le=4096)]


class Ablations(BaseModel):
    """Variants of the method kept for measurement (README, Results): each default is the measured best."""

    model_config = _FROZEN

    spbo_mode: SpboMode = Field(
        "aware",
        description="SPBO steps: 'aware' re-ranks each step by the binarization-aware cost; 'fixed' splits a "
        "fixed OBS prune set into the steps",
    )
    cfs_score: CfsScore = Field(
        "cosine",
        description="CFS block importance: 1/cos(h_in, h_out) (the paper's) or each block's measured output error "
        "at every candidate N",
    )
    cfs_spread: int = Field(1, ge=0, le=16, description="CFS: N per block within N_t +/- this")
    cfs_samples: int = Field(16, ge=1, le=4096, description="calibration windows of the CFS coarse stage's FP pass")
    mask_score: MaskScore = Field("obs", description="mask score of prune-binarize and fixed SPBO: OBS or Wanda")
    arb_iters: int = Field(15, ge=1, le=1000, description="ARB alternations per fit")
    arb_variant: ArbVariant = Field(
        "arb",
        description="'arb-x': alpha, mu against the calibration-weighted error; 'arb-obs': against the block's "
        "OBS loss; 'arb-rc': row x column scales, no mu (no salient residual)",
    )
    salient_search: tuple[Count, ...] = Field(
        (),
        max_length=16,
        strict=False,
        description="salient column counts searched per block by block error; empty: fixed",
    )
    salient_allocation: SalientAllocation | None = Field(
        None,
        description="'block': salient_columns in every column block; 'linear': the same budget over the linear's "
        "columns of highest OBS score (default linear, block with salient_search)",
    )
    column_feedback: bool = Field(False, description="GPTQ per-column error feedback inside a column block")
    scale_refit: bool = Field(
        True, description="solve every scale of a linear jointly against ||(W - W')X||^2 once masks and signs are set"
    )
    spbo_report: bool = Field(
        False, description="also report each linear's error before SPBO (one extra fit per block; weights unchanged)"
    )
    scale_dtype: ScaleDtype = Field("fp16", description="storage precision of the scales")
    true_sequential: bool = Field(
        False, description="within a block, calibrate each group of linears on the compressed earlier ones"
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("salient_allocation") is None:
            data = {**data, "salient_allocation": "block" if data.get("salient_search") else "linear"}
        return data


ABLATION_FIELDS: tuple[str, ...] = tuple(Ablations.model_fields)


class CompressionConfig(BaseModel):
    """What to compute. Field names are the CLI options (in kebab case) and the API's `config` body."""

    model_config = _FROZEN

    method: Method = Field(
        "pbs2p", description="pbs2p (CFS + SPBO), prune-binarize, arb (dense 1-bit), fp, or gptq (the baseline)"
    )
    # method gptq: integer codes per weight, scales (and zero points) per row per group of input columns
    gptq_bits: int = Field(4, ge=2, le=4, description="gptq: bits per weight code (2, 3 or 4)")
    gptq_group_size: int = Field(
        128,
        ge=8,
        le=8192,
        description="gptq: input columns per scale and zero point (the last group of a row may be shorter)",
    )
    gptq_act_order: bool = Field(
        True, description="gptq: quantize columns by descending Hessian diagonal (groups in that order, g_idx stored)"
    )
    gptq_sym: bool = Field(False, description="gptq: symmetric min-max grid (no zero points stored)")
    pattern: NMPattern = Field("6:8", validate_default=True, description="N:M, N weights kept in every group of M")
    spbo_steps: int | None = Field(None, ge=1, le=15, description="SPBO steps tau (default M - N)")
    allocation: Allocation = Field(
        "uniform",
        description="N per transformer block: uniform (N everywhere) or cfs (the paper's coarse stage: N_l in "
        "N +/- cfs_spread, the average kept exactly)",
    )
    salient_columns: int = Field(
        16, ge=0, le=4096, description="salient columns per column block, on average (second-order residual)"
    )
    block_size: int = Field(128, ge=8, le=8192, description="GPTQ column block (scales per row per block)")
    damping: float = Field(0.01, gt=0, lt=10, description="relative Hessian damping")
    scale_layout: ScaleLayout = Field(
        "full",
        description="scales per row per block: full (alpha, mu and the salient columns' own), shared (one alpha, "
        "mu), lean (shared with no residual mu)",
    )
    skip_modules: tuple[Annotated[str, Field(min_length=1, max_length=256)], ...] = Field(
        (), max_length=64, strict=False, description="glob patterns of linear names left uncompressed"
    )
    propagation: Propagation = Field(
        "sequential",
        description="sequential: each block calibrated on the compressed earlier blocks' outputs; independent: "
        "on the FP model's (faster on many workers, worse)",
    )
    calib: str = Field(
        "wiki",
        min_length=1,
        max_length=1024,
        description='calibration text: \'wiki\', a .txt or .jsonl file ({"text"} or chat {"messages"} lines, '
        f"rendered with the model's chat template), or a weighted mix, e.g. {CALIB_EXAMPLE}",
    )
    calib_samples: int = Field(64, ge=1, le=4096, description="calibration windows")
    seqlen: int = Field(512, ge=8, le=32768, description="tokens per calibration window")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed of the calibration windows")
    batch_size: int = Field(
        8,
        ge=1,
        le=1024,
        description="calibration windows per forward pass, and per shard: a job's workers split the shards",
    )
    row_chunk: int = Field(
        256,
        ge=8,
        le=1 << 20,
        description="rows of a linear solved together (a job's workers split the chunks; the bits depend on it, "
        "not on the number of workers)",
    )
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:[0-9]{1,2})?)$", description="cpu, cuda or cuda:N")
    block_tune_steps: int | None = Field(
        None,
        ge=0,
        le=100000,
        description=f"Adam steps per block tuning its scales to the FP block's outputs (0: off; default "
        f"{TUNE_STEPS} for pbs2p, 0 for the other methods)",
    )
    block_tune_lr: float = Field(1e-2, gt=0, lt=1, description="learning rate of block_tune_steps (scales / mean)")
    ablations: Ablations = Field(default_factory=Ablations, description="variants kept for measurement")
    version: Literal[2] = Field(2, description="config schema version")

    @model_validator(mode="before")
    @classmethod
    def _migrate(cls, data: Any) -> Any:
        """A version-1 config (flat) is read as version 2; an ablation given at the top level is pointed at its
        new place."""
        if not isinstance(data, Mapping):
            return data
        moved = [k for k in data if k in ABLATION_FIELDS]
        if data.get("version") == 1:
            d = {k: v for k, v in data.items() if k not in ABLATION_FIELDS}
            d["ablations"] = {**dict(data.get("ablations") or {}), **{k: data[k] for k in moved}}
            d["version"] = CONFIG_VERSION
            return d
        if moved:
            _raise(
                [
                    ((k,), f"'{k}' is an ablation since config version 2: give it as ablations.{k}", data[k])
                    for k in moved
                ]
            )
        return data

    @model_validator(mode="after")
    def _check(self) -> CompressionConfig:
        """Checks across fields, each reported at the field to change."""
        p, a = self.pattern, self.ablations
        bad: list[tuple[tuple[str, ...], str, Any]] = []
        prune = p.m - p.n
        if self.spbo_steps is not None and self.spbo_steps > prune:
            bad.append((("spbo_steps",), f"must be between 1 and M - N = {prune} for pattern {p}", self.spbo_steps))
        if self.block_size % p.m:
            bad.append((("block_size",), f"must be a multiple of M={p.m}, e.g. 128", self.block_size))
        half = self.block_size // 2
        if self.salient_columns > half:
            bad.append((("salient_columns",), f"must be at most block_size/2 = {half}", self.salient_columns))
        if any(k > half for k in a.salient_search):
            bad.append((("ablations", "salient_search"), f"counts must be at most block_size/2 = {half}", None))
        if a.salient_search and a.salient_allocation == "linear":
            bad.append(
                (("ablations", "salient_allocation"), "salient_search picks a count per block; use 'block'", "linear")
            )
        bad.extend(_calib_problems(self.calib, self.calib_samples))
        if a.arb_variant == "arb-rc" and (self.salient_columns or a.salient_search):
            bad.append((("ablations", "arb_variant"), "'arb-rc' has no salient residual; set salient_columns=0", None))
        if bad:
            _raise(bad)
        return self

    # -- derived ---------------------------------------------------------------------------------------------
    @property
    def tau(self) -> int:
        """SPBO steps actually used (1 for prune-binarize: prune once, then binarize)."""
        if self.method == "prune-binarize":
            return 1
        return self.spbo_steps or (self.pattern.m - self.pattern.n)

    @property
    def tune_steps(self) -> int:
        """Block tuning steps actually used (block_tune_steps, or the method's default)."""
        if self.block_tune_steps is not None:
            return self.block_tune_steps
        return TUNE_STEPS if self.method == "pbs2p" else 0

    @property
    def calib_sources(self) -> tuple[CalibSource, ...]:
        """The calibration sources with their weights (one source: weight 1)."""
        return parse_calib(self.calib)

    @property
    def prunes(self) -> bool:
        return self.method in ("prune-binarize", "pbs2p")

    # -- building and serialising ------------------------------------------------------------------------------
    @classmethod
    def from_options(
        cls, options: Mapping[str, Any] | None = None, *, strict: bool = True, **more: Any
    ) -> CompressionConfig:
        """A config from flat option names (as on the command line: ablations by their own name), validated;
        ConfigError with the field paths otherwise. `strict=False` parses strings ("17" for an integer)."""
        flat = {**(options or {}), **more}
        top = {k: v for k, v in flat.items() if k not in ABLATION_FIELDS}
        abl = {k: v for k, v in flat.items() if k in ABLATION_FIELDS}
        if abl:
            top["ablations"] = {**dict(top.get("ablations") or {}), **abl}
        return cls.from_dict(top, strict=strict)

    def replace(self, **changes: Any) -> CompressionConfig:
        """A copy with `changes` (flat option names, as `from_options`), validated again."""
        d = self.to_dict()
        flat = {k: v for k, v in d.items() if k != "ablations"} | d["ablations"]
        return self.from_options({**flat, **changes})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the pattern as "N:M", tuples as lists, the ablations nested."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, strict: bool = True) -> CompressionConfig:
        try:
            # None: the model's own strictness (lists still read as tuples); False: lax everywhere
            return cls.model_validate(dict(data), strict=None if strict else False)
        except PydanticValidationError as exc:
            raise ConfigError(field_errors(exc)) from None


def method_label(cfg: Mapping[str, Any]) -> str:
    """A config dict's method and main setting: 'pbs2p pattern 6:8', 'gptq 3-bit g128 act-order'."""
    if cfg.get("method") == "gptq":
        order = " act-order" if cfg.get("gptq_act_order") else ""
        return f"gptq {cfg.get('gptq_bits')}-bit g{cfg.get('gptq_group_size')}{order}"
    return f"{cfg.get('method')} pattern {cfg.get('pattern')}"


def _calib_problems(calib: str, windows: int) -> list[tuple[tuple[str, ...], str, Any]]:
    try:
        sources = parse_calib(calib)
    except Pbs2pError as exc:
        return [(("calib",), str(exc), calib)]
    empty = [s for s, k in zip(sources, window_counts(sources, windows), strict=True) if k == 0]
    return [
        (
            ("calib",),
            f"source {s.source!r} at weight {s.weight:g} gets none of the calib_samples={windows} windows; "
            f"raise its weight or calib_samples",
            calib,
        )
        for s in empty
    ]


def _raise(problems: list[tuple[tuple[str, ...], str, Any]]) -> None:
    """Raise one pydantic ValidationError with an entry per (path, message, input): the path reaches the caller
    prefixed by wherever the config sits (e.g. body.config.ablations.arb_variant over HTTP)."""
    details = [
        InitErrorDetails(type=PydanticCustomError("config", msg), loc=loc, input=value) for loc, msg, value in problems
    ]
    raise PydanticValidationError.from_exception_data("CompressionConfig", details)
