"""ggml layout rules: ne/nb against torch shapes and strides, ggml_permute, the channel interleave."""

import itertools

import numpy as np
import pytest
import torch

from kvlab.trace import ggml


def _ggml_permute_by_index(src: np.ndarray, axes) -> np.ndarray:
    """ggml_permute emulated element by element in ggml index order (i0 innermost).

    src is indexed [i0, i1, i2, i3] here (ggml order); view[j with j[axes[i]] = i_i] = src[i].
    """
    ne = src.shape
    out_ne = [0] * 4
    for i, a in enumerate(axes):
        out_ne[a] = ne[i]
    out = np.empty(out_ne, dtype=src.dtype)
    for idx in itertools.product(*(range(n) for n in ne)):
        j = [0] * 4
        for i, a in enumerate(axes):
            j[a] = idx[i]
        out[tuple(j)] = src[idx]
    return out


def test_ne_is_the_reversed_torch_shape_and_nb_the_reversed_strides():
    t = torch.zeros(2, 3, 5, 7, dtype=torch.float16)
    ne = ggml.ggml_ne(t.shape)
    assert ne == (7, 5, 3, 2)
    nb = ggml.contiguous_nb(ne, type_size=t.element_size())
    assert nb == tuple(s * t.element_size() for s in reversed(t.stride()))
    assert ggml.torch_shape(ne) == (2, 3, 5, 7)
    assert ggml.torch_shape((64, 9, 1, 1)) == (9, 64)


@pytest.mark.parametrize("axes", list(itertools.permutations(range(4))))
def test_ggml_permute_on_the_torch_view_is_torch_permute(axes):
    ne = (2, 3, 4, 5)
    flat = torch.arange(120)
    src_ggml = flat.numpy().reshape(tuple(reversed(ne))).transpose(3, 2, 1, 0)  # indexed [i0, i1, i2, i3]
    want = _ggml_permute_by_index(src_ggml, axes).transpose(3, 2, 1, 0)  # back to torch order
    # the REFERENCE mapping: perm[j] = 3 - inv(axes)[3 - j]
    perm = ggml.torch_permutation(axes)
    got = flat.reshape(tuple(reversed(ne))).permute(perm)
    assert np.array_equal(got.numpy(), want)
    # and through (ne, nb) and strides, as a reader does it
    assert np.array_equal(ggml.permuted_view(flat, ne, axes).numpy(), want)
    view_ne, _ = ggml.ggml_permute(ne, ggml.contiguous_nb(ne), axes)
    assert ggml.source_ne(view_ne, axes) == ne


def test_swap_of_dims_1_and_2_maps_to_itself():
    assert ggml.torch_permutation((0, 2, 1, 3)) == (0, 2, 1, 3)
    with pytest.raises(ValueError, match="permutation"):
        ggml.torch_permutation((0, 1, 1, 3))


def test_a_strided_view_never_reads_past_the_data():
    with pytest.raises(ValueError, match="reaches element"):
        ggml.strided_view(torch.arange(10), (4, 3), (1, 4))


def test_channel_interleave_is_the_llama_gguf_conversion():
    # convert_hf_to_gguf permutes each head's Q/K rows: reshape(n_head, 2, D/2, ...).swapaxes(1, 2)
    n_head, d = 3, 8
    weights = np.arange(n_head * d * 5).reshape(n_head * d, 5)
    converted = weights.reshape(n_head, 2, d // 2, 5).swapaxes(1, 2).reshape(weights.shape)
    hf_k = torch.from_numpy(weights.T.reshape(5, n_head, d).copy())  # activations: channels last, per head
    gguf_k = torch.from_numpy(converted.T.reshape(5, n_head, d).copy())
    assert torch.equal(ggml.interleave_channels(hf_k), gguf_k)
    assert torch.equal(ggml.deinterleave_channels(gguf_k), hf_k)
