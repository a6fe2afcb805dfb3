"""Flash-decoding on CPU with the blocks dequantized inside the attention loop (`csrc/split_k.c`).

Why a compiled kernel: with PyTorch ops, reading a 4-bit cache means several full passes over
its cold part per decode step (unpack, convert, scale, then the matmuls), which on CPU costs
more than the attention itself. The kernel decodes one block at a time into a buffer that stays
in cache and reads the packed bytes once.

It is built on first use with the system C compiler (`$CC`, else `cc`) as
`$KVLAB_HOME/kernels/split_k-<hash>.so`, the hash covering the source, the flags, the compiler
and the CPU, written under a temporary name and renamed, and loaded with ctypes; torch's own
OpenMP runtime runs its threads. Without a compiler `library()` raises `NativeUnavailable`
and callers keep the PyTorch path. Float32 work only: a float64 query stays on PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from kvlab.paths import kvlab_home
from kvlab.quant.blocks import fp8_table

SOURCE = Path(__file__).with_name("csrc") / "split_k.c"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-Wno-psabi"]
SCHEMES = {"f32": 0, "f16": 1, "bf16": 2, "kivi": 3, "q8_0": 4, "q4_0": 5, "fp8": 6}
RAW = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
RAW_BLOCK = 32  # positions per block of full-precision rows
CHUNK_TOKENS = 256  # positions per unit of work: fixed, so results do not depend on the thread count


class NativeUnavailable(RuntimeError):
    """The kernel cannot be built or loaded here; the message says why, in one line."""


class _Role(ctypes.Structure):
    _fields_ = [("scheme", ctypes.c_int32), ("bits", ctypes.c_int32), ("group", ctypes.c_int32),
                ("per_channel", ctypes.c_int32), ("data", ctypes.c_void_p), ("scale", ctypes.c_void_p),
                ("zero", ctypes.c_void_p), ("fscale", ctypes.c_void_p), ("table", ctypes.c_void_p)]


class _Shape(ctypes.Structure):
    _fields_ = [("heads", ctypes.c_int64), ("rows", ctypes.c_int64), ("dim", ctypes.c_int64),
                ("tokens", ctypes.c_int64), ("block", ctypes.c_int64), ("chunk_blocks", ctypes.c_int64),
                ("scale", ctypes.c_float), ("threads", ctypes.c_int32)]


def _compiler() -> str:
    name = os.environ.get("CC") or "cc"
    path = shutil.which(name)
    if path is None:
        raise NativeUnavailable(f"no C compiler ({name!r} not found; set CC)")
    return path


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(flags: list[str] = FLAGS) -> Path:
    """Where the kernel for this source, flags, compiler and CPU lives (built or not)."""
    compiler = _compiler()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for piece in (SOURCE.read_bytes(), " ".join(flags).encode(), version.encode(), _cpu_signature().encode()):
        digest.update(piece)
    return kvlab_home() / "kernels" / f"split_k-{digest.hexdigest()[:16]}.so"


def build(flags: list[str] = FLAGS) -> Path:
    """Compile the kernel unless it is there already; returns its path. Other `flags` (a narrower
    `-march`) build the variants other machines get, for tests."""
    target = library_path(flags)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".split_k-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([_compiler(), *flags, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no message"])[0]
            raise NativeUnavailable(f"the C compiler failed on {SOURCE.name}: {first}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL:
    """The loaded kernel (built on first use); raises NativeUnavailable."""
    if os.environ.get("KVLAB_NATIVE", "1") == "0":
        raise NativeUnavailable("disabled by KVLAB_NATIVE=0")
    return load(build())


def load(path: Path) -> ctypes.CDLL:
    """A built kernel, with its argument types declared."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise NativeUnavailable(f"cannot load the kernel: {err}") from None
    fn = lib.kvlab_split_k_part
    fn.argtypes = [ctypes.POINTER(_Role), ctypes.POINTER(_Role), ctypes.POINTER(_Shape)] + [ctypes.c_void_p] * 5
    fn.restype = ctypes.c_int
    return lib


def available() -> bool:
    try:
        library()
    except NativeUnavailable:
        return False
    return True


def unavailable_reason() -> str | None:
    try:
        library()
    except NativeUnavailable as err:
        return str(err)
    return None


_NOTED: set[str] = set()


def note_fallback(reason: str) -> None:
    """Say once per process, on stderr, that decode steps fall back to PyTorch ops, and why."""
    if reason not in _NOTED:
        _NOTED.add(reason)
        print(f"kvlab: flash-decoding uses PyTorch ops (slower): {reason}", file=sys.stderr)


# ---- roles: what one side (keys or values) of a part looks like to the kernel -----------------

