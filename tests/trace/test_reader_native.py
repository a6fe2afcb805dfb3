"""ggml-native traces: files laid out as llama.cpp holds its attention tensors, read back exactly."""

import gguf
import numpy as np
import pytest
import torch

from kvlab.attention import reference_attention
from kvlab.compare.metrics import tensor_errors
from kvlab.trace import TraceError, TraceFile, check_trace
from tests.trace.llamacpp import attention_case, write_llama_cpp_trace


def _from_llama_cpp(kept, h, t, s, kv, d):
    """Torch tensors from the stored llama.cpp arrays, rearranged by hand (the oracle)."""
    q = torch.from_numpy(kept["q"]).reshape(t, h, d).transpose(0, 1)[None]
    k = torch.from_numpy(kept["k"]).reshape(s, kv, d).transpose(0, 1)[None]
    v = torch.from_numpy(kept["v"]).reshape(s, kv, d).transpose(0, 1)[None]
    mask = torch.from_numpy(kept["mask"])[:t][None, None]
    out = torch.from_numpy(kept["out"]).reshape(t, h, d).transpose(0, 1)[None]
    return q, k, v, mask, out


@pytest.mark.parametrize("views", [False, True])
def test_llama_cpp_layout_reads_back_exactly(tmp_path, views):
    q, k, v, mask, out = attention_case()
    path = tmp_path / "llama.gguf"
    kinds = {"q": "f32", "k": "f32", "v": "f32", "out": "f32"}
    write_llama_cpp_trace(path, q, k, v, mask, out, kinds=kinds, views=views)
    step = TraceFile(path, layout="llama.cpp-views" if views else "llama.cpp").attention_step(0, 1)
    assert torch.equal(step.q, q) and torch.equal(step.k, k) and torch.equal(step.v, v)
    assert torch.equal(step.out, out)
    assert torch.equal(step.mask.float(), mask)  # F16 [n_kv, n_tokens + pad], padding rows cropped
    assert step.mask.dtype == torch.float16


@pytest.mark.parametrize("kind", ["f16", "bf16", "q8_0", "q4_0"])
def test_every_stored_type_reads_back_as_stored(tmp_path, kind):
    h, kv, t, s, d = 4, 2, 3, 11, 32
    q, k, v, mask, out = attention_case(h, kv, t, s, d, seed=1)
    path = tmp_path / f"{kind}.gguf"
    kept = write_llama_cpp_trace(path, q, k, v, mask, out, kinds={"q": kind, "k": kind, "v": kind, "out": kind})
    trace = TraceFile(path, layout="llama.cpp")
    assert trace.ggml_type("blk.0.step.1.k") == kind.upper()
    step = trace.attention_step(0, 1)
    want = _from_llama_cpp(kept, h, t, s, kv, d)
    for got, expected in zip((step.q, step.k, step.v, step.mask, step.out), want):
        assert torch.equal(got.float(), expected)
    if kind in ("f16", "bf16"):  # exact 16-bit values, in their own dtype
        assert step.k.dtype == {"f16": torch.float16, "bf16": torch.bfloat16}[kind]
        assert torch.equal(step.k, k.to(step.k.dtype))
    else:  # the block format really was used: the values moved, by a bounded amount
        assert 0 < (step.k - k).abs().max() < (0.02 if kind == "q8_0" else 0.3) * k.abs().max()


def test_the_check_passes_on_a_right_llama_cpp_trace_and_catches_a_wrong_output(tmp_path):
    q, k, v, mask, out = attention_case(seed=2)
    path = tmp_path / "good.gguf"
    write_llama_cpp_trace(path, q, k, v, mask, out, kinds={"q": "f32", "k": "f32", "v": "f32", "out": "f32"})
    report = check_trace(path, layout="llama.cpp")
    assert report.ok and len(report.entries) == 4
    assert max(e.rel_l2 for e in report.entries) < 1e-6
    # one head's output off in one element: that head, and only that head, fails
    bad = out.clone()
    bad[0, 2, 1, 5] += 0.5
    write_llama_cpp_trace(path, q, k, v, mask, bad, kinds={"q": "f32", "k": "f32", "v": "f32", "out": "f32"})
    report = check_trace(path, layout="llama.cpp")
    assert not report.ok
    assert [(e.layer, e.step, e.head) for e in report.failures] == [(0, 1, 2)]
    assert report.failures[0].max_abs == pytest.approx(0.5, rel=1e-6)


