"""ggml graph nodes as llama.cpp's eval callback (`llama_context_params.cb_eval`) hands them over.

The callback gets a `struct ggml_tensor *` for every node of the compute graph, first with
`ask = true` (return true to see this node's data) and then, for the nodes asked for, with
`ask = false` once the node is computed. `GgmlTensor` mirrors ggml.h's struct (ggml 0.25: 4
dimensions, 10 sources, 64 bytes of op params, 64-byte names); `check_layout` compares its
size with the library's own `GGML_TENSOR_SIZE` before anything is read through it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from kvlab.errors import KvlabError

MAX_DIMS, MAX_SRC, MAX_OP_PARAMS, MAX_NAME = 4, 10, 64, 64


class GgmlTensor(ctypes.Structure):
    pass


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * MAX_DIMS),
    ("nb", ctypes.c_size_t * MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]

EVAL_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p, ctypes.c_bool, ctypes.c_void_p)


def libggml():
    """ggml's shared library as llama-cpp-python ships it, with the few functions kvlab calls typed."""
    from llama_cpp._ggml import libggml as lib

    if not getattr(lib, "_kvlab_typed", False):
        lib.ggml_op_name.restype = ctypes.c_char_p
        lib.ggml_op_name.argtypes = [ctypes.c_int]
        lib.ggml_type_name.restype = ctypes.c_char_p
        lib.ggml_type_name.argtypes = [ctypes.c_int]
        lib.ggml_nbytes.restype = ctypes.c_size_t
        lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
        lib.ggml_tensor_overhead.restype = ctypes.c_size_t
        lib.ggml_row_size.restype = ctypes.c_size_t
        lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
        lib._kvlab_typed = True
    return lib


def check_layout() -> None:
    """Refuse to read tensors through a struct that does not match this ggml build."""
    lib = libggml()
    object_size = 32  # struct ggml_object: offs, size, next, type, padding[4]
    expected = lib.ggml_tensor_overhead() - object_size
    if ctypes.sizeof(GgmlTensor) != expected:
        raise KvlabError(f"this ggml's struct ggml_tensor is {expected} bytes, kvlab reads {ctypes.sizeof(GgmlTensor)}:"
                         " an unsupported llama-cpp-python version (kvlab pins 0.3.36)")


@dataclass
class Node:
    """What kvlab keeps of one graph node: identity, shape, sources; data when it was read."""

    name: str
    op: str
    type: str
    ne: tuple[int, ...]
    nb: tuple[int, ...]
    op_params: tuple[int, ...]
    src: list[str] = field(default_factory=list)
    data: np.ndarray | None = None  # raw bytes of the node (uint8), when read


def describe(ptr: int) -> Node:
    lib = libggml()
    t = GgmlTensor.from_address(ptr)
    src = []
    for s in t.src:
        if not s:
            break
        src.append(s.contents.name.decode(errors="replace"))
    return Node(
        name=t.name.decode(errors="replace"),
        op=lib.ggml_op_name(t.op).decode(),
        type=lib.ggml_type_name(t.type).decode(),
        ne=tuple(int(x) for x in t.ne),
        nb=tuple(int(x) for x in t.nb),
        op_params=tuple(int(x) for x in t.op_params),
        src=src,
    )


def read_bytes(ptr: int) -> np.ndarray:
    """The node's bytes as uint8, following its strides' span (host memory: the CPU backend)."""
    lib = libggml()
    t = GgmlTensor.from_address(ptr)
    if not t.data:
        raise KvlabError(f"ggml node {t.name.decode(errors='replace')} has no host data to read")
    span = strided_span(tuple(t.ne), tuple(t.nb), lib.ggml_row_size(t.type, t.ne[0]))
    return np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(t.data)).copy()


def strided_span(ne: tuple[int, ...], nb: tuple[int, ...], row_bytes: int) -> int:
    """Bytes from a tensor's first byte to the end of its last row (views may stride past others' rows)."""
    if any(n == 0 for n in ne):
        return 0
    return sum((n - 1) * s for n, s in zip(ne[1:], nb[1:])) + row_bytes


class GraphCallback:
    """An eval callback that asks for the nodes `want(node)` selects and hands them to `seen`.

    `want` gets a `Node` without data on the ask pass; `seen(node, ptr)` runs after the node is
    computed. Exceptions inside the C callback cannot propagate: the first one is kept and
    re-raised by `check()` after the decode.
    """

    def __init__(self, want: Callable[[Node], bool], seen: Callable[[Node, int], None]) -> None:
        check_layout()
        self.want, self.seen = want, seen
        self.enabled = True  # False: every node is passed over at once (no struct read, no Python work)
        self.error: BaseException | None = None
        self.c_function = EVAL_CALLBACK(self._call)

    def _call(self, ptr, ask, _user) -> bool:
        if not self.enabled or self.error is not None:
            return False
        try:
            node = describe(ptr)
            if ask:
                return bool(self.want(node))
            self.seen(node, ptr)
            return True
        except BaseException as err:  # noqa: BLE001 - re-raised by check()
            self.error = err
            return False

    def check(self) -> None:
        if self.error is not None:
            err, self.error = self.error, None
            raise err
