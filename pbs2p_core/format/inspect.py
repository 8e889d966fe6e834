"""`pbs2p inspect`: bit accounting from the bytes actually written (docs/artifact-format.md, "Bits")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import method_label
from ..errors import ArtifactError
from .linear import linear_bits, linear_label
from .loader import verify_artifact
from .manifest import MANIFEST_FILE, SEP, read_safetensors_header, totals


def inspect_artifact(path: Path) -> dict[str, Any]:
    """Bit accounting from the bytes actually written: per compressed linear and in total, weights, the
    paper's W-bits (sign planes), true bits = stored bytes × 8 / weights, ratio to fp16. Verifies first."""
    art = verify_artifact(path)
    m = art.manifest
    nbytes: dict[str, int] = {}
    file_bytes = 0
    headers = 0
    for fname in art.tensor_files():
        p = art.path / fname
        header = read_safetensors_header(p)
        file_bytes += p.stat().st_size
        data = 0
        for name, h in header.items():
            start, end = h["data_offsets"]
            data += end - start
            base, sep, _ = name.partition(SEP)
            if sep and base in art.linears:
                nbytes[base] = nbytes.get(base, 0) + end - start
        headers += p.stat().st_size - data
    formula: dict[str, dict[str, Any]] = {}
    for b in m.get("report", {}).get("blocks", []):
        for lr in b.get("linears", []):
            formula[f"{lr['name']}.weight"] = lr.get("bits", {})
    layers = []
    for name in sorted(art.linears):
        meta = art.linears[name]
        bits = linear_bits(meta, nbytes.get(name, 0))
        if bits["bytes"] != meta.get("bytes"):
            raise ArtifactError(
                f"{art.path / meta['file']}: {name} holds {bits['bytes']} bytes, manifest {meta['bytes']}"
            )
        f = formula.get(name, {})
        layers.append(
            {
                "name": name.removesuffix(".weight"),
                "shape": meta["shape"],
                "pattern": linear_label(meta),
                **bits,
                "ratio_fp16": 16 / bits["true_bits"],
                "formula_true_bits": f.get("true_bits"),
            }
        )
    total = totals(art.linears, m["tensors"])
    other = sum(info["size"] for fname, info in m["files"].items() if fname not in set(art.tensor_files()))
    return {
        "path": str(art.path),
        "format": m["format"],
        "format_version": m["format_version"],
        "model_type": m.get("model_type"),
        "config": m.get("config", {}),
        "layers": layers,
        "total": {**total, "formula_true_bits": (m.get("report", {}).get("bits") or {}).get("true_bits")},
        "files": {
            "count": len(m["files"]) + 1,
            "tensor_file_bytes": file_bytes,
            "safetensors_header_bytes": headers,
            "other_file_bytes": other + (art.path / MANIFEST_FILE).stat().st_size,
        },
    }


def format_inspect(info: dict[str, Any]) -> str:
    """The human-readable table of `pbs2p inspect`."""
    rows = [("layer", "shape", "N:M", "weights", "bytes", "paper bits", "true bits", "vs fp16")]
    for lay in info["layers"]:
        rows.append(
            (
                lay["name"],
                "x".join(str(x) for x in lay["shape"]),
                lay["pattern"],
                str(lay["weights"]),
                str(lay["bytes"]),
                f"{lay['paper_bits']:.3f}",
                f"{lay['true_bits']:.3f}",
                f"{lay['ratio_fp16']:.2f}x",
            )
        )
    t = info["total"]
    rows.append(
        (
            f"total ({t['linears']} compressed linears)",
            "",
            "",
            str(t["weights"]),
            str(t["bytes"]),
            f"{t['paper_bits']:.3f}",
            f"{t['true_bits']:.3f}",
            f"{t['ratio_fp16']:.2f}x" if t["linears"] else "-",
        )
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.insert(len(lines) - 1, "-" * len(lines[0]))
    f = info["files"]
    cfg = info.get("config", {})
    lines.append(
        f"artifact {info['path']}: format v{info['format_version']}, {info['model_type']}, method "
        f"{method_label(cfg)}; uncompressed tensors {t['uncompressed_tensors']} "
        f"({t['uncompressed_bytes'] / 2**20:.1f} MiB); tensor files {f['tensor_file_bytes'] / 2**20:.1f} MiB"
    )
    lines.append(
        "true bits = bytes stored for the linear x 8 / its weights; paper bits = sign planes only (integer codes: "
        "code bits)"
    )
    return "\n".join(lines)
