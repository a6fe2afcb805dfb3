"""ggml tensor layout rules, and turning stored ggml bytes back into torch tensors.

ggml describes a tensor by `ne` (elements per dimension, innermost first) and `nb` (byte
strides, innermost first); torch lists the outermost dimension first. So a ggml tensor is the
torch tensor of shape `reversed(ne)` with strides `reversed(nb)`. `ggml_permute` makes a view by
moving source dimension i to position `axes[i]`; it never moves bytes. Reading a permuted
tensor's bytes with the view's `ne` as if they were contiguous is the classic layout bug: the
reader must go through the strides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

GGML_MAX_DIMS = 4


def torch_shape(ne: Sequence[int]) -> tuple[int, ...]:
    """The torch shape of a ggml tensor: `ne` reversed (trailing unit dims of `ne` dropped)."""
    dims = [int(n) for n in ne]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(reversed(dims))


def ggml_ne(shape: Sequence[int]) -> tuple[int, ...]:
    """The ggml `ne` of a torch shape: the shape reversed."""
    return tuple(int(n) for n in reversed(tuple(shape)))


def pad_ne(ne: Sequence[int]) -> tuple[int, int, int, int]:
    """`ne` padded with unit dimensions to ggml's four."""
    dims = [int(n) for n in ne]
    if len(dims) > GGML_MAX_DIMS:
        raise ValueError(f"ggml tensors have at most {GGML_MAX_DIMS} dimensions, got ne={dims}")
    return tuple(dims + [1] * (GGML_MAX_DIMS - len(dims)))  # type: ignore[return-value]


def contiguous_nb(ne: Sequence[int], type_size: int = 1) -> tuple[int, ...]:
    """Strides of a contiguous tensor, innermost first (in units of `type_size`)."""
    nb, stride = [], type_size
    for n in ne:
        nb.append(stride)
        stride *= int(n)
    return tuple(nb)


def check_axes(axes: Sequence[int]) -> tuple[int, int, int, int]:
    """Validate `ggml_permute` axes: a permutation of 0..3."""
    axes = tuple(int(a) for a in axes)
    if sorted(axes) != list(range(GGML_MAX_DIMS)):
        raise ValueError(f"ggml_permute axes must be a permutation of 0, 1, 2, 3, got {list(axes)}")
    return axes  # type: ignore[return-value]


def ggml_permute(ne: Sequence[int], nb: Sequence[int], axes: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """`ggml_permute(a, *axes)` on (ne, nb): source dimension i goes to position `axes[i]`."""
    axes = check_axes(axes)
    ne4, nb4 = pad_ne(ne), tuple(nb) + tuple(nb[-1:]) * (GGML_MAX_DIMS - len(nb))
    out_ne, out_nb = [0] * GGML_MAX_DIMS, [0] * GGML_MAX_DIMS
    for i, a in enumerate(axes):
        out_ne[a], out_nb[a] = ne4[i], nb4[i]
    return tuple(out_ne), tuple(out_nb)


def source_ne(view_ne: Sequence[int], axes: Sequence[int]) -> tuple[int, ...]:
    """The ne of the contiguous tensor that `ggml_permute(·, *axes)` turned into `view_ne`."""
    axes, ne4 = check_axes(axes), pad_ne(view_ne)
    return tuple(ne4[a] for a in axes)


def torch_permutation(axes: Sequence[int]) -> tuple[int, int, int, int]:
    """The torch `permute` equal to `ggml_permute(*axes)` on the reversed (torch) 4-D view.

    `perm[j] = 3 - inv(axes)[3 - j]`; (0, 2, 1, 3) maps to itself.
    """
    axes = check_axes(axes)
    inverse = [0] * GGML_MAX_DIMS
    for i, a in enumerate(axes):
        inverse[a] = i
    return tuple(GGML_MAX_DIMS - 1 - inverse[GGML_MAX_DIMS - 1 - j] for j in range(GGML_MAX_DIMS))  # type: ignore[return-value]


def strided_view(flat: torch.Tensor, ne: Sequence[int], nb: Sequence[int], offset: int = 0) -> torch.Tensor:
    """The torch view of a ggml tensor over `flat` elements: shape reversed(ne), strides reversed(nb).

    `nb` and `offset` are in elements of `flat` (not bytes). Raises ValueError when the view
    would reach past the end of `flat`.
    """
    ne, nb = [int(n) for n in ne], [int(s) for s in nb]
    if len(ne) != len(nb):
        raise ValueError(f"ne {ne} and nb {nb} differ in length")
    if any(n < 0 for n in ne) or any(s < 0 for s in nb) or offset < 0:
        raise ValueError(f"negative ne {ne}, nb {nb} or offset {offset}")
    if all(n > 0 for n in ne):
        last = offset + sum((n - 1) * s for n, s in zip(ne, nb))
        if last >= flat.numel():
            raise ValueError(f"a view with ne={ne}, nb={nb} reaches element {last} of {flat.numel()}")
    return torch.as_strided(flat, tuple(reversed(ne)), tuple(reversed(nb)), offset)


def permuted_view(flat: torch.Tensor, stored_ne: Sequence[int], axes: Sequence[int] | None) -> torch.Tensor:
    """The torch tensor of `ggml_permute(contiguous(stored_ne), *axes)` over `flat` elements."""
    if flat.numel() != int(np.prod([int(n) for n in stored_ne], dtype=np.int64)):
        raise ValueError(f"{flat.numel()} elements cannot have ne={list(stored_ne)}")
    ne = pad_ne(stored_ne)
    nb = contiguous_nb(ne)
    if axes is not None:
        ne, nb = ggml_permute(ne, nb, axes)
    return strided_view(flat, ne, nb)


def interleave_channels(x: torch.Tensor) -> torch.Tensor:
    """HF (rotate-half) channel order -> the interleaved order LLaMA GGUF conversion writes.

    The conversion permutes each head's Q/K rows so that RoPE pairs (i, i + D/2) become
    adjacent channels (2i, 2i + 1): last dim D viewed as (2, D/2), transposed.
    """
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"head_dim {d} is odd: no channel interleave")
    return x.reshape(*x.shape[:-1], 2, d // 2).transpose(-1, -2).reshape(x.shape)


def deinterleave_channels(x: torch.Tensor) -> torch.Tensor:
    """Undo `interleave_channels`: adjacent pairs (2i, 2i + 1) back to (i, i + D/2)."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"head_dim {d} is odd: no channel interleave")
    return x.reshape(*x.shape[:-1], d // 2, 2).transpose(-1, -2).reshape(x.shape)