def test_quantized_k_cache_checks_against_its_dequantized_values(tmp_path):
    # a q8_0 K cache and f16 V, as llama.cpp's -ctk q8_0; the output computed from what is stored
    h, kv, t, s, d = 4, 2, 1, 40, 32
    q, k, v, mask, _ = attention_case(h, kv, t, s, d, seed=3)
    path = tmp_path / "q8.gguf"
    kinds = {"q": "f32", "k": "q8_0", "v": "f16", "out": "f32"}
    kept = write_llama_cpp_trace(path, q, k, v, mask, torch.zeros(1, h, t, d), kinds=kinds)
    _, k_deq, v_deq, _, _ = _from_llama_cpp(kept, h, t, s, kv, d)
    out = reference_attention(q, k_deq, v_deq, mask).float()
    write_llama_cpp_trace(path, q, k, v, mask, out, kinds=kinds)
    report = check_trace(path, layout="llama.cpp")
    assert report.ok and report.tolerance == 3e-2  # the coarsest stored type, q8_0, sets the default
    assert max(e.rel_l2 for e in report.entries) < 1e-6


def test_llama_k_channel_interleave_is_undone_on_request(tmp_path):
    q, k, v, mask, out = attention_case(seed=4)
    path = tmp_path / "interleaved.gguf"
    write_llama_cpp_trace(path, q, k, v, mask, out, kinds={"q": "f32", "k": "f32"}, interleave=True)
    plain = TraceFile(path, layout="llama.cpp").attention_step(0, 1)
    fixed = TraceFile(path, layout="llama.cpp", deinterleave_qk=True).attention_step(0, 1)
    assert torch.equal(fixed.k, k) and torch.equal(fixed.q, q)
    assert not torch.equal(plain.k, k)
    # attention is blind to a channel order q and k share: both read the same output
    assert check_trace(path, layout="llama.cpp").ok
    assert check_trace(path, layout="llama.cpp", deinterleave_qk=True).ok


def test_the_seed_reports_mistake(tmp_path):
    """A reader that takes the stored ne at face value sees a large element-wise error.

    The seed report read llama.cpp's tensors with plain reshapes, compared sums of outputs and
    called the result a 847% error. Sums cannot see a layout mistake at all (a permutation
    keeps the sum); element-wise metrics do, and with the layout applied the error is gone.
    """
    h, kv, t, s, d = 4, 2, 3, 11, 32
    q, k, v, mask, out = attention_case(h, kv, t, s, d, seed=5)
    path = tmp_path / "views.gguf"
    write_llama_cpp_trace(path, q, k, v, mask, out, kinds={"q": "f32", "k": "f32", "v": "f32", "out": "f32"},
                          views=True)
    raw = {t_.name.rsplit(".", 1)[1]: torch.from_numpy(np.array(t_.data)) for t_ in gguf.GGUFReader(path).tensors}
    naive_q = raw["q"][None]  # [h, t, d] as the view's ne says, bytes are q_cur's [t, h, d]
    naive_k = raw["k"][None]  # [kv, s, d], bytes are the cache's [s, kv * d]
    naive_v = raw["v"][None]
    naive_out = raw["out"].reshape(1, h, t, d)  # a reshape where a transpose was needed
    naive_mask = raw["mask"][:t].float()[None, None]
    naive = reference_attention(naive_q, naive_k, naive_v, naive_mask).float()
    wrong = tensor_errors(naive, naive_out)
    assert wrong.rel_l2 > 0.5 and wrong.cosine < 0.8
    # the sums agree to rounding although half the elements are misplaced
    assert torch.isclose(naive_out.sum(), out.sum(), atol=1e-4)
    # kvlab's reader, told the layout, finds none
    report = check_trace(path, layout="llama.cpp-views")
    assert report.ok and max(e.max_abs for e in report.entries) < 1e-6


