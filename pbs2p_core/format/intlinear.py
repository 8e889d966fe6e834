"""The codec of an integer-coded linear, method gptq (docs/artifact-format.md, "Integer-coded linears").

Per linear: every weight's code at `bits` bits (rows, then columns, natural column order), one scale per row per
group in the storage dtype, the zero points at `bits` bits (absent when symmetric) and, with act-order, each
column's group at ⌈log₂ G⌉ bits. G = ⌈C / group_size⌉: the last group is shorter when the size does not divide C.
Decoding is bit-exact: the same Ŵ as `IntCode.dense()` of the in-memory code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ArtifactError, Pbs2pError
from ..gptq import IntCode, group_count
from .bitpack import pack_codes, unpack_codes
from .manifest import ST_DTYPES, ST_TORCH, check_fields

CODEC = "int"
_SCALE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def index_bits(groups: int) -> int:
    """Bits of one column's group index: ⌈log₂ G⌉, at least 1."""
    return max(1, (groups - 1).bit_length())


def pack_int(code: IntCode, scale_dtype: str = "fp16") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Pack one integer code. Returns (tensors by field name, layout meta for the manifest)."""
    R, C = code.codes.shape
    G = code.groups
    if group_count(C, code.group_size) != G or code.scales.shape != (R, G) or code.zeros.shape != (R, G):
        raise Pbs2pError(f"integer code of shape {[R, C]} has scales {list(code.scales.shape)} for groups of {G}")
    sdt = _SCALE_DTYPES.get(scale_dtype)
    if sdt is None:
        raise Pbs2pError(f"scale_dtype {scale_dtype!r} has no storage type; known: {', '.join(_SCALE_DTYPES)}")
    stored = code.scales.reshape(-1).to(sdt)
    if not torch.equal(stored.to(code.scales.dtype), code.scales.reshape(-1)):
        raise Pbs2pError(f"gptq scales are not exactly representable in {scale_dtype}; round them before use")
    out = {"codes": pack_codes(code.codes.reshape(-1), code.bits), "scale": stored}
    if not code.sym:
        out["zero"] = pack_codes(code.zeros.reshape(-1), code.bits)
    if code.g_idx is not None:
        out["g_idx"] = pack_codes(code.g_idx, index_bits(G))
    meta: dict[str, Any] = {
        "codec": CODEC,
        "shape": [R, C],
        "bits": code.bits,
        "group_size": code.group_size,
        "groups": G,
        "sym": code.sym,
        "act_order": code.g_idx is not None,
        "scale_dtype": ST_DTYPES[sdt],
        "kept": R * C,
        "kept_salient": 0,
        "compute_dtype": str(code.scales.dtype).removeprefix("torch."),
    }
    return {k: v.contiguous() for k, v in out.items()}, meta


def expected_int_tensors(meta: Mapping[str, Any]) -> dict[str, tuple[str, list[int]]]:
    """Field -> (safetensors dtype, shape) that the layout `meta` of an integer-coded linear implies."""
    R, C = (int(x) for x in meta["shape"])
    bits, gs, G = int(meta["bits"]), int(meta["group_size"]), int(meta["groups"])
    if not 1 <= bits <= 8 or gs < 1 or G != group_count(C, gs) or R < 0 or meta["kept"] != R * C:
        raise ArtifactError(f"integer layout of shape {[R, C]}, {bits} bits, {G} groups of {gs} is inconsistent")
    sdt = meta["scale_dtype"]
    if sdt not in ST_TORCH or not ST_TORCH[sdt].is_floating_point:
        raise ArtifactError(f"scales have dtype {sdt!r}; a floating safetensors dtype is expected")
    out = {"codes": ("U8", [(R * C * bits + 7) // 8]), "scale": (sdt, [R * G])}
    if not meta["sym"]:
        out["zero"] = ("U8", [(R * G * bits + 7) // 8])
    if meta["act_order"]:
        out["g_idx"] = ("U8", [(C * index_bits(G) + 7) // 8])
    return out


def unpack_int(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], check: bool = True) -> IntCode:
    """The integer code of one linear from its packed tensors (fields as `pack_int` names them)."""
    R, C = (int(x) for x in meta["shape"])
    bits, gs, G = int(meta["bits"]), int(meta["group_size"]), int(meta["groups"])
    if check:
        check_fields(tensors, expected_int_tensors(meta))
    compute = {"float32": torch.float32, "float64": torch.float64}.get(meta.get("compute_dtype", "float32"))
    if compute is None:
        raise ArtifactError(f"compute dtype {meta.get('compute_dtype')!r} is not float32 or float64")
    codes = unpack_codes(tensors["codes"], R * C, bits).to(torch.uint8).view(R, C)
    scales = tensors["scale"].to(compute).view(R, G)
    if meta["sym"]:
        zeros = torch.full((R, G), 2 ** (bits - 1), dtype=torch.uint8, device=codes.device)
    else:
        zeros = unpack_codes(tensors["zero"], R * G, bits).to(torch.uint8).view(R, G)
    g_idx = None
    if meta["act_order"]:
        g_idx = unpack_codes(tensors["g_idx"], C, index_bits(G))
        if check and C and int(g_idx.max()) >= G:
            raise ArtifactError(f"a column's group index {int(g_idx.max())} is out of range (< {G})")
    return IntCode(codes, scales, zeros, g_idx, bits, gs, bool(meta["sym"]))


def decode_int(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], check: bool = True) -> torch.Tensor:
    """Ŵ (R, C) in the compute dtype, bit-exactly `IntCode.dense()`."""
    return unpack_int(tensors, meta, check).dense()
