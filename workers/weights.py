"""Reading a Hugging Face safetensors checkpoint tensor by tensor (never the whole model at once)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from pbs2p.core.errors import Pbs2pError


class WeightReader:
    """Lazy access to the tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            self.files: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            shards = sorted(self.dir.glob("*.safetensors"))
            if not shards:
                raise Pbs2pError(f"{self.dir} holds no *.safetensors file; give a safetensors checkpoint")
            self.files = {}
            for shard in shards:
                with safe_open(shard, framework="pt") as f:
                    self.files.update({k: shard.name for k in f.keys()})  # noqa: SIM118

    def names(self) -> list[str]:
        return sorted(self.files)

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        for fname, keys in sorted(by_file.items()):
            with safe_open(self.dir / fname, framework="pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out

    def load_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose name starts with `prefix`, keyed by the rest of the name."""
        names = [n for n in self.files if n.startswith(prefix)]
        if not names:
            raise Pbs2pError(f"{self.dir}: no tensor named {prefix}*; is this checkpoint of the declared model type?")
        return {n[len(prefix) :]: t for n, t in self.load(names).items()}
