"""Reading an artifact (docs/artifact-format.md, "Verification"): verify everything before use, then iterate
its tensors, decode its compressed linears, or load it as a transformers model (dense or packed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from ..errors import ArtifactError, Pbs2pError
from ..skeleton import empty_causal_lm
from .kernel import KernelPlan, library, plan_for
from .linear import decode_linear, expected_tensors, linear_label
from .manifest import MANIFEST_FILE, SEP, file_sha256, nbytes, read_manifest, read_safetensors_header


@dataclass
class Artifact:
    """A verified artifact: its directory and manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def linears(self) -> dict[str, dict[str, Any]]:
        return self.manifest["linears"]

    def tensor_files(self) -> list[str]:
        return sorted({t["file"] for t in self.manifest["tensors"].values()})

    def names_in(self, fname: str) -> list[str]:
        return sorted(n for n, t in self.manifest["tensors"].items() if t["file"] == fname)


def _safe_name(path: Path, name: Any) -> Path:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise ArtifactError(f"{path / MANIFEST_FILE} lists a file {name!r} outside the artifact directory")
    return path / name


def verify_artifact(path: Path, check_hashes: bool = True) -> Artifact:
    """Check everything before use: the manifest (format, version), every file it lists (present, size,
    sha256), every safetensors header against the manifest's tensor table, and every compressed linear's
    tensors against its layout. Raises ArtifactError naming the file."""
    path = Path(path)
    manifest = read_manifest(path)
    mf = path / MANIFEST_FILE
    files: dict[str, Any] = manifest["files"]
    for fname in sorted(files):
        p = _safe_name(path, fname)
        info = files[fname]
        if not p.is_file():
            raise ArtifactError(f"{p} is missing (listed in {MANIFEST_FILE}); download the artifact again")
        size = p.stat().st_size
        if size != info.get("size"):
            raise ArtifactError(
                f"{p} has {size} bytes, {MANIFEST_FILE} says {info.get('size')}: truncated or changed; "
                f"download the artifact again"
            )
        if check_hashes and file_sha256(p) != info.get("sha256"):
            raise ArtifactError(f"{p} fails its sha256 check: the file is corrupted; download the artifact again")
    if "config.json" not in files:
        raise ArtifactError(f"{mf} does not list config.json; the artifact is incomplete")
    tensors: dict[str, Any] = manifest["tensors"]
    by_file: dict[str, dict[str, Any]] = {}
    for name, t in tensors.items():
        if not isinstance(t, dict) or t.get("file") not in files:
            raise ArtifactError(f"{mf}: tensor {name!r} lives in a file the manifest does not list")
        by_file.setdefault(t["file"], {})[name] = t
    for fname in sorted(by_file):
        p = path / fname
        header = read_safetensors_header(p)
        want = by_file[fname]
        extra, lacking = sorted(set(header) - set(want)), sorted(set(want) - set(header))
        if extra or lacking:
            raise ArtifactError(f"{p} holds tensors {extra[:3]} not in {MANIFEST_FILE} and lacks {lacking[:3]}")
        for name, t in want.items():
            h = header[name]
            if h["dtype"] != t.get("dtype") or list(h["shape"]) != list(t.get("shape", [])):
                raise ArtifactError(
                    f"{p}: tensor {name!r} is {h['dtype']} {h['shape']}, {MANIFEST_FILE} says "
                    f"{t.get('dtype')} {t.get('shape')}: wrong shape or type"
                )
    for lname, meta in manifest["linears"].items():
        fname = meta.get("file")
        try:
            want_l = expected_tensors(meta)
        except (KeyError, TypeError, ValueError, ArtifactError) as exc:
            raise ArtifactError(f"{mf}: linear {lname!r} has a malformed layout ({exc!r})") from None
        for field_, (dt, shape) in want_l.items():
            t = tensors.get(f"{lname}{SEP}{field_}")
            if t is None or t["file"] != fname:
                raise ArtifactError(f"{path / str(fname)} lacks the tensor {lname}{SEP}{field_}")
            if t["dtype"] != dt or list(t["shape"]) != shape:
                raise ArtifactError(
                    f"{path / fname}: tensor {lname}{SEP}{field_} is {t['dtype']} {t['shape']}; the linear's "
                    f"layout implies {dt} {shape}: wrong shape"
                )
        stray = [n for n in tensors if n.startswith(f"{lname}{SEP}") and n[len(lname) + 1 :] not in want_l]
        if stray:
            raise ArtifactError(f"{path / fname} holds {stray[0]!r}, which the linear's layout does not have")
    return Artifact(path, manifest)


