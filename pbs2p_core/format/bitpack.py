"""Bit streams of the artifact (docs/artifact-format.md, "Bit streams" and "The mask").

Every stream is packed least significant bit first; a multi-bit code is written LSB first too, codes one after
the other with no alignment. An N:M mask is stored as the rank of each group's bitmap among the C(M, N)
bitmaps with N ones (⌈log₂ C(M, N)⌉ bits a group), as a plain bitmap when some group does not keep exactly N,
or not at all when every weight is kept. Everything is vectorised torch (no loop over rows or groups).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from ..errors import ArtifactError


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


# ---------------------------------------------------------------------------------------- N:M rank code


def rank_bits(m: int, n: int) -> int:
    """⌈log₂ C(m, n)⌉: bits of one group's rank code (at least 1)."""
    return max(1, (math.comb(m, n) - 1).bit_length())


class RankTables(NamedTuple):
    """The rank code of n kept out of m: the C(m, n) m-bit values with n ones, ascending, are ranks 0, 1, ...

    A group's bitmap has bit j set when its column j (0 = leftmost) is kept."""

    rank_of: torch.Tensor  # (2^m,) long: bitmap -> rank, -1 where the popcount is not n
    bitmap_of: torch.Tensor  # (C(m, n),) long: rank -> bitmap
    bits_of: torch.Tensor  # (C(m, n), m) bool: rank -> kept columns of the group
    pos_of: torch.Tensor  # (C(m, n), n) long: rank -> the kept column positions, ascending


@functools.lru_cache(maxsize=64)
def rank_tables(m: int, n: int, device: str = "cpu") -> RankTables:
    """The lookup tables of the n:m rank code on `device` (cached)."""
    v = torch.arange(2**m)
    bits = ((v[:, None] >> torch.arange(m)) & 1).bool()
    bitmap_of = v[bits.sum(1) == n]
    rank_of = torch.full((2**m,), -1, dtype=torch.long)
    rank_of[bitmap_of] = torch.arange(bitmap_of.numel())
    bits_of = bits[bitmap_of]
    pos_of = bits_of.nonzero()[:, 1].view(-1, n)  # ascending column within the group
    return RankTables(rank_of.to(device), bitmap_of.to(device), bits_of.to(device), pos_of.to(device))


def _group_ranks(mask: torch.Tensor, n: int, m: int) -> torch.Tensor | None:
    """Rank of every group of m consecutive columns (rows, then groups), or None when not rank-codable."""
    R, C = mask.shape
    if not (0 < n < m and C % m == 0 and rank_bits(m, n) < m):
        return None
    rank_of = rank_tables(m, n, str(mask.device)).rank_of
    weights = torch.pow(2.0, torch.arange(m, device=mask.device, dtype=torch.float32))
    ranks = rank_of[(mask.reshape(-1, m).to(torch.float32) @ weights).long()]  # exact: m <= 16
    return ranks if bool((ranks >= 0).all()) else None


def unpack_rank_codes(data: torch.Tensor, count: int, n: int, m: int, check: bool = True) -> torch.Tensor:
    """`count` rank codes of an n:m mask; with `check`, a rank >= C(m, n) is an error."""
    codes = unpack_codes(data, count, rank_bits(m, n))
    if check and codes.numel() and int(codes.max()) >= math.comb(m, n):
        raise ArtifactError(f"mask rank code {int(codes.max())} is out of range for {n}:{m} (< {math.comb(m, n)})")
    return codes


# ----------------------------------------------------------------------------------------------- the mask


def encode_mask(mask: torch.Tensor, n: int, m: int) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
    """The (R, C) kept set as (encoding, stored bytes, group ranks): ("none", None, None) when all kept,
    ("rank", codes, ranks) when every group of m consecutive columns keeps exactly n (⌈log₂ C(m, n)⌉ bits a
    group, rows then groups), else ("bitmap", bits, None). The ranks let the caller gather a group's kept
    positions without a boolean index."""
    if bool(mask.all()):
        return "none", None, None
    ranks = _group_ranks(mask, n, m)
    if ranks is not None:
        return "rank", pack_codes(ranks, rank_bits(m, n)), ranks
    return "bitmap", pack_bits(mask), None


def decode_mask(encoding: str, data: torch.Tensor | None, shape: tuple[int, int], n: int, m: int) -> torch.Tensor:
    """Inverse of `encode_mask`: the (R, C) bool kept set."""
    R, C = shape
    if encoding == "none":
        return torch.ones(R, C, dtype=torch.bool, device=data.device if data is not None else "cpu")
    if data is None:
        raise ArtifactError(f"mask encoding {encoding!r} needs a mask tensor, none is stored")
    if encoding == "bitmap":
        return unpack_bits(data, R * C).view(R, C)
    if encoding != "rank" or C % m or not 0 < n < m:
        raise ArtifactError(f"mask encoding {encoding!r} is not known for {n}:{m} and {C} columns")
    bits_of = rank_tables(m, n, str(data.device)).bits_of
    return bits_of[unpack_rank_codes(data, R * C // m, n, m)].view(R, C)
