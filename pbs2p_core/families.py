"""Model-family knowledge in one table: where the decoder blocks are and which linears each holds.

A new family is one entry. `model_type` is the `config.json` field.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import Pbs2pError

# groups of linears that read the same input, in forward order
LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class Family:
    base: str = "model"  # attribute of the *ForCausalLM holding the decoder stack
    layers: str = "layers"  # attribute of `base` holding the decoder blocks (an nn.ModuleList)
    groups: tuple[tuple[str, ...], ...] = LLAMA_GROUPS  # compressed linears, relative to a block

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(name for group in self.groups for name in group)

    def layer_prefix(self, index: int) -> str:
        """Checkpoint key prefix of block `index`, e.g. 'model.layers.3.'."""
        return f"{self.base}.{self.layers}.{index}."


FAMILIES: dict[str, Family] = {
    "llama": Family(),
    "mistral": Family(),
    "qwen2": Family(),
    "qwen3": Family(),
    "gemma2": Family(),
    "gemma3_text": Family(),
}


def family_for(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise Pbs2pError(
            f"model type {model_type!r} is not supported yet; supported: {', '.join(sorted(FAMILIES))} "
            "(a new family is one entry in pbs2p_core/families.py)"
        ) from None
