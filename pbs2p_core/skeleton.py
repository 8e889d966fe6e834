"""A causal LM built from its config with parameters on the meta device (no memory) and real buffers."""

from __future__ import annotations

import threading
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

# accelerate's init_empty_weights patches nn.Module.register_parameter for the whole process and restores it
# on exit. Two threads (two jobs in one process) interleaving patch and restore would leave the patch on for
# good, and every module built afterwards would silently get meta parameters. One build at a time.
_LOCK = threading.Lock()


def empty_causal_lm(config: Any, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`AutoModelForCausalLM.from_config(config)` with meta parameters; buffers (rotary inv_freq) are real."""
    with _LOCK, init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)  # never trust_remote_code
