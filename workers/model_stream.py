"""A causal LM streamed from safetensors one decoder block at a time: a meta skeleton, the embedding pass that
captures block 0's inputs and each block's keyword arguments, and a block loaded, run and unloaded.

Peak memory: one block + the calibration activations (+ the embedding, to make the block-0 inputs).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig

from pbs2p.core.errors import Pbs2pError
from pbs2p.core.families import Family, family_for
from pbs2p.core.format import MANIFEST_FILE
from pbs2p.core.skeleton import empty_causal_lm

from .weights import WeightReader


class _Stop(Exception):
    """Raised by the last recorder: the capture forward needs no more of the model."""


class _Recorder(nn.Module):
    """Stands in for decoder block `index` during capture: records its inputs' keyword arguments
    (attention mask, position embeddings: they differ per layer type, e.g. sliding vs full in Gemma)."""

    def __init__(self, index: int, last: bool, capture: Capture) -> None:
        super().__init__()
        self.index, self.last, self.capture = index, last, capture

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        key = (self.index, hidden_states.shape[0])
        self.capture.kwargs.setdefault(key, kwargs)
        if self.index == 0:
            self.capture.inputs.append(hidden_states.detach())
        if self.last:
            raise _Stop
        return hidden_states


@dataclass
class Capture:
    inputs: list[torch.Tensor] = field(default_factory=list)
    kwargs: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)


class BlockModel:
    """A causal LM whose decoder blocks are loaded from safetensors one at a time."""

    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        self.dir = Path(model_dir)
        if (self.dir / MANIFEST_FILE).is_file():
            raise Pbs2pError(
                f"{self.dir} is a compressed pbs2p artifact, not a source model; compress the original model "
                f"(or turn the artifact into a plain checkpoint with `pbs2p export-dense`)"
            )
        self.device = torch.device(device)
        self.config = AutoConfig.from_pretrained(self.dir)  # never trust_remote_code
        self.family: Family = family_for(self.config.model_type)
        self.model = empty_causal_lm(self.config)  # parameters on meta; buffers (rotary inv_freq) real
        self.reader = WeightReader(self.dir)
        self.base = getattr(self.model, self.family.base)
        self.blocks: list[nn.Module] = list(getattr(self.base, self.family.layers))
        self.layer_root = f"{self.family.base}.{self.family.layers}."

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def rest_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor outside the decoder blocks (embeddings, final norm, head), as stored."""
        return self.reader.load([n for n in self.reader.names() if not n.startswith(self.layer_root)])

    def capture(self, calib: torch.Tensor, batch_size: int) -> Capture:
        """Inputs of block 0 and each block's keyword arguments, per calibration batch."""
        rest = {k: v.to(torch.float32) for k, v in self.rest_tensors().items()}
        self.model.load_state_dict(rest, strict=False, assign=True)
        for name, child in self.base.named_children():
            if name != self.family.layers:
                child.to(self.device)
        capture = Capture()
        L = self.num_blocks
        setattr(self.base, self.family.layers, nn.ModuleList(_Recorder(i, i == L - 1, capture) for i in range(L)))
        try:
            with torch.no_grad():
                for batch in calib.split(batch_size):
                    with contextlib.suppress(_Stop):
                        self.base(input_ids=batch.to(self.device), use_cache=False)
        finally:
            setattr(self.base, self.family.layers, nn.ModuleList(self.blocks))
            for name, child in self.base.named_children():  # free the embedding: only inputs are needed
                if name != self.family.layers:
                    child.to("meta")
        return capture

    def read_block(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s weights as stored, by name within the block (may run in another thread)."""
        return self.reader.load_prefix(f"{self.layer_root}{index}.")

    def load_block(self, index: int, weights: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Block `index` with its FP weights (`weights`: what `read_block` gave, else read now)."""
        block = self.blocks[index]
        weights = self.read_block(index) if weights is None else weights
        sd = {k: v.to(torch.float32) for k, v in weights.items()}
        block.load_state_dict(sd, strict=True, assign=True)
        return block.to(self.device).eval()

    def unload_block(self, index: int) -> None:
        self.blocks[index].to("meta")

    @torch.no_grad()
    def run_block(
        self, index: int, block: nn.Module, inputs: list[torch.Tensor], capture: Capture
    ) -> list[torch.Tensor]:
        return [block(x, **capture.kwargs[(index, x.shape[0])]) for x in inputs]


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc
        return None


def release_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed blocks of tensors in its arenas, so without
    this a job's resident memory creeps up block after block (fragmentation, not data: measured +25 MB per
    block on a 512-wide model), and the peak would grow with the number of blocks."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
