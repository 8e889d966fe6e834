"""Fast CPU inference on packed linears: a small C++ library (`packed_kernel.cpp`, `.h`) compiled on first use with the
system C++ compiler and loaded with ctypes (no Python headers, no ninja), and the per-linear plan it reads.

Two paths, chosen by the number of input rows: up to `GEMV_ROWS` rows (decoding a token) a fused kernel reads
the packed bits row by row and sums ±x per column block with the block's scales (~0.29 bytes a weight instead of
fp32's 4; for m = 8 rank codes no tables: 4 groups' codes give 32 columns' sign bits, which mask the adds of x),
on torch.get_num_threads() threads of its own pool; more rows (prefill) decode a tile of Ŵ at a time into a
reused float32 buffer, bit-exactly `decode_linear`, and call the BLAS matmul. Both equal F.linear(x, Ŵ) up to
float rounding. A plan's per-linear state (descriptor, salient positions) is built once in C++ (`Plan`).

When the library cannot be built (no compiler, an unwritable cache) PackedLinear falls back to decoding Ŵ in
torch at every call, with one warning; the result is the same up to float rounding. The library is built
into `$TORCH_EXTENSIONS_DIR` (default ~/.cache/torch_extensions) under a name that hashes the source, the
compiler's command line and the CPU's flags, so a machine never loads a build made for another one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .bitpack import decode_mask, rank_bits, rank_tables

SOURCE = Path(__file__).with_name("packed_kernel.cpp")
HEADER = SOURCE.with_suffix(".h")  # included by the source
GEMV_ROWS = 8  # at most this many input rows: the fused kernel; more: tile decode + BLAS
TILE_FLOATS = 1 << 22  # a prefill tile of Ŵ: at most 16 MiB of float32 (at least one chunk of rows)
CHUNK = 16  # rows of W per unit of parallel work (sign offsets are stored per chunk)
PARALLEL_WEIGHTS = 1 << 17  # smaller linears run on one thread
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off"]
ROLES = ("alpha", "mu", "alpha_s", "mu_s", "alpha_r", "mu_r", "alpha_col")
_SCALE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_P = {  # indices of the descriptor, as packed_kernel.cpp's enum says
    k: i
    for i, k in enumerate(
        [
            "R",
            "C",
            "N",
            "M",
            "MASK_KIND",
            "RANK_BITS",
            "NBLOCKS",
            "CHUNK",
            "MASK",
            "SIGN",
            "SIGN2",
            "DEP",
            "BITMAP_OF",
            "BLOCK_OFF",
            "SAL_OFF",
            "SAL_COLS",
            "SIGN_START",
            "SIGN2_START",
            "MASK_LEN",
            "SIGN_LEN",
            "SIGN2_LEN",
            "NTHREADS",
            "DEP2",
            "SCALES",
        ]
    )
}
P_SIZE = _P["SCALES"] + 3 * len(ROLES)
_MASK_KINDS = {"none": 0, "rank": 1, "bitmap": 2}

_state: dict[str, Any] = {"lib": None, "tried": False, "enabled": True}
_lock = threading.Lock()
_workspace = threading.local()


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    base = os.environ.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache" / "torch_extensions")
    return Path(base) / "pbs2p_packed_kernel"


def _compile(cxx: str, out_dir: Path, native: bool = True) -> Path:
    """Compile the library (with -march=native where the compiler takes it, unless `native` is False: the
    portable build, no AVX-512/AVX2/BMI2 code) into out_dir; return its path."""
    src = SOURCE.read_bytes() + HEADER.read_bytes()
    errors = []
    for extra in (["-march=native"], []) if native else ([],):
        cmd = [cxx, *FLAGS, *extra]
        key = hashlib.sha256(src + repr(cmd).encode() + _cpu_flags().encode() + platform.machine().encode())
        lib = out_dir / f"pbs2p_packed_{key.hexdigest()[:16]}.so"
        if lib.is_file():
            return lib
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            proc = subprocess.run([*cmd, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                os.replace(tmp, lib)  # atomic: a concurrent build of the same key writes the same file
                return lib
            errors.append(proc.stderr.strip()[:2000])
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("; ".join(errors))


def load_library(cxx: str | None = None, out_dir: Path | None = None, native: bool = True) -> ctypes.CDLL | None:
    """Build (once, cached on disk) and load the kernel library; None with a warning when that fails."""
    cxx = cxx or os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    try:
        lib = ctypes.CDLL(str(_compile(cxx, out_dir or build_dir(), native)))
        if lib.pbs2p_p_size() != P_SIZE:
            raise RuntimeError(f"descriptor size {lib.pbs2p_p_size()} != {P_SIZE}: source and wrapper disagree")
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        warnings.warn(
            f"pbs2p: the packed CPU kernel could not be built with {cxx!r} ({str(exc)[:500]}); packed linears "
            "decode their weight in torch at every call instead (same results, much slower). Install a C++ "
            "compiler (g++) or set CXX.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    for name in ("pbs2p_decode_rows", "pbs2p_gemv"):
        getattr(lib, name).restype = ctypes.c_int
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.pbs2p_decode_rows.argtypes = [ptr, i64, i64, ptr, i64]
    lib.pbs2p_gemv.argtypes = [ptr, ptr, i64, i64, ptr, i64]
    lib.pbs2p_plan_new.restype, lib.pbs2p_plan_new.argtypes = ptr, [ptr]
    lib.pbs2p_plan_free.restype, lib.pbs2p_plan_free.argtypes = None, [ptr]
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first use), or None when disabled or it cannot be built."""
    if not _state["enabled"]:
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                _state["lib"] = load_library()
                _state["tried"] = True
    return _state["lib"]


