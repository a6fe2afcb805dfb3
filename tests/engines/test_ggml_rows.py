import numpy as np
import pytest
import torch

from kvlab.engines.ggml_rows import deinterleave, hadamard, interleave, raw_heads, rows_to_float, to_heads, unrotate
from kvlab.engines.llamacpp_state import MAGIC, StateError, parse_sequence_state


def convert_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py, LlamaModel.permute: how Q/K weight rows are reordered into GGUF."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_deinterleave_undoes_the_gguf_conversion_of_key_channels():
    n_head, dim, hidden = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((n_head * dim, hidden))
    x = np.random.default_rng(1).standard_normal(hidden)
    hf_keys = torch.from_numpy(w @ x).reshape(n_head, dim)
    gguf_keys = torch.from_numpy(convert_permute(w, n_head) @ x).reshape(n_head, dim)
    assert torch.allclose(interleave(hf_keys), gguf_keys)
    assert torch.allclose(deinterleave(gguf_keys), hf_keys)


def test_hadamard_is_llamas_orthonormal_symmetric_rotation():
    h = hadamard(64)
    assert np.allclose(h @ h, np.eye(64)) and np.allclose(h, h.T)
    assert np.allclose(np.abs(h), 1 / 8)
    assert np.allclose(hadamard(4) * 2, [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    rows = np.random.default_rng(2).standard_normal((5, 192)).astype(np.float32)
    rotated = (rows.reshape(5, 3, 64) @ h.T).reshape(5, 192)  # ggml_mul_mat(rot, x) per 64-chunk
    assert np.allclose(unrotate(rotated), rows, atol=1e-5)


def test_rows_of_each_ggml_type_read_as_gguf_dequantizes_them():
    import gguf
    from gguf import quants

    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    assert np.array_equal(rows_to_float(x.view(np.uint8), 0, 64), x)
    assert np.array_equal(rows_to_float(x.astype(np.float16).view(np.uint8), 1, 64), x.astype(np.float16).astype(np.float32))
    for qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0):
        blocks = quants.quantize(x, qtype)
        assert np.array_equal(rows_to_float(blocks, qtype.value, 64), quants.dequantize(blocks, qtype))
    with pytest.raises(Exception, match="holds 64 values"):
        rows_to_float(x.view(np.uint8), 0, 32)


def test_rows_become_heads_in_transformers_layout():
    rows = np.arange(2 * 6, dtype=np.float32).reshape(2, 6)  # 2 positions, 3 heads of 2
    heads = to_heads(rows, 3, 2)
    assert heads.shape == (1, 3, 2, 2) and heads[0, 1, 1].tolist() == [8.0, 9.0]
    raw = raw_heads(np.arange(2 * 6, dtype=np.uint8).reshape(2, 6), 3)
    assert raw.shape == (1, 3, 2, 2) and raw[0, 2, 0].tolist() == [4, 5]


def _state(cells, k_rows, v_rows, v_trans, seq=0, extra=b""):
    """Bytes in the layout of llama.cpp's state_seq_get_data (llama-kv-cache.cpp state_write)."""
    import struct

    out = struct.pack("<Ii", MAGIC, seq) + struct.pack("<I", 1) + struct.pack("<I", len(cells))
    for pos in cells:
        out += struct.pack("<iIi", pos, 1, seq)
    out += struct.pack("<II", int(v_trans), len(k_rows))
    for k in k_rows:
        out += struct.pack("<iQ", 0, k.shape[1] * 4) + k.astype(np.float32).tobytes()
    for v in v_rows:
        if not v_trans:
            out += struct.pack("<iQ", 0, v.shape[1] * 4) + v.astype(np.float32).tobytes()
        else:
            out += struct.pack("<iII", 0, 4, v.shape[1]) + np.ascontiguousarray(v.T).astype(np.float32).tobytes()
    return out + extra


@pytest.mark.parametrize("v_trans", [False, True])
def test_sequence_state_reads_cells_and_rows_also_with_transposed_v(v_trans):
    rng = np.random.default_rng(4)
    k = [rng.standard_normal((3, 6)) for _ in range(2)]
    v = [rng.standard_normal((3, 6)) for _ in range(2)]
    state = parse_sequence_state(_state([0, 1, 2], k, v, v_trans), n_layers=2, v_elements=6)
    assert state.positions == [0, 1, 2] and state.v_trans == v_trans
    for i in range(2):
        assert np.array_equal(state.layers[i].k_rows.view(np.float32), k[i].astype(np.float32))
        assert np.array_equal(state.layers[i].v_rows.view(np.float32), v[i].astype(np.float32))


def test_sequence_state_that_does_not_add_up_is_refused():
    k = [np.zeros((2, 4))]
    good = _state([0, 1], k, k, False)
    with pytest.raises(StateError, match="not a llama.cpp sequence state"):
        parse_sequence_state(b"\0" * 8 + good[8:], n_layers=1, v_elements=4)
    with pytest.raises(StateError, match="ends early"):
        parse_sequence_state(good[:-3], n_layers=1, v_elements=4)
    with pytest.raises(StateError, match="past its end"):
        parse_sequence_state(good + b"\0", n_layers=1, v_elements=4)
    with pytest.raises(StateError, match="has 1 layers, the model 2"):
        parse_sequence_state(good, n_layers=2, v_elements=4)


def test_a_missing_llama_cpp_is_one_line_naming_the_extra(monkeypatch):
    import builtins

    from kvlab.engines.llamacpp import EngineUnavailable, require

    real_import = builtins.__import__

    def no_llama(name, *args, **kwargs):
        if name == "llama_cpp" or name.startswith("llama_cpp."):
            raise ImportError("No module named 'llama_cpp'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(EngineUnavailable, match=r"pip install 'kvlab\[llamacpp\]'") as info:
        require()
    assert "\n" not in str(info.value)
