"""The trace file contract: tensor names, metadata keys, and how a stored tensor is laid out.

A trace is a GGUF file. Tensors are named `blk.{layer}.step.{n}.{role}` with role one of
q, k, v, mask, out (plus k_quant / v_quant, and `k_quant.{part}` for scales or zero points of
a quantized cache). Step n is the n-th forward pass of the run: 0 is the prompt, 1.. the
decode steps. Metadata lives under `kvlab.`: the trace as a whole (`kvlab.format`,
`kvlab.model`, ...), each layer (`kvlab.blk.{layer}.scale`), each step
(`kvlab.step.{n}.position`) and each tensor (`kvlab.tensor.{name}.torch_shape`, ...).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from kvlab.errors import KvlabError
from kvlab.trace import ggml

FORMAT = "kvlab.trace/1"
ARCHITECTURE = "kvlab-trace"
ROLES = ("q", "k", "v", "mask", "out")
# A cache policy's export names its raw payload `layers.{i}.keys.q`, the payload's parts
# `layers.{i}.keys.{part}`, and the full-precision tail of `layers.{i}.keys` `layers.{i}.keys.hot`.
PAYLOAD_PART, HOT_PART = "q", "hot"

_NAME = re.compile(r"^blk\.(\d+)\.step\.(\d+)\.(q|k|v|mask|out|k_quant|v_quant)(?:\.([A-Za-z0-9_]+))?$")


class TraceError(KvlabError):
    """A trace file that cannot be read, or whose tensors do not fit together."""


def tensor_name(layer: int, step: int, role: str, part: str | None = None) -> str:
    return f"blk.{layer}.step.{step}.{role}" + (f".{part}" if part else "")


@dataclass(frozen=True)
class TraceName:
    layer: int
    step: int
    role: str
    part: str | None = None


def parse_name(name: str) -> TraceName | None:
    """`blk.3.step.7.k` -> TraceName(3, 7, "k"); None for names outside the contract."""
    m = _NAME.match(name)
    if m is None:
        return None
    return TraceName(int(m.group(1)), int(m.group(2)), m.group(3), m.group(4))


def tensor_key(name: str, field: str) -> str:
    """Metadata key of one tensor's field: torch_shape, dtype, ggml_permute, source_ne, ne_is_view."""
    return f"kvlab.tensor.{name}.{field}"


def layer_key(layer: int, field: str) -> str:
    """Metadata key of one layer's field: scale, softcap."""
    return f"kvlab.blk.{layer}.{field}"


def step_key(step: int, field: str) -> str:
    """Metadata key of one step's field: position (of its first query token), n_tokens."""
    return f"kvlab.step.{step}.{field}"


