"""The compressed artifact, format v1 (docs/artifact-format.md): packing, writing, verifying, loading.

Per compressed linear the artifact stores what the method needs and nothing more: the N:M mask as a rank
code per group of M (or a bitmap when the pattern is irregular), the sign bits of kept weights only, the
residual sign plane of the salient columns (kept weights only), the salient column indices, and every
scale of the block codes in the configured storage dtype. Everything is bit-exact: decoding gives the same
Ŵ as `BlockCode.dense()` of the in-memory codes. Bit packing is vectorised torch (no loop over rows/groups).

The directory: the source model's config/tokenizer files, safetensors shards `pbs2p-<part>-<k>.safetensors`
(one part per decoder block plus `rest`, split at a size limit), and `manifest.json`, written last, with
the format version, the compression config, per file size and sha256, per tensor dtype and shape, per
compressed linear its layout and bit counts, and the compression report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .binarize import BlockCode
from .config import CompressionConfig
from .errors import Pbs2pError
from .solver import LinearResult

FORMAT_NAME = "pbs2p-artifact"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
TIMINGS_FILE = "timings.json"  # wall-clock timings of the run: not hashed, not part of the verified content
DEFAULT_SHARD_BYTES = 2 * 1024**3
SEP = ":"  # packed tensor name = f"{weight name}{SEP}{field}", e.g. model.layers.0.mlp.up_proj.weight:sign

# storage dtype of the scales, by config name (`CompressionConfig.scale_dtype`)
SCALE_DTYPES: dict[str, torch.dtype] = {
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp8": torch.float8_e4m3fn,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
COMPUTE_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# safetensors dtype names (the header's "dtype" field) and item sizes
ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
ST_TORCH = {v: k for k, v in ST_DTYPES.items()}
ST_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".pkl", ".ckpt", ".gguf")


class ArtifactError(Pbs2pError):
    """A bad or incomplete artifact (corrupted, truncated, missing file, newer format, wrong shape).

    The message names the file and says what to do."""


# ------------------------------------------------------------------------------------------ bit packing


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """Bool tensor (any shape, flattened row-major) -> uint8, 8 bits a byte, first bit in the LSB.

    Bit i of the stream is bit (i % 8) of byte i // 8; the last byte is padded with zeros."""
    flat = bits.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    shifts = torch.arange(8, device=flat.device, dtype=torch.uint8)
    return (flat.view(-1, 8) << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(data: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of `pack_bits`: the first `count` bits of the uint8 stream, as a flat bool tensor."""
    if data.dtype != torch.uint8 or data.dim() != 1 or data.numel() != (count + 7) // 8:
        raise ArtifactError(
            f"packed bit stream has {data.numel()} {data.dtype} values ({tuple(data.shape)}); "
            f"{(count + 7) // 8} uint8 bytes expected for {count} bits"
        )
    shifts = torch.arange(8, device=data.device, dtype=torch.uint8)
    return ((data[:, None] >> shifts) & 1).view(-1)[:count].bool()


def pack_codes(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative integers, `width` bits each (LSB first), concatenated into one packed bit stream."""
    shifts = torch.arange(width, device=codes.device, dtype=torch.int32)
    return pack_bits((codes.to(torch.int32)[:, None] >> shifts) & 1)


def unpack_codes(data: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """Inverse of `pack_codes`: `count` integers of `width` bits, as a long tensor."""
    bits = unpack_bits(data, count * width).view(count, width)
    if width <= 24:  # exact in float32, and a matrix-vector product is the fastest reduction on CPU and GPU
        weights = torch.pow(2.0, torch.arange(width, device=data.device, dtype=torch.float32))
        return (bits.to(torch.float32) @ weights).long()
    return (bits.long() << torch.arange(width, device=data.device)).sum(1)


def rank_bits(m: int, n: int) -> int:
    """⌈log₂ C(m, n)⌉: bits of one group's rank code (at least 1)."""
    return max(1, (math.comb(m, n) - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _luts(m: int, n: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """rank_of (2^m,), bitmap_of (C,), bits_of (C, m) bool, pos_of (C, n): kept positions of each rank."""
    v = torch.arange(2**m)
    bits = ((v[:, None] >> torch.arange(m)) & 1).bool()
    bitmap_of = v[bits.sum(1) == n]
    rank_of = torch.full((2**m,), -1, dtype=torch.long)
    rank_of[bitmap_of] = torch.arange(bitmap_of.numel())
    bits_of = bits[bitmap_of]
    pos_of = bits_of.nonzero()[:, 1].view(-1, n)  # ascending column within the group
    return tuple(t.to(device) for t in (rank_of, bitmap_of, bits_of, pos_of))  # type: ignore[return-value]


def rank_tables(m: int, n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(rank_of, bitmap_of): the C(m, n) m-bit values with n ones, in ascending order, are ranked 0, 1, ...

    rank_of (2^m,) long: bitmap -> rank, -1 where the popcount is not n. bitmap_of (C(m, n),) long.
    A group's bitmap has bit j set when its column j (0 = leftmost) is kept."""
    rank_of, bitmap_of, _, _ = _luts(m, n, str(device))
    return rank_of, bitmap_of


def _group_ranks(mask: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """Rank of every group of m consecutive columns (rows, then groups), or None when not rank-codable."""
    R, C = mask.shape
    if not (0 < n < m and C % m == 0 and rank_bits(m, n) < m):
        return None
    rank_of = _luts(m, n, str(mask.device))[0]
    weights = torch.pow(2.0, torch.arange(m, device=mask.device, dtype=torch.float32))
    ranks = rank_of[(mask.reshape(-1, m).to(torch.float32) @ weights).long()]  # exact: m <= 16
    return ranks if bool((ranks >= 0).all()) else None


def _rank_codes(data: torch.Tensor, count: int, n: int, m: int, check: bool = True) -> torch.Tensor:
    codes = unpack_codes(data, count, rank_bits(m, n))
    if check and codes.numel() and int(codes.max()) >= math.comb(m, n):
        raise ArtifactError(f"mask rank code {int(codes.max())} is out of range for {n}:{m} (< {math.comb(m, n)})")
    return codes


def encode_mask(mask: torch.Tensor, n: int, m: int) -> tuple[str, torch.Tensor | None]:
    """The (R, C) kept set as ("none", None) when all kept, ("rank", codes) when every group of m consecutive
    columns keeps exactly n (⌈log₂ C(m, n)⌉ bits a group, rows then groups), else ("bitmap", bits)."""
    if bool(mask.all()):
        return "none", None
    ranks = _group_ranks(mask, n, m)
    if ranks is not None:
        return "rank", pack_codes(ranks, rank_bits(m, n))
    return "bitmap", pack_bits(mask)


def decode_mask(encoding: str, data: torch.Tensor | None, shape: tuple[int, int], n: int, m: int) -> torch.Tensor:
    R, C = shape
    if encoding == "none":
        return torch.ones(R, C, dtype=torch.bool, device=data.device if data is not None else "cpu")
    if data is None:
        raise ArtifactError(f"mask encoding {encoding!r} needs a mask tensor, none is stored")
    if encoding == "bitmap":
        return unpack_bits(data, R * C).view(R, C)
    if encoding != "rank" or C % m or not 0 < n < m:
        raise ArtifactError(f"mask encoding {encoding!r} is not known for {n}:{m} and {C} columns")
    bits_of = _luts(m, n, str(data.device))[2]
    return bits_of[_rank_codes(data, R * C // m, n, m)].view(R, C)


# ------------------------------------------------------------------------------------ one linear layer


def _scale_dtype(name: str) -> torch.dtype:
    try:
        return SCALE_DTYPES[name]
    except KeyError:
        raise Pbs2pError(
            f"scale_dtype {name!r} has no storage type in the artifact format; known: {', '.join(SCALE_DTYPES)}"
        ) from None


def salient_dtype(widths: list[int]) -> torch.dtype:
    """Salient column indices are stored within their block: uint8 when every block is <= 256 wide."""
    return torch.uint8 if max(widths, default=0) <= 256 else torch.int16


def pack_linear(
    result: LinearResult | list[BlockCode],
    n_keep: int,
    m: int,
    block_size: int,
    scale_dtype: str = "fp16",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pack one linear's block codes. Returns (tensors by field name, layout meta for the manifest).

    Fields: `mask` (absent when dense), `sign`, `sign2` and `salient` (absent without salient columns),
    `scale.<name>` for every scale name of the block codes (whatever the names are)."""
    blocks = result.blocks if isinstance(result, LinearResult) else list(result)
    if not blocks:
        raise Pbs2pError("pack_linear needs at least one column block")
    R = blocks[0].mask.shape[0]
    widths = [int(b.mask.shape[1]) for b in blocks]
    if any(b.mask.shape != (R, w) or b.sign.shape != (R, w) for b, w in zip(blocks, widths, strict=True)):
        raise Pbs2pError("block codes of one linear must share their row count; mask and sign shapes must agree")
    C = sum(widths)
    dev = blocks[0].mask.device
    mask = torch.cat([b.mask.bool() for b in blocks], 1)
    sign = torch.cat([b.sign.bool() for b in blocks], 1)
    out: dict[str, torch.Tensor] = {}
    ranks = None if bool(mask.all()) else _group_ranks(mask, n_keep, m)
    if bool(mask.all()):
        encoding, kept_signs = "none", sign.reshape(-1)
    elif ranks is not None:  # kept signs gathered group by group: the kept columns of a rank are known
        encoding = "rank"
        out["mask"] = pack_codes(ranks, rank_bits(m, n_keep))
        pos_of = _luts(m, n_keep, str(dev))[3]
        kept_signs = sign.reshape(-1, m).gather(1, pos_of[ranks]).reshape(-1)
    else:
        encoding, kept_signs = "bitmap", sign[mask]
        out["mask"] = pack_bits(mask)
    out["sign"] = pack_bits(kept_signs)  # row-major order of the kept positions
    ks = [int(b.salient.numel()) for b in blocks]
    kept_salient = 0
    if sum(ks):
        offsets = torch.tensor([0, *widths[:-1]], device=dev).cumsum(0)
        gsal = torch.cat([b.salient.long() + off for b, off in zip(blocks, offsets, strict=True)])
        sign2 = torch.cat([b.sign2.bool() for b in blocks], 1)
        kept2 = mask[:, gsal]
        kept_salient = int(kept2.sum())
        out["sign2"] = pack_bits(sign2[kept2])
        out["salient"] = torch.cat([b.salient for b in blocks]).to(salient_dtype(widths))
    sdt = _scale_dtype(scale_dtype)
    compute = next(iter(blocks[0].scales.values())).dtype if blocks[0].scales else torch.float32
    scales: dict[str, Any] = {}
    for name in sorted({k for b in blocks for k in b.scales}):
        shapes = [list(b.scales[name].shape) if name in b.scales else None for b in blocks]
        flat = torch.cat([b.scales[name].reshape(-1) for b in blocks if name in b.scales])
        stored = flat.to(sdt)
        back = stored.to(flat.dtype)
        if not bool(((back == flat) | (back.isnan() & flat.isnan())).all()):
            raise Pbs2pError(
                f"scale {name!r} is not exactly representable in {scale_dtype}; the solver must round scales "
                f"to the storage dtype (binarize.round_scale) before the error is computed"
            )
        if all(s == [R] for s in shapes):
            layout: Any = "row"
        elif all(s == [w] for s, w in zip(shapes, widths, strict=True)):
            layout = "col"
        else:
            layout = shapes
        scales[name] = {"dtype": ST_DTYPES[sdt], "layout": layout}
        out[f"scale.{name}"] = stored
    kept = int(mask.sum())
    meta: dict[str, Any] = {
        "shape": [R, C],
        "n_keep": int(n_keep),
        "m": int(m),
        "block_size": int(block_size),
        "blocks": widths,
        "salient": ks,
        "mask": encoding,
        "mask_bits_per_group": rank_bits(m, n_keep) if encoding == "rank" else (m if encoding == "bitmap" else 0),
        "kept": kept,
        "kept_salient": kept_salient,
        "compute_dtype": str(compute).removeprefix("torch."),
        "scales": scales,
    }
    return {k: v.contiguous() for k, v in out.items()}, meta


def _scale_shapes(layout: Any, R: int, widths: list[int]) -> list[list[int] | None]:
    if layout == "row":
        return [[R] for _ in widths]
    if layout == "col":
        return [[w] for w in widths]
    if not isinstance(layout, list) or len(layout) != len(widths):
        raise ArtifactError(f"scale layout {layout!r} is not 'row', 'col' or a list with one entry per block")
    return layout


def expected_tensors(meta: Mapping[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """Field -> (safetensors dtype, shape) that the layout `meta` of one linear implies."""
    R, C = (int(x) for x in meta["shape"])
    widths, ks = [int(w) for w in meta["blocks"]], [int(k) for k in meta["salient"]]
    n, m = int(meta["n_keep"]), int(meta["m"])
    if R < 0 or C < 0 or sum(widths) != C or len(ks) != len(widths) or not 1 <= n <= m <= 16:
        raise ArtifactError(f"layout of shape {[R, C]}, blocks {widths}, salient {ks}, {n}:{m} is inconsistent")
    if meta["mask"] not in ("rank", "bitmap", "none"):
        raise ArtifactError(f"mask encoding {meta['mask']!r} is not known; this pbs2p reads rank, bitmap, none")
    if meta["mask"] == "rank" and (C % m or n >= m or meta["mask_bits_per_group"] != rank_bits(m, n)):
        raise ArtifactError(
            f"a rank-coded {n}:{m} mask over {C} columns cannot have {meta['mask_bits_per_group']} bits"
        )
    for name, s in meta["scales"].items():
        if s["dtype"] not in ST_TORCH or not ST_TORCH[s["dtype"]].is_floating_point:
            raise ArtifactError(f"scale {name!r} has dtype {s['dtype']!r}; a floating safetensors dtype is expected")
    out: dict[str, tuple[str, list[int]]] = {}
    if meta["mask"] == "rank":
        out["mask"] = ("U8", [(R * C // meta["m"] * meta["mask_bits_per_group"] + 7) // 8])
    elif meta["mask"] == "bitmap":
        out["mask"] = ("U8", [(R * C + 7) // 8])
    out["sign"] = ("U8", [(meta["kept"] + 7) // 8])
    if sum(ks):
        out["sign2"] = ("U8", [(meta["kept_salient"] + 7) // 8])
        out["salient"] = (ST_DTYPES[salient_dtype(widths)], [sum(ks)])
    for name, s in meta["scales"].items():
        shapes = _scale_shapes(s["layout"], R, widths)
        out[f"scale.{name}"] = (s["dtype"], [sum(math.prod(x) for x in shapes if x is not None)])
    return out


def unpack_linear(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], check: bool = True) -> list[BlockCode]:
    """The block codes of one linear from its packed tensors (fields as `pack_linear` names them)."""
    R, C = meta["shape"]
    widths, ks = list(meta["blocks"]), list(meta["salient"])
    n, m = meta["n_keep"], meta["m"]
    if check:
        if sum(widths) != C or len(ks) != len(widths):
            raise ArtifactError(f"block widths {widths} do not add up to {C} columns (or salient counts differ)")
        want = expected_tensors(meta)
        if set(want) != set(tensors):
            raise ArtifactError(f"packed fields {sorted(tensors)} differ from the layout's {sorted(want)}")
        for f, (dt, shape) in want.items():
            t = tensors[f]
            if ST_DTYPES.get(t.dtype) != dt or list(t.shape) != shape:
                raise ArtifactError(f"packed field {f!r} is {t.dtype} {list(t.shape)}; the layout says {dt} {shape}")
    kept = int(meta["kept"])
    if meta["mask"] == "rank" and tensors.get("mask") is not None and C % m == 0 and 0 < n < m:
        G = R * C // m
        if check and kept != G * n:
            raise ArtifactError(f"a {n}:{m} rank-coded mask keeps {G * n} weights; the manifest says {kept}")
        codes = _rank_codes(tensors["mask"], G, n, m, check)
        _, _, bits_of, pos_of = _luts(m, n, str(tensors["mask"].device))
        mask = bits_of[codes].view(R, C)
        sign_bits = unpack_bits(tensors["sign"], kept).view(G, n)
        sign = torch.zeros(G, m, dtype=torch.bool, device=mask.device).scatter_(1, pos_of[codes], sign_bits)
        sign = sign.view(R, C)
    else:
        mask = decode_mask(meta["mask"], tensors.get("mask"), (R, C), n, m)
        if check and int(mask.sum()) != kept:
            raise ArtifactError(f"mask keeps {int(mask.sum())} weights; the manifest says {kept}")
        sign = torch.zeros(R, C, dtype=torch.bool, device=mask.device)
        sign[mask] = unpack_bits(tensors["sign"], kept)
    dev = mask.device
    offsets = [0]
    for w in widths[:-1]:
        offsets.append(offsets[-1] + w)
    sal_parts: list[torch.Tensor] = [torch.zeros(0, dtype=torch.long, device=dev)] * len(widths)
    sign2_parts: list[torch.Tensor] = [torch.zeros(R, 0, dtype=torch.bool, device=dev)] * len(widths)
    if sum(ks):
        sal = tensors["salient"].long()
        if check:
            bound = torch.repeat_interleave(torch.tensor(widths, device=dev), torch.tensor(ks, device=dev))
            if bool(((sal < 0) | (sal >= bound)).any()):
                raise ArtifactError("a salient column index lies outside its column block")
        sal_parts = list(sal.split(ks))
        gsal = sal + torch.repeat_interleave(torch.tensor(offsets, device=dev), torch.tensor(ks, device=dev))
        kept2 = mask[:, gsal]
        if check and int(kept2.sum()) != meta["kept_salient"]:
            raise ArtifactError(f"salient columns keep {int(kept2.sum())} weights; manifest: {meta['kept_salient']}")
        sign2 = torch.zeros(R, sum(ks), dtype=torch.bool, device=dev)
        sign2[kept2] = unpack_bits(tensors["sign2"], int(meta["kept_salient"]))
        sign2_parts = list(sign2.split(ks, dim=1))
    compute = COMPUTE_DTYPES.get(meta.get("compute_dtype", "float32"))
    if compute is None:
        raise ArtifactError(f"compute dtype {meta.get('compute_dtype')!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    scales: list[dict[str, torch.Tensor]] = [{} for _ in widths]
    for name, s in meta["scales"].items():
        shapes = _scale_shapes(s["layout"], R, widths)
        flat = tensors[f"scale.{name}"].to(compute)
        sizes = [math.prod(x) if x is not None else 0 for x in shapes]
        for i, (part, shp) in enumerate(zip(flat.split(sizes), shapes, strict=True)):
            if shp is not None:
                scales[i][name] = part.view(shp)
    return [
        BlockCode(mask[:, o : o + w], sign[:, o : o + w], sal_parts[i], sign2_parts[i], scales[i])
        for i, (o, w) in enumerate(zip(offsets, widths, strict=True))
    ]


class _ReadScales(dict):  # type: ignore[type-arg]
    """A scales dict that remembers which names the decoder read."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        super().__init__(data)
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def decode_linear(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], check: bool = True) -> torch.Tensor:
    """Ŵ (R, C) in the compute dtype, bit-exactly `torch.cat([b.dense() for b in blocks], 1)`.

    With `check`, a stored scale that this pbs2p's decoder (`BlockCode.dense`) does not read, or one it
    needs but the artifact lacks, is an error: a scale layout from a newer pbs2p is refused, never ignored."""
    blocks = unpack_linear(tensors, meta, check)
    if not check:
        return torch.cat([b.dense() for b in blocks], 1)
    parts = []
    for i, b in enumerate(blocks):
        scales = _ReadScales(b.scales)
        try:
            parts.append(BlockCode(b.mask, b.sign, b.salient, b.sign2, scales).dense())
        except (KeyError, RuntimeError, IndexError) as exc:
            raise ArtifactError(f"block {i} cannot be decoded with its scales {sorted(b.scales)} ({exc!r})") from None
        unused = sorted(set(b.scales) - scales.read)
        if unused:
            raise ArtifactError(
                f"block {i} stores scales {unused} that this pbs2p does not decode: the artifact needs a newer pbs2p"
            )
    return torch.cat(parts, 1)


def linear_bits(meta: Mapping[str, Any], nbytes: int) -> dict[str, Any]:
    R, C = meta["shape"]
    weights = R * C
    return {
        "weights": weights,
        "bytes": nbytes,
        "paper_bits": (meta["kept"] + meta["kept_salient"]) / weights,
        "true_bits": nbytes * 8 / weights,
    }


# ---------------------------------------------------------------------------------------------- writer


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def is_artifact(path: Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


class ArtifactWriter:
    """Writes format v1 into a temporary sibling directory renamed into place by `finish`: never a half
    output that looks done. An existing output is replaced only when it is an earlier pbs2p output.

    A block's tensors are packed and written when they arrive (one or more shard files per block, each at
    most `shard_bytes` unless a single tensor is larger), so memory holds one block at a time."""

    def __init__(
        self,
        out_dir: Path,
        model_dir: Path,
        config: Any = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> None:
        self.out = Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise Pbs2pError(f"output {self.out} is a file; choose an empty or new directory")
        if self.out.exists() and any(self.out.iterdir()) and not (self.out / MANIFEST_FILE).is_file():
            raise Pbs2pError(f"output {self.out} exists and is not a pbs2p output; choose an empty or new directory")
        if shard_bytes < 1:
            raise Pbs2pError(f"shard size limit {shard_bytes} must be positive, e.g. 2 GiB")
        if config is None:
            config = CompressionConfig()
        elif isinstance(config, Mapping):
            config = CompressionConfig.from_dict(dict(config))
        self.cfg = config
        self.shard_bytes = shard_bytes
        self.model_dir = Path(model_dir)
        if not (self.model_dir / "config.json").is_file():
            raise Pbs2pError(f"source model {self.model_dir} has no config.json to copy into the artifact")
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}"
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.files: dict[str, dict[str, Any]] = {}
        self.tensors: dict[str, dict[str, Any]] = {}
        self.linears: dict[str, dict[str, Any]] = {}

    def write_block(self, index: int, tensors: dict[str, torch.Tensor], results: dict[str, LinearResult]) -> None:
        """Block `index`: all its tensors by full name (compressed linears hold Ŵ, ignored here); `results`
        by full weight name for the compressed linears: their codes are packed."""
        missing = sorted(set(results) - set(tensors))
        if missing:
            raise Pbs2pError(f"block {index}: compressed linears {missing} are not among the block's tensors")
        m, bs = self.cfg.pattern.m, self.cfg.block_size
        sdt = self.cfg.ablations.scale_dtype
        units: list[tuple[str | None, dict[str, torch.Tensor], dict[str, Any] | None]] = []
        for name in sorted(tensors):
            if name in results:
                res = results[name]
                packed, meta = pack_linear(res, res.n_keep, m, bs, sdt)
                units.append((name, {f"{name}{SEP}{k}": v for k, v in packed.items()}, meta))
            else:
                units.append((None, {name: tensors[name]}, None))
        self._write_units(f"block-{index:05d}", units)

    def write_rest(self, tensors: dict[str, torch.Tensor]) -> None:
        """Every tensor outside the decoder blocks (embeddings, final norm, head), as stored."""
        self._write_units("rest", [(None, {k: tensors[k]}, None) for k in sorted(tensors)])

    def _write_units(
        self, part: str, units: list[tuple[str | None, dict[str, torch.Tensor], dict[str, Any] | None]]
    ) -> None:
        """Greedy shards in name order; a linear's packed tensors stay together in one file."""
        shards: list[list[int]] = [[]]
        size = 0
        for i, (_, ts, _) in enumerate(units):
            b = sum(_nbytes(t) for t in ts.values())
            if shards[-1] and size + b > self.shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += b
        for k, idx in enumerate(shards):
            if not idx:
                continue
            fname = f"pbs2p-{part}-{k:03d}.safetensors"
            if fname in self.files:
                raise Pbs2pError(f"{fname} is written twice; each block is written once")
            flat: dict[str, torch.Tensor] = {}
            for i in idx:
                name, ts, meta = units[i]
                flat.update({n: t.detach().to("cpu").contiguous() for n, t in ts.items()})
                if name is not None and meta is not None:
                    nbytes = sum(_nbytes(t) for t in ts.values())
                    self.linears[name] = {**meta, "file": fname, **linear_bits(meta, nbytes)}
            save_file(flat, self.tmp / fname, metadata={"format": "pt"})  # one key: a map has no fixed order
            for n, t in flat.items():
                self.tensors[n] = {"file": fname, "dtype": ST_DTYPES[t.dtype], "shape": list(t.shape)}
            self._record(fname)

    def _record(self, fname: str) -> None:
        p = self.tmp / fname
        self.files[fname] = {"size": p.stat().st_size, "sha256": _sha256(p)}

    def finish(self, report: Any) -> Path:
        """Copy the source's config/tokenizer/generation files, write manifest.json last, rename into place."""
        rep = report.to_dict() if hasattr(report, "to_dict") else dict(report)
        for f in sorted(self.model_dir.iterdir()):  # config, tokenizer, generation config, chat template
            if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_WEIGHT_SUFFIXES):
                if f.name == MANIFEST_FILE:
                    continue
                shutil.copyfile(f, self.tmp / f.name)
                self._record(f.name)
        # wall-clock timings differ from run to run: they go to timings.json (not hashed, not in the manifest),
        # so the same config, model and calibration give a byte-identical artifact
        rep, timings = _split_timings(rep)
        (self.tmp / TIMINGS_FILE).write_text(json.dumps(timings, indent=1))
        manifest = build_manifest(rep, self.files, self.tensors, self.linears)
        (self.tmp / MANIFEST_FILE).write_text(dump_manifest(manifest))  # written last
        if self.out.exists():
            shutil.rmtree(self.out)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _totals(linears: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    weights = sum(v["weights"] for v in linears.values())
    nbytes = sum(v["bytes"] for v in linears.values())
    paper = sum(v["kept"] + v["kept_salient"] for v in linears.values())
    packed = {f"{n}{SEP}" for n in linears}
    other = [
        math.prod(t["shape"]) * ST_SIZES[t["dtype"]]
        for n, t in tensors.items()
        if not any(n.startswith(p) for p in packed)
    ]
    true_bits = nbytes * 8 / weights if weights else 16.0
    return {
        "linears": len(linears),
        "weights": weights,
        "bytes": nbytes,
        "paper_bits": paper / weights if weights else 16.0,
        "true_bits": true_bits,
        "ratio_fp16": 16 / true_bits if true_bits else 0.0,
        "uncompressed_tensors": len(other),
        "uncompressed_bytes": sum(other),
    }


def dump_manifest(manifest: Mapping[str, Any]) -> str:
    """JSON, one line per file, tensor and linear (readable and diffable; any JSON parser reads it)."""
    lines = []
    for key, value in manifest.items():
        if key in ("files", "tensors", "linears") and value:
            body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{body}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: " + json.dumps(value, indent=1).replace("\n", "\n "))
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _split_timings(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the report without wall-clock fields, those fields)."""
    rep = dict(report)
    timings: dict[str, Any] = {"seconds": rep.pop("seconds", None)}
    blocks = [dict(b) for b in rep.get("blocks", [])]
    timings["block_seconds"] = [b.pop("seconds", None) for b in blocks]
    if "blocks" in rep:
        rep["blocks"] = blocks
    return rep, timings


def build_manifest(
    report: dict[str, Any],
    files: Mapping[str, Mapping[str, Any]],
    tensors: Mapping[str, Mapping[str, Any]],
    linears: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_type": report.get("model_type"),
        "config": report.get("config", {}),
        "files": {k: dict(files[k]) for k in sorted(files)},
        "totals": _totals(linears, tensors),
        "linears": {k: dict(linears[k]) for k in sorted(linears)},
        "tensors": {k: dict(tensors[k]) for k in sorted(tensors)},
        "report": report,
    }


# ---------------------------------------------------------------------------------------------- reader


@dataclass
class Artifact:
    """A verified artifact: its directory and manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def linears(self) -> dict[str, dict[str, Any]]:
        return self.manifest["linears"]

    def tensor_files(self) -> list[str]:
        return sorted({t["file"] for t in self.manifest["tensors"].values()})

    def names_in(self, fname: str) -> list[str]:
        return sorted(n for n, t in self.manifest["tensors"].items() if t["file"] == fname)


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON), checked for sanity."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 1024**2:
            raise ArtifactError(f"{path} is not a valid safetensors file (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ArtifactError(f"{path} has an unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path} has an unreadable safetensors header")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for name, t in header.items():
        try:
            start, end = t["data_offsets"]
            want = math.prod(t["shape"]) * ST_SIZES[t["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise ArtifactError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if end - start != want or not 0 <= start <= end <= data:
            raise ArtifactError(f"{path}: tensor {name!r} has data offsets {t['data_offsets']} that do not fit")
    return header


def _safe_name(path: Path, name: Any) -> Path:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ArtifactError(f"{path / MANIFEST_FILE} lists a file {name!r} outside the artifact directory")
    return path / name


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    mf = path / MANIFEST_FILE
    if not path.is_dir():
        raise ArtifactError(f"artifact {path} is not a directory; give the directory that holds {MANIFEST_FILE}")
    if not mf.is_file():
        plain = any(path.glob("model*.safetensors"))
        hint = " (it looks like a plain checkpoint: load it with transformers)" if plain else ""
        raise ArtifactError(
            f"{mf} is missing: {path} is not a pbs2p artifact{hint}, or it is incomplete "
            f"(the manifest is written last); compress again or download it again"
        )
    try:
        manifest = json.loads(mf.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{mf} is not valid JSON ({exc}); the artifact is damaged, download it again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{mf} is not a pbs2p artifact manifest (format is not {FORMAT_NAME!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{mf} has format_version {version!r}; a positive integer is expected")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{mf} is format version {version}, written by a newer pbs2p; this pbs2p reads format versions up "
            f"to {FORMAT_VERSION}: upgrade pbs2p"
        )
    for key in ("files", "tensors", "linears"):
        if not isinstance(manifest.get(key), dict):
            raise ArtifactError(f"{mf} lacks the field {key!r}; the artifact is damaged, download it again")
    return manifest


def verify_artifact(path: Path, check_hashes: bool = True) -> Artifact:
    """Check everything before use: the manifest (format, version), every file it lists (present, size,
    sha256), every safetensors header against the manifest's tensor table, and every compressed linear's
    tensors against its layout. Raises ArtifactError naming the file."""
    path = Path(path)
    manifest = read_manifest(path)
    mf = path / MANIFEST_FILE
    files: dict[str, Any] = manifest["files"]
    for fname in sorted(files):
        p = _safe_name(path, fname)
        info = files[fname]
        if not p.is_file():
            raise ArtifactError(f"{p} is missing (listed in {MANIFEST_FILE}); download the artifact again")
        size = p.stat().st_size
        if size != info.get("size"):
            raise ArtifactError(
                f"{p} has {size} bytes, {MANIFEST_FILE} says {info.get('size')}: truncated or changed; "
                f"download the artifact again"
            )
        if check_hashes and _sha256(p) != info.get("sha256"):
            raise ArtifactError(f"{p} fails its sha256 check: the file is corrupted; download the artifact again")
    if "config.json" not in files:
        raise ArtifactError(f"{mf} does not list config.json; the artifact is incomplete")
    tensors: dict[str, Any] = manifest["tensors"]
    by_file: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        if not isinstance(t, dict) or t.get("file") not in files:
            raise ArtifactError(f"{mf}: tensor {name!r} lives in a file the manifest does not list")
        by_file.setdefault(t["file"], {})[name] = t
    for fname in sorted(by_file):
        p = path / fname
        header = read_safetensors_header(p)
        want = by_file[fname]
        extra, lacking = sorted(set(header) - set(want)), sorted(set(want) - set(header))
        if extra or lacking:
            raise ArtifactError(f"{p} holds tensors {extra[:3]} not in {MANIFEST_FILE} and lacks {lacking[:3]}")
        for name, t in want.items():
            h = header[name]
            if h["dtype"] != t.get("dtype") or list(h["shape"]) != list(t.get("shape", [])):
                raise ArtifactError(
                    f"{p}: tensor {name!r} is {h['dtype']} {h['shape']}, {MANIFEST_FILE} says "
                    f"{t.get('dtype')} {t.get('shape')}: wrong shape or type"
                )
    for lname, meta in manifest["linears"].items():
        fname = meta.get("file")
        try:
            want_l = expected_tensors(meta)
        except (KeyError, TypeError, ValueError, ArtifactError) as exc:
            raise ArtifactError(f"{mf}: linear {lname!r} has a malformed layout ({exc!r})") from None
        for field_, (dt, shape) in want_l.items():
            t = tensors.get(f"{lname}{SEP}{field_}")
            if t is None or t["file"] != fname:
                raise ArtifactError(f"{path / str(fname)} lacks the tensor {lname}{SEP}{field_}")
            if t["dtype"] != dt or list(t["shape"]) != shape:
                raise ArtifactError(
                    f"{path / fname}: tensor {lname}{SEP}{field_} is {t['dtype']} {t['shape']}; the linear's "
                    f"layout implies {dt} {shape}: wrong shape"
                )
        stray = [n for n in tensors if n.startswith(f"{lname}{SEP}") and n[len(lname) + 1 :] not in want_l]
        if stray:
            raise ArtifactError(f"{path / fname} holds {stray[0]!r}, which the linear's layout does not have")
    return Artifact(path, manifest)


def _open_file(art: Artifact, fname: str) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(art.path / fname, framework="pt") as f:
        for name in art.names_in(fname):
            yield name, f.get_tensor(name)


def iter_files(art: Artifact) -> Iterator[tuple[str, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]]:
    """Per tensor file: (file name, uncompressed tensors by name, packed fields by linear weight name)."""
    for fname in art.tensor_files():
        plain: dict[str, torch.Tensor] = {}
        packed: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in _open_file(art, fname):
            base, sep, field_ = name.partition(SEP)
            if sep and base in art.linears:
                packed.setdefault(base, {})[field_] = t
            else:
                plain[name] = t
        yield fname, plain, packed


def _decode_checked(art: Artifact, fname: str, name: str, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
    try:
        return decode_linear(fields, art.linears[name])
    except ArtifactError as exc:
        raise ArtifactError(f"{art.path / fname}: {name}: {exc}") from None


def iter_dense(art: Artifact) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Per tensor file: every tensor by name, compressed linears decoded to Ŵ (compute dtype)."""
    for fname, plain, packed in iter_files(art):
        out = dict(plain)
        for name, fields in packed.items():
            out[name] = _decode_checked(art, fname, name, fields)
        yield fname, out


def dense_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a verified artifact, compressed linears decoded (what a dense checkpoint holds)."""
    art = verify_artifact(path)
    out: dict[str, torch.Tensor] = {}
    for _, ts in iter_dense(art):
        out.update(ts)
    return out


class PackedLinear(nn.Module):
    """A linear layer that keeps its packed code (uint8 bit streams, fp16 scales) as buffers and decodes
    Ŵ at every forward call (vectorised), so its resident memory is the artifact's bytes, not R × C floats."""

    def __init__(self, meta: Mapping[str, Any], fields: Mapping[str, torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        self.meta = dict(meta)
        self.out_features, self.in_features = (int(x) for x in meta["shape"])
        self.fields = sorted(fields)
        for f in self.fields:
            self.register_buffer(self._buf(f), fields[f])
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @staticmethod
    def _buf(field_: str) -> str:
        return "packed_" + field_.replace(".", "__")

    def packed(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, self._buf(f)) for f in self.fields}

    def decode(self, check: bool = False) -> torch.Tensor:
        return decode_linear(self.packed(), self.meta, check)

    def resident_bytes(self) -> int:
        """Bytes held by the packed code (the bias, if any, is not part of the compressed weight)."""
        return sum(_nbytes(t) for t in self.packed().values())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.decode()
        return F.linear(x, w.to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        nm = f"{self.meta['n_keep']}:{self.meta['m']}"
        return f"in_features={self.in_features}, out_features={self.out_features}, pattern={nm}"


def load_artifact(
    path: Path,
    mode: str = "dense",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A transformers causal LM from a verified artifact (every sha256 checked first).

    mode "dense": compressed linears decoded once into ordinary weights; "packed": they become `PackedLinear`
    modules that decode per forward call. Both compute with exactly the stored Ŵ."""
    if mode not in ("dense", "packed"):
        raise Pbs2pError(f"load mode {mode!r} is not known; use 'dense' or 'packed'")
    from transformers import AutoConfig

    from .skeleton import empty_causal_lm

    art = verify_artifact(path)
    path = art.path
    try:
        config = AutoConfig.from_pretrained(path)  # never trust_remote_code
        model: Any = empty_causal_lm(config, dtype)  # parameters on meta, no double allocation
    except (ValueError, OSError, KeyError) as exc:
        raise ArtifactError(f"{path / 'config.json'} does not describe a model transformers can build: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for fname, plain, packed in iter_files(art):
        sd: dict[str, torch.Tensor] = {}
        for name, t in plain.items():
            if name not in expected:
                raise ArtifactError(f"{path / fname}: tensor {name!r} is not a parameter of this {config.model_type}")
            if tuple(t.shape) != expected[name]:
                raise ArtifactError(
                    f"{path / fname}: tensor {name!r} has shape {list(t.shape)}, the model's config.json "
                    f"implies {list(expected[name])}: wrong shape"
                )
            sd[name] = t.to(dtype) if t.is_floating_point() else t
        for name, fields in packed.items():
            meta = art.linears[name]
            if name not in expected or tuple(meta["shape"]) != expected[name]:
                raise ArtifactError(
                    f"{path / fname}: compressed linear {name!r} has shape {meta['shape']}, the model's "
                    f"config.json implies {list(expected.get(name, ()))}: wrong shape"
                )
            w = _decode_checked(art, fname, name, fields)  # full check once, also in packed mode
            if mode == "dense":
                sd[name] = w.to(dtype)
        model.load_state_dict(sd, strict=False, assign=True)
        if mode == "packed":
            for name, fields in packed.items():
                mod_name = name.removesuffix(".weight")
                parent_name, _, child = mod_name.rpartition(".")
                parent = model.get_submodule(parent_name)
                lin = getattr(parent, child)
                bias = lin.bias if isinstance(lin, nn.Linear) and lin.bias is not None else None
                if bias is not None and bias.is_meta:
                    raise ArtifactError(f"{path / fname}: the bias of {mod_name} is missing")
                setattr(parent, child, PackedLinear(art.linears[name], fields, bias))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ArtifactError(f"{path / MANIFEST_FILE}: the artifact lacks tensors {missing[:5]}; it is incomplete")
    return model.to(device).eval()


def export_dense(path: Path, out_dir: Path) -> Path:
    """A plain transformers checkpoint (safetensors shards + index, config and tokenizer files) from an
    artifact, written into a temporary sibling directory renamed into place. Compressed linears hold Ŵ."""
    art = verify_artifact(path)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise Pbs2pError(f"output {out} is a file; choose an empty or new directory")
    if out.exists() and any(out.iterdir()):
        raise Pbs2pError(f"output {out} exists and is not empty; choose an empty or new directory")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = art.tensor_files()
        weight_map: dict[str, str] = {}
        total = 0
        for i, (_, ts) in enumerate(iter_dense(art)):
            fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
            ts = {k: v.contiguous() for k, v in ts.items()}
            save_file(ts, tmp / fname, metadata={"format": "pt"})
            weight_map.update({k: fname for k in ts})
            total += sum(_nbytes(t) for t in ts.values())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        tensor_files = set(files)
        for fname in sorted(art.manifest["files"]):
            if fname not in tensor_files:
                shutil.copyfile(art.path / fname, tmp / fname)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def inspect_artifact(path: Path) -> dict[str, Any]:
    """Bit accounting from the bytes actually written: per compressed linear and in total, weights, the
    paper's W-bits (sign planes), true bits = stored bytes × 8 / weights, ratio to fp16. Verifies first."""
    art = verify_artifact(path)
    m = art.manifest
    nbytes: dict[str, int] = {}
    file_bytes = 0
    headers = 0
    for fname in art.tensor_files():
        p = art.path / fname
        header = read_safetensors_header(p)
        file_bytes += p.stat().st_size
        data = 0
        for name, h in header.items():
            start, end = h["data_offsets"]
            data += end - start
            base, sep, _ = name.partition(SEP)
            if sep and base in art.linears:
                nbytes[base] = nbytes.get(base, 0) + end - start
        headers += p.stat().st_size - data
    formula: dict[str, dict[str, Any]] = {}
    for b in m.get("report", {}).get("blocks", []):
        for lr in b.get("linears", []):
            formula[f"{lr['name']}.weight"] = lr.get("bits", {})
    layers = []
    for name in sorted(art.linears):
        meta = art.linears[name]
        bits = linear_bits(meta, nbytes.get(name, 0))
        if bits["bytes"] != meta.get("bytes"):
            raise ArtifactError(
                f"{art.path / meta['file']}: {name} holds {bits['bytes']} bytes, manifest {meta['bytes']}"
            )
        f = formula.get(name, {})
        layers.append(
            {
                "name": name.removesuffix(".weight"),
                "shape": meta["shape"],
                "pattern": f"{meta['n_keep']}:{meta['m']}",
                **bits,
                "ratio_fp16": 16 / bits["true_bits"],
                "formula_true_bits": f.get("true_bits"),
            }
        )
    total = _totals(art.linears, m["tensors"])
    other = sum(info["size"] for fname, info in m["files"].items() if fname not in set(art.tensor_files()))
    return {
        "path": str(art.path),
        "format": m["format"],
        "format_version": m["format_version"],
        "model_type": m.get("model_type"),
        "config": m.get("config", {}),
        "layers": layers,
        "total": {**total, "formula_true_bits": (m.get("report", {}).get("bits") or {}).get("true_bits")},
        "files": {
            "count": len(m["files"]) + 1,
            "tensor_file_bytes": file_bytes,
            "safetensors_header_bytes": headers,
            "other_file_bytes": other + (art.path / MANIFEST_FILE).stat().st_size,
        },
    }


def format_inspect(info: dict[str, Any]) -> str:
    """The human-readable table of `pbs2p inspect`."""
    rows = [("layer", "shape", "N:M", "weights", "bytes", "paper bits", "true bits", "vs fp16")]
    for lay in info["layers"]:
        rows.append(
            (
                lay["name"],
                "x".join(str(x) for x in lay["shape"]),
                lay["pattern"],
                str(lay["weights"]),
                str(lay["bytes"]),
                f"{lay['paper_bits']:.3f}",
                f"{lay['true_bits']:.3f}",
                f"{lay['ratio_fp16']:.2f}x",
            )
        )
    t = info["total"]
    rows.append(
        (
            f"total ({t['linears']} compressed linears)",
            "",
            "",
            str(t["weights"]),
            str(t["bytes"]),
            f"{t['paper_bits']:.3f}",
            f"{t['true_bits']:.3f}",
            f"{t['ratio_fp16']:.2f}x" if t["linears"] else "-",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    f = info["files"]
    cfg = info.get("config", {})
    lines.append(
        f"artifact {info['path']}: format v{info['format_version']}, {info['model_type']}, method "
        f"{cfg.get('method')} {cfg.get('pattern')}; uncompressed tensors {t['uncompressed_tensors']} "
        f"({t['uncompressed_bytes'] / 2**20:.1f} MiB); tensor files {f['tensor_file_bytes'] / 2**20:.1f} MiB"
    )
    lines.append("true bits = bytes stored for the linear x 8 / its weights; paper bits = sign planes only")
    return "\n".join(lines)
