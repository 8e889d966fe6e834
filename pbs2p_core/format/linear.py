"""The codec of one compressed linear (docs/artifact-format.md, "Packed tensors of a compressed linear").

Per linear the artifact stores what the method needs and nothing more: the N:M mask (rank code, bitmap or
nothing), the sign bits of kept weights only, the residual sign plane of the salient columns (kept weights
only), the salient column indices within their block, and every scale of the block codes in the configured
storage dtype. Decoding is bit-exact: the same Ŵ as `BlockCode.dense()` of the in-memory codes.
A linear of method gptq has the integer codec instead (`intlinear.py`; its layout's `codec` is "int"); the
functions here dispatch on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..binarize import BlockCode
from ..errors import ArtifactError, Pbs2pError
from ..solver import LinearResult
from .bitpack import decode_mask, encode_mask, pack_bits, rank_bits, rank_tables, unpack_bits, unpack_rank_codes
from .intlinear import CODEC as INT_CODEC
from .intlinear import decode_int, expected_int_tensors, pack_int
from .manifest import ST_DTYPES, ST_TORCH, check_fields

# storage dtype of the scales, by config name (`CompressionConfig.ablations.scale_dtype`)
SCALE_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}
# dtypes a decoder computes Ŵ in (the layout's `compute_dtype`)
COMPUTE_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


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
    `scale.<name>` for every scale name of the block codes (whatever the names are). An integer code (method
    gptq) is packed by `intlinear.pack_int`."""
    if isinstance(result, LinearResult) and result.intcode is not None:
        return pack_int(result.intcode, scale_dtype)
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
    encoding, mask_data, ranks = encode_mask(mask, n_keep, m)
    if mask_data is not None:
        out["mask"] = mask_data
    if encoding == "none":
        kept_signs = sign.reshape(-1)
    elif ranks is not None:  # kept signs gathered group by group: the kept columns of a rank are known
        pos_of = rank_tables(m, n_keep, str(dev)).pos_of
        kept_signs = sign.reshape(-1, m).gather(1, pos_of[ranks]).reshape(-1)
    else:
        kept_signs = sign[mask]
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
    codec = meta.get("codec", "binary")
    if codec == INT_CODEC:
        return expected_int_tensors(meta)
    if codec != "binary":
        raise ArtifactError(f"codec {codec!r} is not known; this pbs2p reads binary and int: upgrade pbs2p")
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
    if meta.get("codec", "binary") != "binary":
        raise ArtifactError(f"linear has codec {meta['codec']!r}, not block codes (intlinear.unpack_int reads it)")
    R, C = meta["shape"]
    widths, ks = list(meta["blocks"]), list(meta["salient"])
    n, m = meta["n_keep"], meta["m"]
    if check:
        if sum(widths) != C or len(ks) != len(widths):
            raise ArtifactError(f"block widths {widths} do not add up to {C} columns (or salient counts differ)")
        check_fields(tensors, expected_tensors(meta))
    kept = int(meta["kept"])
    if meta["mask"] == "rank" and tensors.get("mask") is not None and C % m == 0 and 0 < n < m:
        G = R * C // m
        if check and kept != G * n:
            raise ArtifactError(f"a {n}:{m} rank-coded mask keeps {G * n} weights; the manifest says {kept}")
        codes = unpack_rank_codes(tensors["mask"], G, n, m, check)
        _, _, bits_of, pos_of = rank_tables(m, n, str(tensors["mask"].device))
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


class _ReadScales(dict[str, torch.Tensor]):
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
    needs but the artifact lacks, is an error: a scale layout from a newer pbs2p is refused, never ignored.
    An integer-coded linear decodes bit-exactly to `IntCode.dense()`."""
    if meta.get("codec") == INT_CODEC:
        if check:
            expected_tensors(meta)
        return decode_int(tensors, meta, check)
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


def linear_label(meta: Mapping[str, Any]) -> str:
    """How a linear is coded, in a few characters: its N:M pattern, or e.g. "int3 g128" (integer codec)."""
    if meta.get("codec") == INT_CODEC:
        return f"int{meta['bits']} g{meta['group_size']}" + (" act" if meta["act_order"] else "")
    return f"{meta['n_keep']}:{meta['m']}"


def linear_bits(meta: Mapping[str, Any], nbytes: int) -> dict[str, Any]:
    """The layout's bit counts of a linear whose packed tensors take `nbytes` bytes."""
    R, C = meta["shape"]
    weights = R * C
    return {
        "weights": weights,
        "bytes": nbytes,
        "paper_bits": (meta["kept"] * meta.get("bits", 1) + meta["kept_salient"]) / weights,
        "true_bits": nbytes * 8 / weights,
    }