@dataclass(frozen=True)
class TensorLayout:
    """How the bytes of one stored tensor become its torch tensor.

    The bytes are a contiguous ggml tensor, the *source*, with `source_ne` (by default the
    stored `ne`). The tensor the trace means is `ggml_permute(source, *permute)`, read through
    the strides, then reshaped to `torch_shape`.

    permute: the `ggml_permute` axes, or None.
    ne_is_view: the stored `ne` is the permuted view's (a dumper wrote the view's shape beside
        its source's bytes); the source's `ne` is recovered from it and `permute`.
    split_heads: the stored `ne[split_axis]` holds heads * head_dim (a llama.cpp K/V cache row,
        `n_embd_k_gqa`); it is split into `[head_dim, heads]` first. A tensor already split
        (llama.cpp's own view `[head_dim, n_head_kv, n_kv]`, ne[0] == head_dim) is left as it is.
    split_axis: which `ne` axis holds heads * head_dim (1 for a transposed V cache,
        `[n_kv, n_embd_v_gqa]`).
    source_ne: an explicit source `ne` (a reshape of the stored one).
    torch_shape: the final torch shape (default: the view's reversed `ne`).
    """

    permute: tuple[int, int, int, int] | None = None
    ne_is_view: bool = False
    split_heads: bool = False
    split_axis: int = 0
    source_ne: tuple[int, ...] | None = None
    torch_shape: tuple[int, ...] | None = None

    def resolve_source(self, stored_ne: tuple[int, ...], head_dim: int | None = None) -> tuple[int, ...]:
        """The source's `ne`, checked to hold as many elements as the stored tensor."""
        if self.source_ne is not None:
            ne = tuple(self.source_ne)
        elif self.ne_is_view:
            if self.permute is None:
                raise TraceError("a tensor whose ne is a view's needs its ggml_permute axes")
            ne = ggml.source_ne(stored_ne, self.permute)
        else:
            ne = tuple(stored_ne)
        axis = self.split_axis
        if self.split_heads and not (axis == 0 and ne[0] == head_dim):
            if not head_dim or axis >= len(ne) or ne[axis] % head_dim:
                size = ne[axis] if axis < len(ne) else None
                raise TraceError(f"cannot split ne[{axis}]={size} into heads of head_dim {head_dim}")
            ne = (*ne[:axis], head_dim, ne[axis] // head_dim, *ne[axis + 1:])
        while len(ne) > 4 and ne[-1] == 1:  # ggml keeps trailing 1s ([192, 256, 1, 1]); they carry nothing
            ne = ne[:-1]
        if element_count(ne) != element_count(stored_ne):
            raise TraceError(f"source ne {list(ne)} does not hold the {element_count(stored_ne)} stored elements")
        return ne


def element_count(ne) -> int:
    return math.prod(int(n) for n in ne)


# How tensors without kvlab metadata are laid out, role by role.
KVLAB_LAYOUT: dict[str, TensorLayout] = {}
_SWAP = (0, 2, 1, 3)
LLAMA_CPP_LAYOUT: dict[str, TensorLayout] = {
    # q_cur [head_dim, n_head, n_tokens], used as ggml_permute(q_cur, 0, 2, 1, 3)
    "q": TensorLayout(permute=_SWAP),
    # the K/V cache [n_embd_k_gqa, n_kv], viewed as [head_dim, n_head_kv, n_kv] and permuted
    "k": TensorLayout(permute=_SWAP, split_heads=True),
    "v": TensorLayout(permute=_SWAP, split_heads=True),
    # F16 [n_kv, n_tokens padded]
    "mask": TensorLayout(),
    # ggml_flash_attn_ext: [head_dim, n_head, n_tokens] = SDPA's output transposed(1, 2)
    "out": TensorLayout(permute=_SWAP),
}
# The same, where the dumper wrote each permuted view's ne beside its source's bytes.
LLAMA_CPP_VIEWS_LAYOUT: dict[str, TensorLayout] = {
    "q": TensorLayout(permute=_SWAP, ne_is_view=True),
    "k": TensorLayout(permute=_SWAP, ne_is_view=True),
    "v": TensorLayout(permute=_SWAP, ne_is_view=True),
    "mask": TensorLayout(),
    "out": TensorLayout(permute=_SWAP),
}
# llama.cpp without flash attention: the V cache is stored transposed (one row per channel,
# `[n_kv, n_embd_v_gqa]` as read for `kqv = V^T kq`), the output is `kqv_out` `[n_embd, n_tokens]`,
# the mask F32.
LLAMA_CPP_NOFLASH_LAYOUT: dict[str, TensorLayout] = {
    "q": TensorLayout(permute=_SWAP),
    "k": TensorLayout(permute=_SWAP, split_heads=True),
    "v": TensorLayout(permute=(1, 0, 2, 3), split_heads=True, split_axis=1),
    "mask": TensorLayout(),
    "out": TensorLayout(permute=_SWAP, split_heads=True),
}
LAYOUTS = {"kvlab": KVLAB_LAYOUT, "llama.cpp": LLAMA_CPP_LAYOUT, "llama.cpp-views": LLAMA_CPP_VIEWS_LAYOUT,
           "llama.cpp-noflash": LLAMA_CPP_NOFLASH_LAYOUT}
LAYOUT_KEY = "kvlab.layout"  # a trace of another program's tensors names its role layout here