def _open_file(art: Artifact, fname: str) -> Iterator[tuple[str, torch.Tensor]]:
    with safe_open(art.path / fname, framework="pt") as f:
        for name in art.names_in(fname):
            yield name, f.get_tensor(name)


def iter_files(art: Artifact) -> Iterator[tuple[str, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]]:
    """Per tensor file: (file name, uncompressed tensors by name, packed fields by linear weight name)."""
    for fname in art.tensor_files():
        plain: dict[str, torch.Tensor] = {}
        packed: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in _open_file(art, fname):
            base, sep, field_ = name.partition(SEP)
            if sep and base in art.linears:
                packed.setdefault(base, {})[field_] = t
            else:
                plain[name] = t
        yield fname, plain, packed


def _decode_checked(art: Artifact, fname: str, name: str, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
    try:
        return decode_linear(fields, art.linears[name])
    except ArtifactError as exc:
        raise ArtifactError(f"{art.path / fname}: {name}: {exc}") from None


def iter_dense(art: Artifact) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Per tensor file: every tensor by name, compressed linears decoded to Ŵ (compute dtype)."""
    for fname, plain, packed in iter_files(art):
        out = dict(plain)
        for name, fields in packed.items():
            out[name] = _decode_checked(art, fname, name, fields)
        yield fname, out


def dense_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a verified artifact, compressed linears decoded (what a dense checkpoint holds)."""
    art = verify_artifact(path)
    out: dict[str, torch.Tensor] = {}
    for _, ts in iter_dense(art):
        out.update(ts)
    return out


_KERNEL_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


class PackedLinear(nn.Module):
    """A linear layer that keeps its packed code (uint8 bit streams, fp16 scales) as buffers, so its resident
    memory is the artifact's bytes, not R × C floats. On the CPU it computes with the packed kernel
    (`kernel.py`: a fused GEMV for a few rows, a tile-wise decode + BLAS matmul for more); elsewhere, or
    without the kernel, it decodes Ŵ in torch at every call. Both give F.linear(x, Ŵ) up to float rounding."""

    def __init__(self, meta: Mapping[str, Any], fields: Mapping[str, torch.Tensor], bias: torch.Tensor | None = None):
        super().__init__()
        self.meta = dict(meta)
        self.out_features, self.in_features = (int(x) for x in meta["shape"])
        self.fields = sorted(fields)
        for f in self.fields:
            self.register_buffer(self._buf(f), fields[f])
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self._plan: tuple[tuple[int, ...], KernelPlan | None] | None = None  # built at the first CPU call

    @staticmethod
    def _buf(field_: str) -> str:
        return "packed_" + field_.replace(".", "__")

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> PackedLinear:
        """`model.to(dtype)`, `.half()`: the packed code keeps its storage dtypes (casting the stored scales would
        round them and change Ŵ); moves to another device apply, and the bias follows the cast."""
        before = {n: b for n, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for n, old in before.items():
            new = self._buffers[n]
            if new is not None and new.dtype != old.dtype:
                self._buffers[n] = old.to(new.device)
        return self

    def packed(self) -> dict[str, torch.Tensor]:
        return {f: getattr(self, self._buf(f)) for f in self.fields}

    def decode(self, check: bool = False) -> torch.Tensor:
        return decode_linear(self.packed(), self.meta, check)

    def resident_bytes(self) -> int:
        """Bytes held by the packed code (the bias, if any, is not part of the compressed weight)."""
        return sum(nbytes(t) for t in self.packed().values())

    def kernel_plan(self) -> KernelPlan | None:
        """The CPU kernel's plan for the current buffers (rebuilt when they move, are replaced or written in
        place), or None."""
        if library() is None:  # not built, or switched off (`kernel.use_kernel(False)`)
            return None
        bufs = self._buffers  # moved, replaced or written in place: another key
        key = tuple(x for t in bufs.values() if t is not None for x in (t.data_ptr(), t._version))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, plan_for(self.meta, self.packed()))
        return self._plan[1]

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy, pickle: the plan points into these buffers
        state = self.__dict__.copy()
        state["_plan"] = None
        return state

    def kernel_bytes(self) -> int:
        """Bytes the kernel's plan adds to the packed code (index arrays; 0 without the kernel)."""
        plan = self.kernel_plan()
        return plan.extra_bytes if plan is not None else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plan = None
        if x.device.type == "cpu" and x.dtype in _KERNEL_INPUTS and not (x.requires_grad and torch.is_grad_enabled()):
            plan = self.kernel_plan()
        if plan is None:
            return F.linear(x, self.decode().to(x.dtype), self.bias)
        bias = self.bias.to(torch.float32) if self.bias is not None else None
        y = plan.linear(x.reshape(-1, self.in_features).to(torch.float32), bias)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, pattern={linear_label(self.meta)}"


def load_artifact(
    path: Path,
    mode: str = "dense",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A transformers causal LM from a verified artifact (every sha256 checked first).

    mode "dense": compressed linears decoded once into ordinary weights; "packed": they become `PackedLinear`
    modules that decode per forward call. Both compute with exactly the stored Ŵ."""
    if mode not in ("dense", "packed"):
        raise Pbs2pError(f"load mode {mode!r} is not known; use 'dense' or 'packed'")
    art = verify_artifact(path)
    path = art.path
    try:
        config = AutoConfig.from_pretrained(path)  # never trust_remote_code
        if hasattr(config, "quantization_config"):  # for transformers' from_pretrained (pbs2p.hf), not this model
            del config.quantization_config
        model: Any = empty_causal_lm(config, dtype)  # parameters on meta, no double allocation
    except (ValueError, OSError, KeyError) as exc:
        raise ArtifactError(f"{path / 'config.json'} does not describe a model transformers can build: {exc}") from None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for fname, plain, packed in iter_files(art):
        sd: dict[str, torch.Tensor] = {}
        for name, t in plain.items():
            if name not in expected:
                raise ArtifactError(f"{path / fname}: tensor {name!r} is not a parameter of this {config.model_type}")
            if tuple(t.shape) != expected[name]:
                raise ArtifactError(
                    f"{path / fname}: tensor {name!r} has shape {list(t.shape)}, the model's config.json "
                    f"implies {list(expected[name])}: wrong shape"
                )
            sd[name] = t.to(dtype) if t.is_floating_point() else t
        for name, fields in packed.items():
            meta = art.linears[name]
            if name not in expected or tuple(meta["shape"]) != expected[name]:
                raise ArtifactError(
                    f"{path / fname}: compressed linear {name!r} has shape {meta['shape']}, the model's "
                    f"config.json implies {list(expected.get(name, ()))}: wrong shape"
                )
            w = _decode_checked(art, fname, name, fields)  # full check once, also in packed mode
            if mode == "dense":
                sd[name] = w.to(dtype)
        model.load_state_dict(sd, strict=False, assign=True)
        if mode == "packed":
            for name, fields in packed.items():
                mod_name = name.removesuffix(".weight")
                parent_name, _, child = mod_name.rpartition(".")
                parent = model.get_submodule(parent_name)
                lin = getattr(parent, child)
                bias = lin.bias if isinstance(lin, nn.Linear) and lin.bias is not None else None
                if bias is not None and bias.is_meta:
                    raise ArtifactError(f"{path / fname}: the bias of {mod_name} is missing")
                setattr(parent, child, PackedLinear(art.linears[name], fields, bias))
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise ArtifactError(f"{path / MANIFEST_FILE}: the artifact lacks tensors {missing[:5]}; it is incomplete")
    return model.to(device).eval()


def is_artifact(path: Path) -> bool:
    """Whether `path` holds a manifest (a complete artifact, or a damaged one: `verify_artifact` tells)."""
    return (Path(path) / MANIFEST_FILE).is_file()