@contextmanager
def use_kernel(enabled: bool) -> Iterator[None]:
    """Run PackedLinear with (True) or without (False: decode in torch at every call) the kernel."""
    old = _state["enabled"]
    _state["enabled"] = enabled
    try:
        yield
    finally:
        _state["enabled"] = old


@functools.lru_cache(maxsize=64)
def _rank_luts(m: int, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rank -> bitmap, (rank << n | kept signs) -> positional signs or None when too big), uint16, for every
    code of the rank's width (codes >= C(m, n) map to an empty group; verification refuses them anyway)."""
    b = rank_bits(m, n)
    bitmap_of = torch.zeros(1 << b, dtype=torch.int64)
    bitmap_of[: math.comb(m, n)] = rank_tables(m, n).bitmap_of
    dep = None
    if (1 << (b + n)) <= 1 << 16:
        pos = torch.zeros(1 << b, n, dtype=torch.int64)
        pos[: math.comb(m, n)] = rank_tables(m, n).pos_of
        sb = torch.arange(1 << n)
        on = (sb[:, None] >> torch.arange(n)) & 1  # (2^n, n): which kept weight is +1
        dep = (on[None, :, :] << pos[:, None, :]).sum(-1)  # (codes, 2^n)
        dep = torch.where(torch.arange(1 << b)[:, None] < math.comb(m, n), dep, 0).reshape(-1)
        dep = dep.to(torch.int32).to(torch.uint16)
    return bitmap_of.to(torch.int32).to(torch.uint16), dep


@functools.lru_cache(maxsize=64)
def _rank_luts8(n: int) -> torch.Tensor:
    """For m = 8: (rank << n | kept signs) -> kept-and-positive bits | kept-and-negative bits << 8, uint16."""
    bitmap_of, dep = _rank_luts(8, n)
    assert dep is not None  # 2^(7 + 7) entries at most
    bm = bitmap_of.to(torch.int32).repeat_interleave(1 << n)
    pos = dep.to(torch.int32)
    return (pos | ((bm & ~pos) << 8)).to(torch.uint16)


def _block_scale_offsets(spec: Mapping[str, Any], R: int, widths: list[int], want_col: bool) -> list[int] | None:
    """Per block, where its values start in the stored scale (-1: absent); None when a shape is not per row
    (per column for alpha_col), which the kernel does not read."""
    layout = spec["layout"]
    shapes = [[R]] * len(widths) if layout == "row" else [[w] for w in widths] if layout == "col" else layout
    out, at = [], 0
    for shp, w in zip(shapes, widths, strict=True):
        if shp is None:
            out.append(-1)
            continue
        if list(shp) != ([w] if want_col else [R]):
            return None
        out.append(at)
        at += math.prod(shp)
    return out


