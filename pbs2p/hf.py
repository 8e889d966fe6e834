"""`import pbs2p.hf` registers pbs2p's artifact format with transformers (`pbs2p.core.hf`): afterwards
`AutoModelForCausalLM.from_pretrained(artifact_dir)` loads an artifact with its compressed linears packed."""

from pbs2p.core.hf import PackedSlot, Pbs2pConfig, Pbs2pHfQuantizer, register

__all__ = ["PackedSlot", "Pbs2pConfig", "Pbs2pHfQuantizer", "register"]
