"""Real llama.cpp attention dumps (tests/trace/fixtures/llamacpp, `make_fixtures.py`) read and checked.

The dumps are what `kvlab trace record --engine llama.cpp` wrote: llama.cpp's own tensors (bytes,
ne, ggml type) of layer 0 (layer 5 in f16_long), no per-tensor kvlab metadata. The variants a
ggml program might write instead (trailing 1s in ne, the K/V view's ne, no kvlab keys at all,
heads rolled by one) are made from the same bytes.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from kvlab.trace import TraceError, TraceFile, check_trace
from kvlab.trace.writer import TraceWriter

DUMPS = Path(__file__).parent / "fixtures" / "llamacpp"
ALL = ("f16", "q8_0", "f16_noflash", "f16_long")


def rewrite(source: Path, target: Path, *, ne=None, data=None, keep_meta=True) -> Path:
    """Copy a dump tensor by tensor; `ne(name, ne)` / `data(name, array, ne)` may change a tensor."""
    from gguf import GGUFReader

    reader = GGUFReader(source)
    writer = TraceWriter(target)
    if keep_meta:
        for key, field in reader.fields.items():
            if key.startswith("kvlab.") and key != "kvlab.format":
                writer.add_meta(key, field.contents())
    else:
        writer._meta.pop("kvlab.format")  # a plain ggml dump: no kvlab keys at all
    for t in reader.tensors:
        shape = [int(n) for n in t.shape]
        raw = np.asarray(t.data)
        if data is not None:
            raw = data(t.name, raw, shape)
        writer.add_raw(t.name, raw, ne(t.name, shape) if ne is not None else shape, t.tensor_type.name)
    return writer.write()


@pytest.mark.parametrize("name", ALL)
def test_recorded_dumps_pass_with_the_kernel_rounding_replayed(name):
    report = check_trace(DUMPS / f"{name}.gguf")
    assert report.ok and report.rounding == "ggml-cpu" and report.tolerance == 1e-3
    assert max(e.rel_l2 for e in report.entries) < 1e-4
    trace = TraceFile(DUMPS / f"{name}.gguf")
    assert trace.layout_name == ("llama.cpp-noflash" if "noflash" in name else "llama.cpp")


def test_without_the_replay_a_correct_long_f16_trace_fails_and_a_q8_0_one_is_far_off():
    long = check_trace(DUMPS / "f16_long.gguf", rounding="none")
    assert not long.ok and max(e.rel_l2 for e in long.entries) > 0.01  # float16 V accumulation, 1,300 positions
    q8 = check_trace(DUMPS / "q8_0.gguf", rounding="none", tol=1e-3)
    assert not q8.ok  # q rounded to Q8_0 before K·q
    assert check_trace(DUMPS / "q8_0.gguf").ok


@pytest.mark.parametrize("name", ALL)
def test_a_trace_whose_output_heads_are_rolled_by_one_still_fails(name, tmp_path):
    def roll_out(tensor, raw, shape):
        if not tensor.endswith(".out"):
            return raw
        values = raw.reshape(-1).view(np.float32)
        if "noflash" in name:  # kqv_out [n_embd, n_tokens]: heads are 64-channel runs of a row
            rows = values.reshape(shape[1], -1, 64)
            return np.roll(rows, 1, axis=1).reshape(-1)
        heads = values.reshape(-1, shape[1], shape[0])  # [n_tokens, n_head, head_dim]
        return np.roll(heads, 1, axis=1).reshape(-1)

    rolled = rewrite(DUMPS / f"{name}.gguf", tmp_path / "rolled.gguf", data=roll_out)
    report = check_trace(rolled)
    assert not report.ok
    assert min(e.rel_l2 for e in report.entries) > 100 * report.tolerance


def test_k_and_v_with_trailing_ones_in_ne_are_read(tmp_path):
    def four(tensor, shape):
        return shape + [1] * (4 - len(shape)) if tensor.endswith((".k", ".v")) else shape

    padded = rewrite(DUMPS / "f16.gguf", tmp_path / "padded.gguf", ne=four)
    assert TraceFile(padded).stored_ne("blk.0.step.1.k")[2:] == (1, 1)
    assert check_trace(padded, layout="llama.cpp").ok


def test_llamas_own_kv_view_ne_is_read(tmp_path):
    # what llama.cpp's attention reads: [head_dim, n_head_kv, n_kv], the cache rows split into heads
    def view(tensor, shape):
        return [64, shape[0] // 64, shape[1]] if tensor.endswith((".k", ".v")) else shape

    viewed = rewrite(DUMPS / "q8_0.gguf", tmp_path / "view.gguf", ne=view)
    trace = TraceFile(viewed, layout="llama.cpp")
    assert trace.stored_ne("blk.0.step.1.k")[:2] == (64, 3)
    original = TraceFile(DUMPS / "q8_0.gguf", layout="llama.cpp").attention_step(0, 1)
    assert torch.equal(trace.attention_step(0, 1).k, original.k)
    assert check_trace(viewed, layout="llama.cpp").ok


def test_a_plain_ggml_dump_read_in_the_default_layout_names_the_file_and_suggests_layout(tmp_path):
    plain = rewrite(DUMPS / "f16.gguf", tmp_path / "plain.gguf", keep_meta=False)
    with pytest.raises(TraceError) as info:
        check_trace(plain)
    message = str(info.value)
    assert str(plain) in message and "--layout llama.cpp" in message and "\n" not in message
    report = check_trace(plain, layout="llama.cpp", rounding="ggml-cpu", scale=0.125)
    assert report.ok


def test_the_plain_dump_through_the_cli(cli, tmp_path):
    plain = rewrite(DUMPS / "f16_noflash.gguf", tmp_path / "plain.gguf", keep_meta=False)
    code, out, err = cli("trace", "check", plain, "-q")
    assert code == 2 and "--layout" in err and str(plain) in err
    code, out, err = cli("trace", "check", plain, "--layout", "llama.cpp-noflash", "--rounding", "ggml-cpu",
                         "--scale", "0.125", "-q")
    assert code == 0, err


def test_under_the_hadamard_rotation_q_is_the_flash_attention_input_not_qcur():
    # q8_0 cache: llama.cpp rotates q, k and v (Walsh-Hadamard, 64 channels); the recorded q is the
    # flash-attention node's src[0], in the rotated basis like the cached k. Qcur-N (unrotated) is not.
    from kvlab.engines.ggml_rows import unrotate
    from kvlab.trace.kernel_rounding import kernel_attention

    trace = TraceFile(DUMPS / "q8_0.gguf")
    att = trace.attention_step(0, 1)
    qcur = torch.from_numpy(unrotate(att.q.numpy().reshape(-1, 64)).reshape(att.q.shape))
    args = dict(k_type="Q8_0", v_type="Q8_0")
    good = kernel_attention(att.q, att.k, att.v, att.mask, att.scale, **args)
    wrong = kernel_attention(qcur, att.k, att.v, att.mask, att.scale, **args)
    err = lambda x: float((x - att.out.double()).norm() / att.out.double().norm())  # noqa: E731
    assert err(good) < 1e-5 and err(wrong) > 0.05