@dataclass
class Role:
    """A ctypes description of one side of a part, plus the tensors it points into (kept alive)."""

    struct: _Role
    keep: list[torch.Tensor] = field(default_factory=list)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def raw_role(x: torch.Tensor) -> Role:
    """Full-precision rows `[b, kv, n, d]` in float32, float16 or bfloat16."""
    if x.dtype not in RAW:
        raise NativeUnavailable(f"the kernel reads float32, float16 or bfloat16 rows, not {x.dtype}")
    x = x.contiguous()
    return Role(_Role(scheme=SCHEMES[RAW[x.dtype]], data=_ptr(x)), [x])


def codec_role(codec, parts: dict[str, torch.Tensor]) -> Role:
    """Stored blocks of a `kvlab.quant.blocks` codec, as they are (nothing is copied when contiguous)."""
    scheme = codec.scheme
    q = parts["q"].contiguous()
    if scheme == "kivi":
        scale, zero = parts["scale"].contiguous(), parts["zero"].contiguous()
        if scale.dtype != torch.float16 or zero.dtype != torch.float16:
            raise NativeUnavailable("kivi scales must be float16")
        if codec.axis == -1 and codec.group % (8 // codec.bits):
            raise NativeUnavailable(f"a kivi value group of {codec.group} channels splits a byte of {codec.bits}-bit codes")
        struct = _Role(scheme=SCHEMES["kivi"], bits=codec.bits, group=codec.group, per_channel=int(codec.axis == -2),
                       data=_ptr(q), scale=_ptr(scale), zero=_ptr(zero))
        return Role(struct, [q, scale, zero])
    if scheme in ("q8_0", "q4_0"):
        return Role(_Role(scheme=SCHEMES[scheme], data=_ptr(q)), [q])
    if scheme == "fp8":
        codes = q.view(torch.uint8)
        scale = parts["scale"].to(torch.float32).contiguous()
        table = fp8_table(q.dtype)
        return Role(_Role(scheme=SCHEMES["fp8"], data=_ptr(codes), fscale=_ptr(scale), table=_ptr(table)),
                    [codes, scale, table])
    raise NativeUnavailable(f"no kernel for scheme {scheme!r}")


@dataclass
class Part:
    """`tokens` positions of every (batch row, KV head), in blocks of `block` positions."""

    keys: Role
    values: Role
    tokens: int
    block: int


class State:
    """The running softmax state over the parts folded so far, per (batch row, KV head, query row)."""

    def __init__(self, query: torch.Tensor, kv_heads: int, scale: float) -> None:
        """`query` `[b, H, q, d]` (converted to float32); query head h reads KV head h // (H / kv)."""
        b, heads, q_len, d = query.shape
        if heads % kv_heads:
            raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads")
        self.b, self.kv, self.heads, self.q_len, self.d = b, kv_heads, heads, q_len, d
        self.rows = (heads // kv_heads) * q_len
        self.query = query.to(torch.float32).reshape(b * kv_heads, self.rows, d).contiguous()
        self.scale = float(scale)
        self.m = torch.full((b * kv_heads, self.rows), -float("inf"))
        self.l = torch.zeros(b * kv_heads, self.rows)  # noqa: E741 (the name the formulas use)
        self.o = torch.zeros(b * kv_heads, self.rows, self.d)

    def fold(self, part: Part, mask: torch.Tensor | None = None) -> None:
        """Add `part`; `mask` additive float32 `[b, kv, rows, tokens]` (-inf = masked) or None."""
        if part.tokens == 0:
            return
        lib = library()
        if mask is not None:
            mask = mask.to(torch.float32).expand(self.b, self.kv, self.rows, part.tokens).contiguous()
        shape = _Shape(heads=self.b * self.kv, rows=self.rows, dim=self.d, tokens=part.tokens, block=part.block,
                       chunk_blocks=max(1, CHUNK_TOKENS // part.block), scale=self.scale,
                       threads=torch.get_num_threads())
        status = lib.kvlab_split_k_part(ctypes.byref(part.keys.struct), ctypes.byref(part.values.struct),
                                        ctypes.byref(shape), _ptr(self.query), None if mask is None else _ptr(mask),
                                        _ptr(self.m), _ptr(self.l), _ptr(self.o))
        if status != 0:
            raise MemoryError("the flash-decoding kernel could not allocate its buffers")

    def output(self) -> torch.Tensor:
        """`[b, H, q, d]` float32: o / l, zeros where nothing was attended to."""
        denom = torch.where(self.l > 0, self.l, torch.ones_like(self.l)).unsqueeze(-1)
        return (self.o / denom).reshape(self.b, self.heads, self.q_len, self.d)
