"""A plain transformers checkpoint from an artifact: compressed linears decoded to Ŵ."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..errors import Pbs2pError
from .loader import iter_dense, verify_artifact
from .manifest import nbytes


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
            total += sum(nbytes(t) for t in ts.values())
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
