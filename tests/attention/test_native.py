"""The compiled flash-decoding kernel: exact against float64 attention over what the blocks decode to."""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.attention import native
from kvlab.attention.flash_decoding import native_flash_decode
from kvlab.attention.reference import reference_attention
from kvlab.caches import parse_policy
from kvlab.quant.blocks import SchemeSpec
from tests.conftest import tiny

SCHEMES = [("kivi", 2), ("kivi", 4), ("kivi", 8), ("q8_0", 8), ("q4_0", 4), ("fp8", 8)]


def _blocks(scheme, bits, b, kv, n_blocks, tokens, d, g):
    spec = SchemeSpec(scheme, bits, tokens, 32)
    kc, vc = spec.codec("keys", d), spec.codec("values", d)
    k = torch.randn(b, kv, n_blocks, tokens, d, generator=g) * 2
    v = torch.randn(b, kv, n_blocks, tokens, d, generator=g)
    kp, vp = kc.encode(k), vc.encode(v)
    part = native.Part(native.codec_role(kc, kp), native.codec_role(vc, vp), n_blocks * tokens, tokens)
    flat = lambda c, p: c.decode(p, torch.float64).reshape(b, kv, -1, d)  # noqa: E731
    return part, flat(kc, kp), flat(vc, vp)


@pytest.mark.parametrize("scheme,bits", SCHEMES)
@pytest.mark.parametrize("heads,kv,d,q_len", [(9, 3, 64, 1), (4, 4, 32, 1), (8, 2, 128, 2), (2, 1, 96, 1)])
def test_every_scheme_matches_float64_over_the_decoded_blocks(scheme, bits, heads, kv, d, q_len):
    g = torch.Generator().manual_seed(d + heads + bits)
    b, tokens = 2, 16
    first, k1, v1 = _blocks(scheme, bits, b, kv, 5, tokens, d, g)
    second, k2, v2 = _blocks(scheme, bits, b, kv, 3, tokens, d, g)
    hot_k, hot_v = torch.randn(b, kv, 7, d, generator=g), torch.randn(b, kv, 7, d, generator=g)
    q = torch.randn(b, heads, q_len, d, generator=g)
    got = native_flash_decode(q, [first, second], hot_k, hot_v, scale=0.2)
    keys = torch.cat([k1, k2, hot_k.double()], dim=2)
    values = torch.cat([v1, v2, hot_v.double()], dim=2)
    assert (got.double() - reference_attention(q, keys, values, scale=0.2)).abs().max() <= 1e-5


def test_padding_masks_inside_and_across_blocks():
    g = torch.Generator().manual_seed(7)
    part, k1, v1 = _blocks("kivi", 4, 2, 2, 4, 16, 32, g)
    hot_k, hot_v = torch.randn(2, 2, 5, 32, generator=g), torch.randn(2, 2, 5, 32, generator=g)
    q = torch.randn(2, 6, 1, 32, generator=g)
    mask = torch.ones(2, 1, 1, 69, dtype=torch.bool)
    mask[0, ..., :37] = False  # left padding over two whole blocks and part of a third
    mask[1, ..., 20] = False
    got = native_flash_decode(q, [part], hot_k, hot_v, mask=mask)
    want = reference_attention(q, torch.cat([k1, hot_k.double()], 2), torch.cat([v1, hot_v.double()], 2), mask)
    assert (got.double() - want).abs().max() <= 1e-5
    nothing = torch.zeros(2, 1, 1, 69, dtype=torch.bool)
    assert torch.equal(native_flash_decode(q, [part], hot_k, hot_v, mask=nothing), torch.zeros(2, 6, 1, 32))


def test_result_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(8)
    part, _, _ = _blocks("kivi", 2, 1, 3, 64, 32, 64, g)
    hot = torch.randn(1, 3, 100, 64, generator=g)
    q = torch.randn(1, 9, 1, 64, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native_flash_decode(q, [part], hot, hot)
        torch.set_num_threads(max(2, threads))
        many = native_flash_decode(q, [part], hot, hot)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_hot_rows_are_read_in_float32(dtype):
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, 4, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(1, 2, 45, 16, generator=g).to(dtype) for _ in range(2))
    got = native_flash_decode(q, [], k, v)
    assert got.dtype == dtype
    assert (got.double() - reference_attention(q, k, v)).abs().max() <= 1e-2  # one rounding to dtype
    exact = native_flash_decode(q.float(), [], k.float(), v.float())
    assert (got.float() - exact).abs().max() <= 1e-2
    assert (native_flash_decode(q.float(), [], k, v) - exact).abs().max() <= 1e-6  # rows decoded exactly


def test_the_kernel_is_built_once_under_kvlab_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_HOME", str(tmp_path))
    path = native.build()
    assert path.parent == tmp_path / "kernels" and path.exists()
    stamp = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


def test_missing_or_failing_compiler_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KVLAB_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-kvlab")
    with pytest.raises(native.NativeUnavailable, match="no C compiler"):
        native.build()
    monkeypatch.setenv("CC", "false")
    with pytest.raises(native.NativeUnavailable, match="C compiler failed"):
        native.build()
    assert not (tmp_path / "kernels").exists() or not any((tmp_path / "kernels").iterdir())


def test_policy_falls_back_or_refuses_when_the_kernel_is_unavailable(monkeypatch, capsys):
    model = tiny("tiny-llama").model
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no C compiler ('cc' not found; set CC)")
    with pytest.raises(kvlab.KvlabError, match="native kernel is unavailable: no C compiler"):
        parse_policy("mixed:kernel=native").build(model)
    cache = parse_policy("mixed:kernel=auto").build(model)
    assert not any(layer.native for layer in cache.layers)
    assert "uses PyTorch ops" in capsys.readouterr().err
    monkeypatch.setattr(native, "unavailable_reason", lambda: None)
    assert all(layer.native for layer in parse_policy("mixed").build(model).layers)
    assert not any(layer.native for layer in parse_policy("mixed:kernel=torch").build(model).layers)


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv("KVLAB_NATIVE", "0")
    native.library.cache_clear()
    try:
        assert native.unavailable_reason() == "disabled by KVLAB_NATIVE=0"
    finally:
        monkeypatch.delenv("KVLAB_NATIVE")
        native.library.cache_clear()
    assert native.unavailable_reason() != "disabled by KVLAB_NATIVE=0"


@pytest.mark.parametrize("march", ["x86-64", "haswell"])
def test_narrower_machines_get_the_same_results(march, monkeypatch):
    """The kernel built for a generic x86-64 (no vector intrinsics) and for AVX2 agrees with the
    float64 reference too, so machines without AVX-512 are covered here."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86 variants")
    flags = [f if not f.startswith("-march=") else f"-march={march}" for f in native.FLAGS]
    variant = native.load(native.build(flags))
    monkeypatch.setattr(native, "library", lambda: variant)
    g = torch.Generator().manual_seed(10)
    for scheme, bits in SCHEMES:
        part, keys, values = _blocks(scheme, bits, 1, 2, 6, 32, 64, g)
        q = torch.randn(1, 6, 1, 64, generator=g)
        got = native_flash_decode(q, [part], keys[:, :, :0].float(), values[:, :, :0].float())
        assert (got.double() - reference_attention(q, keys, values)).abs().max() <= 1e-5, scheme
