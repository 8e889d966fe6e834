"""Bit accounting of a compressed linear, from its codes: the paper's W-bits and the true storage.

True bits count everything the artifact must store: sign bits of kept weights, the residual sign plane of
the salient columns, the N:M mask (rank code or bitmap, whichever is smaller), every scale at 16 bits, and
the salient column indices (one byte each). The paper's count is signs only (kept + residual plane).
An integer code (method gptq) counts its codes as `sign_bits` (bits per weight), its scales and zero points as
`scale_bits` (zero points at the code width) and its columns' group indices (act-order) as `index_bits`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .binarize import BlockCode
from .gptq import IntCode

SCALE_BITS = 16
INDEX_BITS = 8


@dataclass
class BitCount:
    weights: int = 0
    sign_bits: int = 0  # first plane, kept weights only
    residual_bits: int = 0  # second plane of salient columns, kept weights only
    mask_bits: int = 0
    scale_bits: int = 0
    index_bits: int = 0

    def add(self, other: BitCount) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)

    @property
    def paper_bits(self) -> float:
        return (self.sign_bits + self.residual_bits) / max(self.weights, 1)

    @property
    def true_bits(self) -> float:
        total = self.sign_bits + self.residual_bits + self.mask_bits + self.scale_bits + self.index_bits
        return total / max(self.weights, 1)

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "paper_bits": self.paper_bits, "true_bits": self.true_bits}


def count_bits(blocks: list[BlockCode], n_keep: int, m: int, mask_bits_per_group: int) -> BitCount:
    c = BitCount()
    for b in blocks:
        R, C = b.mask.shape
        c.weights += R * C
        c.sign_bits += int(b.mask.sum())
        c.residual_bits += int(b.mask[:, b.salient].sum()) if b.salient.numel() else 0
        c.mask_bits += 0 if n_keep >= m else R * (C // m) * mask_bits_per_group
        c.scale_bits += sum(s.numel() for s in b.scales.values()) * SCALE_BITS
        c.index_bits += b.salient.numel() * INDEX_BITS
    return c


def count_int_bits(code: IntCode) -> BitCount:
    R, C = code.codes.shape
    G = code.groups
    zero_bits = 0 if code.sym else R * G * code.bits
    index_bits = C * max(1, (G - 1).bit_length()) if code.g_idx is not None else 0
    return BitCount(R * C, R * C * code.bits, 0, 0, R * G * SCALE_BITS + zero_bits, index_bits)