def test_a_step_missing_tensors_or_with_shapes_that_disagree_is_a_clear_error(tmp_path):
    q, k, v, mask, out = attention_case()
    writer = gguf.GGUFWriter(str(tmp_path / "partial.gguf"), "llama")
    writer.add_tensor("blk.0.step.1.q", q.numpy())
    writer.add_tensor("blk.0.step.1.k", k.numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(TraceError, match="layer 0 step 1 has no v, out"):
        check_trace(tmp_path / "partial.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "mismatch.gguf"), "llama")
    for role, tensor in (("q", q), ("k", k), ("v", v[..., :5, :]), ("out", out)):
        writer.add_tensor(f"blk.0.step.1.{role}", tensor.numpy())
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(TraceError, match="v .* does not match k"):
        check_trace(tmp_path / "mismatch.gguf")


def test_permuted_views_described_by_kvlab_metadata(tmp_path):
    """A hand-made file says per tensor how it is laid out; no role layout is needed."""
    h, kv, t, s, d = 4, 2, 3, 11, 32
    q, k, v, mask, out = attention_case(h, kv, t, s, d, seed=6)
    kinds = {"q": "f32", "k": "f32", "v": "f32", "out": "f32"}
    path = tmp_path / "meta.gguf"
    write_llama_cpp_trace(path, q, k, v, mask, out, kinds=kinds, views=True)
    # same tensors again, now with the layout in kvlab.* metadata
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "described.gguf"), "llama")
    swap = [0, 2, 1, 3]
    writer.add_array("kvlab.tensor.blk.0.step.1.q.ggml_permute", swap)
    writer.add_bool("kvlab.tensor.blk.0.step.1.q.ne_is_view", True)
    for role in ("k", "v"):  # the cache rows [kv * d, s] as [d, kv, s], then permuted
        writer.add_array(f"kvlab.tensor.blk.0.step.1.{role}.source_ne", [d, kv, s])
        writer.add_array(f"kvlab.tensor.blk.0.step.1.{role}.ggml_permute", swap)
        writer.add_array(f"kvlab.tensor.blk.0.step.1.{role}.torch_shape", [1, kv, s, d])
    writer.add_array("kvlab.tensor.blk.0.step.1.out.ggml_permute", swap)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name.endswith((".k", ".v")):
            data = data.reshape(s, kv * d)  # stored as the cache itself this time
        writer.add_tensor(tensor.name, data)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    step = TraceFile(tmp_path / "described.gguf").attention_step(0, 1)
    assert torch.equal(step.q, q) and torch.equal(step.k, k) and torch.equal(step.v, v) and torch.equal(step.out, out)


def test_a_custom_role_layout(tmp_path):
    from kvlab.trace import LAYOUTS, TensorLayout

    q, k, v, mask, out = attention_case(seed=7)
    path = tmp_path / "custom.gguf"
    write_llama_cpp_trace(path, q, k, v, mask, out, kinds={"q": "f32", "k": "f32", "v": "f32", "out": "f32"})
    layout = {**LAYOUTS["llama.cpp"], "out": TensorLayout()}  # forgets that out is [head_dim, n_head, n_tokens]
    trace = TraceFile(path, layout=layout)
    assert torch.equal(trace.tensor("blk.0.step.1.out"), out[0].transpose(0, 1))  # [t, h, d]: ne reversed
    with pytest.raises(TraceError, match=r"out \(1, 3, 4, 32\) is not \[batch, heads, q_len, head_dim\]"):
        trace.attention_step(0, 1)
    with pytest.raises(TraceError, match="layout 'nope' is not one of kvlab, llama.cpp, llama.cpp-views"):
        TraceFile(path, layout="nope")