class KernelPlan:
    """What the kernel reads for one packed linear: the descriptor and the small index arrays it points to
    (block and salient offsets, sign offsets per chunk of rows, per-block scale offsets). The rank tables are
    shared by all linears of a pattern. `extra_bytes` counts what a linear adds to its packed bytes."""

    def __init__(self, lib: ctypes.CDLL, meta: Mapping[str, Any], fields: Mapping[str, torch.Tensor]) -> None:
        # the library is not kept: a model with plans stays deep-copyable and picklable (ctypes handles are not)
        R, C = (int(v) for v in meta["shape"])
        n, m = int(meta["n_keep"]), int(meta["m"])
        widths, ks = [int(w) for w in meta["blocks"]], [int(k) for k in meta["salient"]]
        self.R, self.C = R, C
        kind = _MASK_KINDS[meta["mask"]]
        keep: dict[str, torch.Tensor] = {}  # every tensor the descriptor points to, kept alive with the plan
        P = torch.zeros(P_SIZE, dtype=torch.int64)

        def ptr(name: str, t: torch.Tensor) -> int:
            keep[name] = t.contiguous()
            return keep[name].data_ptr()

        P[_P["R"]], P[_P["C"]], P[_P["N"]], P[_P["M"]] = R, C, n, m
        P[_P["MASK_KIND"]], P[_P["NBLOCKS"]], P[_P["CHUNK"]] = kind, len(widths), CHUNK
        mask = decode_mask(meta["mask"], fields.get("mask"), (R, C), n, m)
        if kind == 1:
            P[_P["RANK_BITS"]] = rank_bits(m, n)
            bitmap_of, dep = _rank_luts(m, n)
            P[_P["BITMAP_OF"]] = ptr("bitmap_of", bitmap_of)
            P[_P["DEP"]] = ptr("dep", dep) if dep is not None else 0
            if m == 8:
                P[_P["DEP2"]] = ptr("dep2", _rank_luts8(n))
        for f, key in (("mask", "MASK"), ("sign", "SIGN"), ("sign2", "SIGN2")):
            t = fields.get(f, torch.zeros(1, dtype=torch.uint8))
            P[_P[key]], P[_P[f"{key}_LEN"]] = ptr(f, t), t.numel()
        offsets = [0, *torch.tensor(widths).cumsum(0).tolist()]
        P[_P["BLOCK_OFF"]] = ptr("block_off", torch.tensor(offsets, dtype=torch.int64))
        P[_P["SAL_OFF"]] = ptr("sal_off", torch.tensor([0, *torch.tensor(ks).cumsum(0).tolist()], dtype=torch.int64))
        sal = fields["salient"].long() if sum(ks) else torch.zeros(0, dtype=torch.int64)
        gsal = sal + torch.repeat_interleave(torch.tensor(offsets[:-1]), torch.tensor(ks))
        P[_P["SAL_COLS"]] = ptr("sal_cols", gsal if gsal.numel() else torch.zeros(1, dtype=torch.int64))
        starts = torch.arange(0, R + CHUNK, CHUNK).clamp(max=R)  # first row of every chunk (and one past)

        def per_chunk(counts: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])[starts]

        P[_P["SIGN_START"]] = ptr("sign_start", per_chunk(mask.sum(1)))
        P[_P["SIGN2_START"]] = ptr("sign2_start", per_chunk(mask[:, gsal].sum(1)))
        have: dict[str, list[int]] = {}
        for i, role in enumerate(ROLES):
            spec = meta["scales"].get(role)
            if spec is None:
                continue
            offs = _block_scale_offsets(spec, R, widths, role == "alpha_col")
            if offs is None:
                raise ValueError(f"scale {role!r} has a layout the kernel does not read")
            have[role] = offs
            base = _P["SCALES"] + 3 * i
            P[base] = ptr(f"scale.{role}", fields[f"scale.{role}"])
            P[base + 1] = _SCALE_CODES[fields[f"scale.{role}"].dtype]
            P[base + 2] = ptr(f"offs.{role}", torch.tensor(offs, dtype=torch.int64))
        for b, k in enumerate(ks):  # every block has what BlockCode.dense reads for it
            on = {role for role, offs in have.items() if offs[b] >= 0}
            if "alpha" not in on or not on & {"mu", "alpha_col"} or (k and "alpha_r" not in on):
                raise ValueError(f"block {b} lacks a scale the decoder needs")
            if k and ("alpha_s" in on) != ("mu_s" in on):
                raise ValueError(f"block {b} has only one of alpha_s, mu_s")
        self.P, self.keep = P, keep
        self.small = R * C < PARALLEL_WEIGHTS  # a thread's start costs more than the work
        # what gemv reads besides x, decoded once (C++ `Plan`; freed with this object)
        self._handle = lib.pbs2p_plan_new(P.data_ptr())
        self._gemv, self._decode = lib.pbs2p_gemv, lib.pbs2p_decode_rows
        weakref.finalize(self, lib.pbs2p_plan_free, self._handle)
        self.extra_bytes = P.numel() * 8 + sum(
            t.numel() * t.element_size()
            for k, t in keep.items()
            if k.startswith(("block_", "sal_", "sign_st", "sign2_st", "offs"))
        )

    def decode_rows(self, r0: int, r1: int, out: torch.Tensor) -> None:
        """Rows [r0, r1) of Ŵ into `out` ((r1 - r0, C) float32, rows contiguous), bit-exactly decode_linear."""
        if r0 % CHUNK or out.dtype != torch.float32 or out.stride(1) != 1 or out.shape != (r1 - r0, self.C):
            raise ValueError("decode_rows needs a chunk-aligned start and a (rows, C) float32 buffer")
        self.P[_P["NTHREADS"]] = 1 if self.small else torch.get_num_threads()
        if self._decode(self.P.data_ptr(), r0, r1, out.data_ptr(), out.stride(0)):
            raise RuntimeError("pbs2p_decode_rows failed")

    def dense(self) -> torch.Tensor:
        out = torch.empty(self.R, self.C)
        self.decode_rows(0, self.R, out)
        return out

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, C) float32 -> x Ŵᵀ (rows, R) straight from the packed bits."""
        x = x.contiguous()
        y = torch.empty(x.shape[0], self.R)
        threads = 1 if self.small else torch.get_num_threads()
        if self._gemv(self._handle, x.data_ptr(), x.shape[0], x.stride(0), y.data_ptr(), threads):
            raise RuntimeError("pbs2p_gemv failed")
        return y

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, Ŵ, bias) for float32 x of shape (rows, C): the fused kernel for few rows, else tiles."""
        if x.shape[0] <= GEMV_ROWS:
            y = self.gemv(x)
            return y.add_(bias) if bias is not None else y
        tile = max(CHUNK, TILE_FLOATS // max(self.C, 1) // CHUNK * CHUNK)
        buf = _buffer(min(tile, self.R) * self.C)
        if tile >= self.R:
            w = buf[: self.R * self.C].view(self.R, self.C)
            self.decode_rows(0, self.R, w)
            return F.linear(x, w, bias)
        y = torch.empty(x.shape[0], self.R)
        for r0 in range(0, self.R, tile):
            r1 = min(r0 + tile, self.R)
            w = buf[: (r1 - r0) * self.C].view(r1 - r0, self.C)
            self.decode_rows(r0, r1, w)
            y[:, r0:r1] = F.linear(x, w, bias[r0:r1] if bias is not None else None)
        return y


def _buffer(numel: int) -> torch.Tensor:
    """A float32 workspace of at least `numel` values, reused by every linear of this thread."""
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel)
        _workspace.buf = buf
    return buf


def supported(meta: Mapping[str, Any]) -> bool:
    """Whether the kernel decodes this layout exactly as BlockCode.dense (else PackedLinear decodes in torch)."""
    if meta.get("codec", "binary") != "binary":  # integer codes (method gptq) decode in torch
        return False
    if meta.get("compute_dtype", "float32") != "float32" or meta["mask"] not in _MASK_KINDS:
        return False
    scales = meta["scales"]
    return set(scales) <= set(ROLES) and all(s["dtype"] in ("F32", "F16", "BF16") for s in scales.values())


def plan_for(meta: Mapping[str, Any], fields: Mapping[str, torch.Tensor]) -> KernelPlan | None:
    """The kernel plan of a packed linear on the CPU, or None (no library, other layout, not on the CPU)."""
    lib = library()
    if lib is None or not supported(meta) or any(t.device.type != "cpu" or t.is_meta for t in fields.values()):
        return None
    try:
        return KernelPlan(lib, meta, fields)
    except (ValueError, KeyError):
        return None
